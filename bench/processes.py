"""``tokenrelay gateway --workers N`` spreads its clients over N processes (and so N cores).

    python -m bench.processes [--subscribers 2000] [--rate 50]

Runs workload A (one stream, compiled load generator) against a gateway of 1 and of 2
processes, neither pinned, and prints the CPU each gateway process used while it streamed.
On a 2-core machine the load generator, Redis and the publisher share the cores, so this shows
that the work is spread, not how far it scales.
"""

from __future__ import annotations

import argparse
import asyncio

from bench.systems import Tokenrelay
from bench.workloads import Workload, run


async def main(subscribers: int, rate: float) -> None:
    workload = Workload("A", subscribers, rate=rate, tokens=int(rate * 8))
    print("| gateway processes | CPU s of each process while streaming | tokens/s | p99 ms |")
    print("|---:|---|---:|---:|")
    for processes in (1, 2):
        system = Tokenrelay(workers=processes, pinned=False, name=f"--workers {processes}")
        result = await run(system, workload)
        busy = [f"{s:.2f}" for s in result["cpu_s_by_process"] if s >= 0.01]
        print(
            f"| {processes} | {', '.join(busy)} | {result['tokens_per_s']:.0f} | "
            f"{result['latency_p99_ms']:.1f} |"
        )
        if result["gaps"] or result["dups"] or result["incomplete"]:
            raise SystemExit(f"lost or doubled events: {result['gaps']}, {result['dups']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    asyncio.run(main(args.subscribers, args.rate))
