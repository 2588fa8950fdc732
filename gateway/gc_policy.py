"""How a gateway process runs Python's cyclic garbage collector.

A gateway holds tens of thousands of long-lived objects per thousand connections, and every
request and event allocates short-lived ones. With CPython's default thresholds the collector
runs a young-generation pass every 700 allocations and now and then a full pass over the whole
heap, which stops every stream at once: in workload B of ``python -m bench`` (1,000 streams
with reconnects) the collector took 11 % of the gateway's CPU, and its full passes set the
tail latency (p99 143 ms; 28 ms with this policy).
"""

from __future__ import annotations

import gc

#: Allocations between young-generation passes (CPython's default is 700): most of what a
#: request or an event allocates is freed by reference counting before a pass comes.
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Call once the process has imported and built its application, before it serves.

    What exists by then (modules, the app, its routes) lives as long as the process: freezing
    it takes it out of every later pass. Only cycles need the collector; it still runs, less
    often, and its full passes keep CPython's own rule (a quarter of the heap new since the
    last).
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
