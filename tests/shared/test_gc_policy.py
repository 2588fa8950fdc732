"""The gateway process's collector policy (checked in a child: it is process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys

_FACTORY = """
import gc
from gateway.serving import app_from_env
app = app_from_env()
print(gc.get_freeze_count() > 1000, gc.isenabled())
"""

_PASSES = """
import asyncio, gc, weakref
from shared import gc_policy

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

async def main():
    gc_policy.settle(full_every_s=1.0)
    task = asyncio.create_task(gc_policy.collect())
    young = cycle()  # garbage before the next young pass: that pass collects it
    await asyncio.sleep(0.3)
    print("young", young() is None)
    kept = [Node(), Node()]
    kept[0].other, kept[1].other = kept[1], kept[0]
    old = weakref.ref(kept[0])
    await asyncio.sleep(0.3)  # it survives young passes: frozen
    del kept
    await asyncio.sleep(0.2)
    print("frozen", old() is not None)  # only a full pass looks at it
    await asyncio.sleep(1.0)
    print("full", old() is None)
    task.cancel()

asyncio.run(main())
"""


def _run(code: str) -> list[str]:
    env = {**os.environ, "TOKENRELAY_AUTH": "off"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    return done.stdout.split()


def test_a_gateway_process_freezes_its_startup_heap_and_runs_the_collector_itself() -> None:
    # The factory every --workers process calls settles the heap and takes the collector over.
    assert _run(_FACTORY) == ["True", "False"]


def test_young_cycles_go_at_once_and_old_ones_at_the_next_full_pass() -> None:
    assert _run(_PASSES) == ["young", "True", "frozen", "True", "full", "True"]


_RELEASE = """
import gc
from shared import gc_policy
gc_policy.settle(full_every_s=1.0)
settled = (gc.isenabled(), gc_policy.settled())
gc_policy.release()
print(settled, (gc.isenabled(), gc_policy.settled(), gc.get_freeze_count()))
"""


def test_a_process_can_give_the_collector_back() -> None:
    """As the benchmark's publisher does, once it is done."""
    done = subprocess.run(
        [sys.executable, "-c", _RELEASE], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "(False, True) (True, False, 0)"
