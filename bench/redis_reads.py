"""Redis commands per token with 1 vs N subscribers of one message, measured over real HTTP.

    python -m bench.redis_reads [--subscribers 1 50] [--tokens 200]

Starts a private redis-server on a free port, a gateway and a worker in this process, attaches the
subscribers (GET /chat/stream/{id}) before generation starts, then counts with INFO commandstats
what Redis served while the answer was generated and delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import uvicorn
from redis.asyncio import Redis

from gateway.app import create_app
from gateway.server import served, uvicorn_options
from shared import keys
from shared.redis_client import RedisConnector
from shared.settings import Settings
from tokenrelay.local_redis import free_port
from worker import service

_READS = ("xrange", "xrevrange", "xread")


def _server_pid(port: int) -> int | None:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as sock:
        sock.sendall(b"INFO server\r\n")
        reply = b""
        while not reply.endswith(b"\r\n\r\n") and (chunk := sock.recv(65536)):
            reply += chunk
        for line in reply.decode(errors="replace").splitlines():
            if line.startswith("process_id:"):
                return int(line.split(":", 1)[1])
    return None


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A throw-away redis-server on a free port."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tokenrelay-bench-")
    binary = shutil.which("redis-server") or "redis-server"
    args = [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", workdir]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        # Wait until our server answers (not another one that took the port first).
        for _ in range(200):
            if _server_pid(port) == process.pid:
                break
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[str]:
    app = create_app(settings, lambda: RedisConnector(settings))
    port = free_port()
    options = uvicorn_options(settings, "127.0.0.1", port) | {"log_level": "warning"}
    server = uvicorn.Server(uvicorn.Config(served(app), **options))
    task = asyncio.create_task(server.serve())
    for _ in range(1000):
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def _read(client: httpx.AsyncClient, path: str, opened: asyncio.Event) -> int:
    events = 0
    async with client.stream("GET", path) as response:
        opened.set()
        async for chunk in response.aiter_bytes():
            events += chunk.count(b"\ndata: ")
    return events


async def measure(url: str, subscribers: int, tokens: int) -> dict[str, object]:
    settings = Settings(redis_url=url, coalesce_ms=0, mock_token_delay_ms=2, auth="off")
    redis = Redis.from_url(url)
    await redis.flushall()
    async with gateway(settings) as base, httpx.AsyncClient(base_url=base, timeout=60) as client:
        async with client.stream(
            "POST", "/chat/stream", json={"prompt": "measure", "max_tokens": tokens}
        ) as response:
            message_id = response.headers["x-message-id"]
        opened = [asyncio.Event() for _ in range(subscribers)]
        path = f"/chat/stream/{message_id}"
        readers = [asyncio.create_task(_read(client, path, o)) for o in opened]
        await asyncio.gather(*(o.wait() for o in opened))
        await asyncio.sleep(0.5)  # every subscriber has caught up and attached
        join_stats = await redis.info("commandstats")
        await redis.config_resetstat()
        stop = asyncio.Event()
        worker = asyncio.create_task(service.serve(settings, RedisConnector(settings), stop))
        delivered = sum(await asyncio.gather(*readers))
        stats = await redis.info("commandstats")
        # Every entry: the tokens, the finish reason, usage and the end.
        events = int(await redis.xlen(keys.message_stream(message_id)))
        stop.set()
        await worker
    await redis.aclose()
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    joins = sum(int(join_stats.get(f"cmdstat_{n}", {}).get("calls", 0)) for n in _READS)
    result: dict[str, object] = {
        "subscribers": subscribers,
        "events": events,
        "delivered": delivered,  # SSE data frames received (the seed format shows no usage)
        "join_reads": joins,
        "reads_per_event": sum(calls.get(n, 0) for n in _READS) / events,
        "commands_per_event": sum(calls.values()) / events,
        "commands_per_delivered": sum(calls.values()) / max(delivered, 1),
        "evalsha_per_event": calls.get("evalsha", 0) / events,
        "breakdown": ", ".join(
            f"{n} {c / events:.2f}" for n, c in sorted(calls.items(), key=lambda i: -i[1])
        ),
    }
    return result


async def main(subscriber_counts: list[int], tokens: int) -> None:
    with private_redis() as url:
        rows = [await measure(url, n, tokens) for n in subscriber_counts]
    print(f"one message of {tokens} tokens (one entry each, plus finish, usage and end entries);")
    print("subscribers attached first; 'per token' below means per stream entry")
    print("(Redis also counts the commands a script runs: each EVALSHA append runs 6 more)\n")
    print(
        "| subscribers | delivered events | stream reads while joining | stream reads / token "
        "| EVALSHA round trips / token | Redis commands / delivered event |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['subscribers']} | {r['delivered']} | {r['join_reads']} "
            f"| {r['reads_per_event']:.3f} | {r['evalsha_per_event']:.3f} "
            f"| {r['commands_per_delivered']:.4f} |"
        )
    for r in rows:
        print(f"\ncommands per token with {r['subscribers']} subscriber(s): {r['breakdown']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.subscribers, args.tokens))
