"""What the kernel accounts to a process: CPU time and resident memory (Linux ``/proc``)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def family(pid: int) -> list[int]:
    """``pid`` and all its descendants (a uvicorn or nginx master and its workers)."""
    found = [pid]
    index = 0
    while index < len(found):
        children = Path(f"/proc/{found[index]}/task/{found[index]}/children")
        with contextlib.suppress(OSError):
            found.extend(int(c) for c in children.read_text().split())
        index += 1
    return found


def cpu_ns(pids: list[int]) -> int:
    """Nanoseconds on a CPU, summed over every thread of ``pids`` (from schedstat: exact, not
    the 10 ms ticks of /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    total += int((task / "schedstat").read_text().split()[0])
    return total


def rss_bytes(pids: list[int]) -> int:
    """Resident memory summed over ``pids``."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total
