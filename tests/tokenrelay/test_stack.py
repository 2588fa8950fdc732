"""Failures on the real topology: haproxy in front of gateway and worker processes, one Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator

import pytest

from tests.support import free_port
from tokenrelay.client import Chunk, Reset, StreamFailed, TokenrelayClient
from tokenrelay.stack import LocalStack, local_stack
from tokenrelay.topology import Topology
from worker.backends.mock import mock_text

_ENV = {
    "TOKENRELAY_MOCK_TOKEN_DELAY_MS": "20",
    "TOKENRELAY_COALESCE_MS": "0",
    "TOKENRELAY_RETRY_MS": "100",
    "TOKENRELAY_JOB_LEASE_S": "1",
    "TOKENRELAY_LOG_LEVEL": "warning",
    "TOKENRELAY_HEARTBEAT_S": "1",
}


@pytest.fixture(autouse=True)
def _needs_haproxy_and_redis() -> None:
    for binary in ("haproxy", "redis-server"):
        if shutil.which(binary) is None:
            reason = f"{binary} is not installed (Debian package {binary})"
            if os.environ.get("CI"):
                pytest.fail(f"CI requires it: {reason}")
            pytest.skip(reason)


def _free_block(count: int) -> int:
    """A port p such that p+1 .. p+count are free (checked, not guaranteed to stay so)."""
    for _ in range(50):
        base = free_port()
        with contextlib.ExitStack() as stack:
            try:
                for offset in range(1, count + 1):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", base + offset))
            except OSError:
                continue
        return base
    raise AssertionError("no block of free ports")


@contextlib.asynccontextmanager
async def _stack(gateways: int, workers: int) -> AsyncIterator[LocalStack]:
    topology = Topology(gateways, workers, free_port(), free_port(), _free_block(gateways))
    async with local_stack(topology, env={**os.environ, **_ENV}) as stack:
        yield stack


def _pid(served_by: str | None) -> int:
    assert served_by is not None
    return int(served_by.rsplit(":", 1)[1])


@pytest.mark.timeout(90)
async def test_a_killed_gateway_is_survived_through_the_load_balancer() -> None:
    async with (
        _stack(gateways=2, workers=1) as stack,
        TokenrelayClient(stack.url, initial_backoff_s=0.05) as client,
    ):
        pids = {process.pid: name for name, process in stack.gateways.items()}
        stream = await client.ask("kill the gateway", max_tokens=120)
        parts: list[str] = []
        served_by: list[str] = []
        async for piece in stream:
            assert isinstance(piece, Chunk)
            parts.append(piece.text)
            if len(parts) == 20:
                victim = _pid(stream.served_by)
                served_by.append(pids[victim])
                os.kill(victim, signal.SIGKILL)
        served_by.append(pids[_pid(stream.served_by)])
    assert "".join(parts) == mock_text("kill the gateway", 120)
    assert stream.reconnects >= 1
    assert served_by[0] != served_by[1]  # the answer was finished by the other gateway


@pytest.mark.timeout(90)
async def test_a_killed_worker_is_taken_over_by_another() -> None:
    async with (
        _stack(gateways=1, workers=2) as stack,
        TokenrelayClient(stack.url, initial_backoff_s=0.05) as client,
    ):
        stream = await client.ask("kill the worker", max_tokens=150)
        text: list[str] = []
        resets = 0
        killed = False
        async for piece in stream:
            if isinstance(piece, Reset):
                resets += 1
                text.clear()
                continue
            text.append(piece.text)
            if len(text) == 20 and not killed:
                # The worker generating it is the one whose consumer holds the job.
                for process in stack.workers.values():
                    if await _generates(stack, process.pid):
                        process.send_signal(signal.SIGKILL)
                        killed = True
    assert killed
    assert resets == 1
    assert "".join(text) == mock_text("kill the worker", 150)


async def _generates(stack: LocalStack, pid: int) -> bool:
    from redis.asyncio import Redis

    from shared import keys

    redis = Redis.from_url(stack.redis_url)
    try:
        consumers = await redis.xinfo_consumers(keys.JOBS_STREAM, keys.JOBS_GROUP)
    finally:
        await redis.aclose()
    return any(c["pending"] and f":{pid}:" in c["name"].decode() for c in consumers)


@pytest.mark.timeout(90)
async def test_a_redis_restart_is_survived_without_restarting_anything() -> None:
    async with (
        _stack(gateways=1, workers=1) as stack,
        TokenrelayClient(stack.url, initial_backoff_s=0.05) as client,
    ):
        stream = await client.ask("before the restart", max_tokens=300)

        async def read_through_a_restart() -> None:
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 10:
                    await stack.restart_redis(down_s=1.0)

        with pytest.raises(StreamFailed) as lost:
            await read_through_a_restart()
        # In-flight answers are lost with Redis' data, and say so.
        assert lost.value.error_type == "message_lost"
        # While Redis is away, a reconnecting EventSource would get 200 + a retry hint (any
        # other status would end it for good): checked on a second outage.
        outage = asyncio.create_task(stack.restart_redis(down_s=1.5))
        await asyncio.sleep(0.5)
        response = await client.http.get(
            f"/chat/stream/{stream.message_id}", headers={"Last-Event-ID": "1-0"}
        )
        assert response.status_code == 200
        assert response.text.startswith("retry: ")
        await outage
        # New requests work again, served by the same processes.
        for _ in range(100):
            if (await client.http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        fresh = await client.ask("after the restart", max_tokens=20)
        text = [piece.text async for piece in fresh if isinstance(piece, Chunk)]
        assert "".join(text) == mock_text("after the restart", 20)
        assert all(
            process.returncode is None
            for process in [*stack.gateways.values(), *stack.workers.values()]
        )
