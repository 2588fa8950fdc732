"""Redis CPU per appended event: each append its own call, against the batched script.

    python -m bench.appends [--streams 1 10 100] [--events 20000]

For each stream count: a private redis-server, that many messages claimed as a worker claims
them, and one connection subscribed to all their channels (as a gateway's is). Events are then
appended to every stream at once, round after round, two ways in turn on the same Redis:

- one call per append (redis-py's script object, the calls concurrent over a connection pool):
  how workers appended before worker.script_batch;
- through :class:`worker.script_batch.ScriptBatch`, as workers append now.

Redis and the appending process share one core, as Redis and the publisher do in
``python -m bench``. It prints Redis's CPU per append (schedstat of the redis-server process),
the appending process's wall time per append, and the ratios. Each way runs twice,
alternating, and the lower figure of each is kept (noise only ever adds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from bench import procstat
from bench.servers import LOAD_CORE, redis_server
from shared import keys
from shared.events import Kind
from shared.messages import Job, new_message_id, submit
from shared.settings import Settings
from worker.script_batch import ScriptCall
from worker.stream_writer import APPEND_SCRIPT, StreamWriter, append_batch

_TTL_MS = 600_000
_PARTITIONS = Settings.from_env({}).job_partitions


async def _messages(redis: Redis, streams: int) -> list[str]:
    message_ids = []
    for _ in range(streams):
        job = Job(message_id=new_message_id(), prompt="bench", max_tokens=1)
        await submit(redis, job, ttl_ms=_TTL_MS, model="bench", partitions=_PARTITIONS)
        message_ids.append(job.message_id)
    return message_ids


async def _writers(
    redis: Redis, appends: ScriptCall, message_ids: list[str], owner: str
) -> list[StreamWriter]:
    """A writer per message, each a new attempt that takes its message over."""
    writers = []
    for message_id in message_ids:
        writer = StreamWriter(redis, appends, message_id, owner, ttl_ms=_TTL_MS, maxlen=1000)
        if await writer.claim(takeover=True) != "ok":
            raise RuntimeError("could not claim a bench message")
        writers.append(writer)
    return writers


async def _listen(message_ids: list[str], port: int) -> asyncio.Task[None]:
    """A subscriber of every channel that reads and drops what comes (the gateway's part)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for message_id in message_ids:
        channel = keys.message_channel(message_id).encode()
        writer.write(b"*2\r\n$10\r\nSSUBSCRIBE\r\n$%d\r\n%b\r\n" % (len(channel), channel))
    await writer.drain()

    async def drain() -> None:
        try:
            while await reader.read(1 << 16):
                pass
        finally:
            writer.close()

    return asyncio.create_task(drain())


async def _measure(
    redis_pid: int, rounds: int, streams: int, append: Callable[[], Awaitable[object]]
) -> tuple[float, float]:
    """Redis CPU us and wall us per append over ``rounds`` rounds of one append per stream."""
    cpu0, wall0 = procstat.cpu_ns([redis_pid]), time.perf_counter()
    for _ in range(rounds):
        await append()
    cpu, wall = procstat.cpu_ns([redis_pid]) - cpu0, time.perf_counter() - wall0
    n = rounds * streams
    return cpu / 1000 / n, wall * 1e6 / n


async def compare(streams: int, events: int) -> dict[str, float]:
    workdir = tempfile.mkdtemp(prefix="bench-appends-")
    try:
        async with redis_server(workdir) as (redis, redis_pid):
            port = int(redis.connection_pool.connection_kwargs["port"])
            message_ids = await _messages(redis, streams)
            listener = await _listen(message_ids, port)
            # Before worker.script_batch: redis-py's script object, one round trip per call.
            single = await _writers(
                redis, redis.register_script(APPEND_SCRIPT), message_ids, "single"
            )
            async with append_batch(redis) as batch:
                batched = await _writers(redis, batch, message_ids, "batched")

                def way(writers: list[StreamWriter]) -> Callable[[], Awaitable[object]]:
                    return lambda: asyncio.gather(*(w.append(Kind.CHUNK, b'"x"') for w in writers))

                rounds = max(1, events // streams)
                best: dict[str, tuple[float, float]] = {}
                for _ in range(2):
                    # The latest claim wins: each pass claims for the way it measures.
                    for name, writers in (("single", single), ("batched", batched)):
                        for w in writers:
                            await w.claim(takeover=True)
                        figures = await _measure(redis_pid, rounds, streams, way(writers))
                        best[name] = min(best.get(name, figures), figures)
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            per_trip = batch.calls / batch.round_trips
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "streams": streams,
        "single_redis_us": best["single"][0],
        "batched_redis_us": best["batched"][0],
        "single_wall_us": best["single"][1],
        "batched_wall_us": best["batched"][1],
        "calls_per_round_trip": per_trip,
    }


async def main_async(stream_counts: list[int], events: int) -> None:
    print(
        "| streams appending at once | Redis CPU us / append: one call each | batched | ratio "
        "| appender wall us / append: one call each | batched | calls per round trip |"
    )
    print("|---|---|---|---|---|---|---|")
    for streams in stream_counts:
        r = await compare(streams, events)
        print(
            f"| {streams} | {r['single_redis_us']:.1f} | {r['batched_redis_us']:.1f} "
            f"| {r['single_redis_us'] / r['batched_redis_us']:.2f}x "
            f"| {r['single_wall_us']:.1f} | {r['batched_wall_us']:.1f} "
            f"| {r['calls_per_round_trip']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--events", type=int, default=20_000, help="appends per way and pass")
    args = parser.parse_args()
    if LOAD_CORE is not None:
        os.sched_setaffinity(0, {LOAD_CORE})  # and redis-server, its child, with it
    asyncio.run(main_async(args.streams, args.events))


if __name__ == "__main__":
    main()
