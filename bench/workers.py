"""More workers, more concurrent generations: measured on the local topology.

    python -m bench.workers [--workers 1 2 4] [--jobs 24] [--concurrency 4]

For each worker count it starts the topology as processes (one gateway behind haproxy, a
private redis-server, M workers each allowed ``--concurrency`` generations), submits ``--jobs``
answers of 20 tokens 50 ms apart at once, and reports the peak number of generations running at
the same time (sampled from Redis every 20 ms) and how long the whole batch took.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import httpx
from redis.asyncio import Redis

from shared import keys
from tokenrelay.local_redis import free_port, free_port_block
from tokenrelay.stack import local_stack
from tokenrelay.topology import Topology


async def measure(workers: int, jobs: int, concurrency: int) -> tuple[int, float]:
    topology = Topology(1, workers, free_port(), free_port(), free_port_block(1))
    env = {
        **os.environ,
        "TOKENRELAY_MOCK_TOKEN_DELAY_MS": "50",
        "TOKENRELAY_LOG_LEVEL": "warning",
        "TOKENRELAY_WORKER_CONCURRENCY": str(concurrency),
    }
    async with (
        local_stack(topology, env=env) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=120) as http,
    ):
        redis = Redis.from_url(stack.redis_url)
        start = time.monotonic()
        posts = [
            asyncio.create_task(
                http.post(
                    "/chat/stream", json={"prompt": f"job {i}", "max_tokens": 20, "stream": False}
                )
            )
            for i in range(jobs)
        ]
        peak = 0
        metas = [key async for key in redis.scan_iter(match=keys.message_meta("*"), count=1000)]
        while not all(p.done() for p in posts):
            if len(metas) < jobs:
                metas = [
                    key async for key in redis.scan_iter(match=keys.message_meta("*"), count=1000)
                ]
            # One round trip: a snapshot of every status at one moment.
            async with redis.pipeline(transaction=True) as pipe:
                for key in metas:
                    pipe.hget(key, "status")
                statuses = await pipe.execute()
            peak = max(peak, statuses.count(b"running"))
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - start
        refused = [p.result().status_code for p in posts if p.result().status_code != 200]
        if refused:
            raise RuntimeError(f"asks were refused: {refused}")
        await redis.aclose()
    return peak, elapsed


async def main(worker_counts: list[int], jobs: int, concurrency: int) -> None:
    print(
        f"{jobs} answers of 20 tokens x 50 ms submitted at once; "
        f"{concurrency} generations per worker\n"
    )
    print("| workers | peak concurrent generations | batch time (s) |")
    print("|---:|---:|---:|")
    for count in worker_counts:
        peak, elapsed = await measure(count, jobs, concurrency)
        print(f"| {count} | {peak} | {elapsed:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.workers, args.jobs, args.concurrency))
