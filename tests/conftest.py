"""Fixtures: a private redis-server per test session, settings, and a running gateway + worker.

Tests talk to a real Redis started here on a free port (never the machine's own). Where no
redis-server can be started, a local run skips with the reason; under CI (``CI`` set) it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from shared.settings import Settings
from tests.support import Stack, start_stack
from tokenrelay.stack import free_port, redis_server_argv
from worker.script_batch import ScriptBatch
from worker.stream_writer import append_batch


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"real Redis required in CI: {reason}")
    pytest.skip(reason)


def _answering_pid(port: int) -> int | None:
    """The process id of the Redis answering on ``port``, if one does."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.endswith(b"\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return None
    for line in reply.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL of a private redis-server for this test session."""
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server is not on PATH")
        raise AssertionError("unreachable")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tokenrelay-redis-")
    log = os.path.join(workdir, "redis.log")
    process = subprocess.Popen(
        [*redis_server_argv(binary, port, workdir), "--logfile", log],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        # Ours must answer, not another test session's server that took the port first (then
        # ours fails to bind, and both sessions would share, and flush, one Redis).
        if _answering_pid(port) == process.pid:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            with open(log, errors="replace") as text:
                _unavailable(f"redis-server did not start: {text.read()[-2000:]}")
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def redis(redis_server: str) -> AsyncIterator[Redis]:
    """A client of the private Redis, flushed before the test."""
    client = Redis.from_url(redis_server, protocol=2)
    await client.flushall()
    await client.config_resetstat()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def appends(redis: Redis) -> AsyncIterator[ScriptBatch]:
    """The append script as a worker process calls it (batched), on the private Redis."""
    async with append_batch(redis) as batch:
        yield batch


@pytest.fixture
def settings(redis_server: str) -> Settings:
    """Fast settings for tests: a quick mock model, one entry per token."""
    return Settings(redis_url=redis_server, mock_token_delay_ms=1, coalesce_ms=0, heartbeat_s=5)


@pytest.fixture
async def stack(settings: Settings, redis: Redis) -> AsyncIterator[Stack]:
    """A gateway on a free port and a worker, both against the private (flushed) Redis."""
    assert await redis.ping()
    async with start_stack(settings) as running:
        yield running
