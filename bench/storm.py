"""Reconnect storm on the local topology: N clients drop at once and resume with Last-Event-ID.

    python -m bench.storm [--clients 1000] [--gateways 2]

Starts the topology as processes (private redis-server, haproxy, gateways, one worker), attaches
N followers of one live answer through haproxy, drops them all, lets the answer run on for a
moment, then reconnects all of them at once. It prints how long each took to be back on the
live tail (to have every event that existed when it reconnected), and checks that every client
ends with the whole answer: no gap, no duplicate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import time

import httpx

from tokenrelay.client import Chunk, TokenrelayClient
from tokenrelay.local_redis import free_port, free_port_block
from tokenrelay.stack import local_stack
from tokenrelay.topology import Topology


async def main(clients: int, gateways: int) -> None:
    if not (shutil.which("haproxy") and shutil.which("redis-server")):
        raise SystemExit("needs haproxy and redis-server")
    topology = Topology(gateways, 1, free_port(), free_port(), free_port_block(gateways))
    env = {
        **os.environ,
        "TOKENRELAY_MOCK_TOKEN_DELAY_MS": "100",
        "TOKENRELAY_COALESCE_MS": "0",
        "TOKENRELAY_LOG_LEVEL": "warning",
        "TOKENRELAY_RETRY_MS": "100",
    }
    limits = httpx.Limits(max_connections=clients + 100, max_keepalive_connections=0)
    async with (
        local_stack(topology, env=env) as stack,
        httpx.AsyncClient(base_url=stack.url, limits=limits, timeout=httpx.Timeout(60.0)) as http,
    ):
        client = TokenrelayClient(stack.url, http=http)
        answer = await client.ask("storm", max_tokens=150)
        message_id = answer.message_id
        seen: list[list[str]] = [[] for _ in range(clients)]

        async def follow(
            index: int, until: asyncio.Event | None, target: str | None, done_at: list[float]
        ) -> None:
            last = seen[index][-1] if seen[index] else None
            async for piece in client.follow(message_id, last_event_id=last):
                if not isinstance(piece, Chunk):
                    raise RuntimeError(f"the answer was restarted ({piece}): not a storm to time")
                seen[index].append(piece.event_id)
                if target is not None and piece.event_id == target and not done_at:
                    done_at.append(time.monotonic())
                if until is not None and until.is_set():
                    return

        # 1. Everyone on the live tail.
        stop_first = asyncio.Event()
        first = [asyncio.create_task(follow(i, stop_first, None, [])) for i in range(clients)]
        for _ in range(1200):  # up to a minute
            if all(seen):
                break
            await asyncio.sleep(0.05)
        # 2. All drop at once; the answer goes on for a moment.
        for task in first:
            task.cancel()
        await asyncio.gather(*first, return_exceptions=True)
        await asyncio.sleep(0.5)
        tail = [
            piece.event_id
            async for piece in client.follow(message_id, last_event_id=max(s[-1] for s in seen))
        ]
        # 3. All reconnect at once; each is back once it has the tail event that existed now.
        target = tail[0] if tail else None
        marks: list[list[float]] = [[] for _ in range(clients)]
        start = time.monotonic()
        second = [asyncio.create_task(follow(i, None, target, marks[i])) for i in range(clients)]
        await asyncio.gather(*second)
        whole = [piece.event_id async for piece in client.follow(message_id)]
    latencies = sorted((m[0] - start) * 1000 for m in marks if m)
    intact = sum(1 for s in seen if s == whole)
    print(
        f"{clients} clients, {gateways} gateways behind haproxy, one answer of {len(whole)} events"
    )
    p50, p99 = statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]
    print(
        "back on the live tail after a simultaneous reconnect: "
        f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {latencies[-1]:.0f} ms"
    )
    print(f"clients with the whole answer, no gap and no duplicate: {intact} of {clients}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--gateways", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.clients, args.gateways))
