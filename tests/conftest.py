"""Fixtures: a private redis-server, and a private Redis Cluster (3 primaries, 3 replicas),
each started once per test session; settings, and a running gateway + worker.

Tests talk to a real Redis started here on free ports (never the machine's own). A test runs on
the one Redis unless it asks for both with :data:`tests.support.ON_BOTH` (``redis_kind``).
Where no redis-server can be started, a local run skips with the reason; under CI (``CI`` set)
it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol, TypeVar

import pytest
from redis.asyncio.cluster import RedisCluster

from shared import open_files
from shared.redis_client import RedisClient, RedisConnector
from shared.settings import Settings
from tests.support import Stack, start_stack
from tokenrelay.local_redis import (
    LocalCluster,
    LocalSentinel,
    free_port,
    redis_server_argv,
    start_cluster,
    start_sentinel,
)
from worker.script_batch import ScriptBatch
from worker.stream_writer import append_batch

# The tests are the clients: a storm test holds a thousand sockets, and a proxy in the test
# process two for each (the servers the tests start inherit the limit too).
open_files.raise_limit()


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


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Stoppable)


@contextlib.contextmanager
def _started(what: str, start: Callable[[str], _S]) -> Iterator[_S]:
    """``start`` run in a fresh directory, stopped and the directory removed at the end;
    unavailable (a skip, or in CI a failure) when it does not start."""
    workdir = tempfile.mkdtemp(prefix="tokenrelay-")
    try:
        setup = start(workdir)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        _unavailable(f"{what} did not start: {exc}")
        raise AssertionError("unreachable") from exc
    try:
        yield setup
    finally:
        setup.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A private Redis Cluster for this test session: 3 primaries, 3 replicas."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        _unavailable("redis-server and redis-cli are not on PATH")
    with _started("a Redis Cluster", start_cluster) as cluster:
        yield cluster


@pytest.fixture
def redis_sentinel() -> Iterator[LocalSentinel]:
    """A primary with one replica and three sentinels, for one test (it kills the primary)."""
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not on PATH")
    with _started("Sentinel", start_sentinel) as setup:
        yield setup


@pytest.fixture(params=["standalone"])
def redis_kind(request: pytest.FixtureRequest) -> str:
    """Which Redis a test runs on: ``standalone``, or ``cluster`` (see ON_BOTH)."""
    kind: str = request.param
    return kind


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, redis_kind: str) -> str:
    """``REDIS_URL`` of the Redis this test runs on."""
    if redis_kind == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        cluster.wait_healthy()  # a failover test before may have left it recovering
        return cluster.url
    url: str = request.getfixturevalue("redis_server")
    return url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    """A client of the Redis this test runs on, flushed before the test."""
    connector = RedisConnector(Settings(redis_url=redis_url))
    client = connector.client()
    await connector.ready()
    if isinstance(client, RedisCluster):
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
        await client.config_resetstat(target_nodes=RedisCluster.ALL_NODES)
    else:
        await client.flushall()
        await client.config_resetstat()
    try:
        yield client
    finally:
        await connector.aclose()


@pytest.fixture
async def appends(redis: RedisClient) -> AsyncIterator[ScriptBatch]:
    """The append script as a worker process calls it (batched), on the private Redis."""
    async with append_batch(redis) as batch:
        yield batch


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Fast settings for tests: a quick mock model, one entry per token, access control off
    (tests/gateway/test_access.py turns it on), the mock's fault hooks on."""
    return Settings(
        redis_url=redis_url,
        mock_token_delay_ms=1,
        coalesce_ms=0,
        heartbeat_s=5,
        auth="off",
        fault_injection=True,
    )


@pytest.fixture
async def stack(settings: Settings, redis: RedisClient) -> AsyncIterator[Stack]:
    """A gateway on a free port and a worker, both against the private (flushed) Redis."""
    assert await redis.ping()
    async with start_stack(settings) as running:
        yield running
