"""How a gateway or worker process runs Python's cyclic garbage collector: on a timer, not on
CPython's allocation count (docs/gateway.md says why, docs/bench/ what it changed). A full pass
over a process holding thousands of streams pauses every one of them; so does a worker's over
thousands of generations.

Only reference cycles need the collector; what a connection, a stream or an event allocates is
freed by reference counting. So the automatic collector is off. Every ``YOUNG_EVERY_S`` the
young generation is collected and what survives it is frozen (moved out of every later pass),
which keeps each pass as small as what the last fraction of a second allocated and still holds.
Every ``full_every_s`` everything is unfrozen and collected once: cycles among frozen objects
wait for that pass.
"""

from __future__ import annotations

import asyncio
import gc

#: Seconds between passes over the young generation.
YOUNG_EVERY_S = 0.1
_full_every_s: float | None = None


def settle(full_every_s: float) -> None:
    """Call once the process has imported and built its application, before it serves; then
    run :func:`collect` for as long as it serves."""
    global _full_every_s
    gc.collect()
    gc.freeze()  # modules, the app, its routes: they live as long as the process
    gc.disable()
    _full_every_s = full_every_s


def release() -> None:
    """Give the collector back to CPython's own schedule (for a process that settled only for
    a while: the benchmark's publisher)."""
    global _full_every_s
    _full_every_s = None
    gc.unfreeze()
    gc.enable()


def settled() -> bool:
    """Whether :func:`settle` took the collector over (then :func:`collect` must run)."""
    return _full_every_s is not None


async def collect() -> None:
    """The collector's passes (see the module's docstring), until cancelled."""
    if _full_every_s is None:
        return
    loop = asyncio.get_running_loop()
    full_at = loop.time() + _full_every_s
    while True:
        await asyncio.sleep(YOUNG_EVERY_S)
        if loop.time() >= full_at:
            full_at = loop.time() + _full_every_s
            gc.unfreeze()
            gc.collect()
        else:
            gc.collect(0)
        gc.freeze()
