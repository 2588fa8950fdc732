"""The gateway process's collector policy (checked in a child: it is process-wide)."""

from __future__ import annotations

import subprocess
import sys

_CHECK = """
import gc
from gateway.app import app_from_env
app = app_from_env()
print(gc.get_threshold()[0], gc.get_freeze_count() > 1000, gc.isenabled())
"""


def test_a_gateway_process_freezes_its_startup_heap_and_collects_less_often() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    # The factory every --workers process calls settles the heap; the collector stays on.
    assert out == ["10000", "True", "True"]
