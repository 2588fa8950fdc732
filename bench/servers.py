"""How the benchmark runs a system: its processes (each server pinned to one core), a private
Redis, and the publisher that writes tokens to Redis as a worker does.

Each system's server is pinned to core 0 (``taskset``); Redis, the load generator and the
publisher run on the other core (the harness pins itself there, and its children inherit it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from shared import gc_policy
from shared.messages import Job, new_message_id, submit
from shared.redis_client import RedisClient, RedisConnector
from shared.settings import Settings
from tokenrelay.local_redis import free_port, redis_server_argv, start_cluster
from worker.generation import _Chunker  # the worker's own coalescing rule
from worker.script_batch import ScriptBatch
from worker.stream_writer import StreamWriter, append_batch

_CORES = sorted(os.sched_getaffinity(0))
# The server under test gets one core, everything else (Redis, load, publisher) the other.
# With a single core there is nothing to pin (the smoke run in CI may have one).
SERVER_CORE: int | None = _CORES[0] if len(_CORES) >= 2 else None
LOAD_CORE: int | None = _CORES[1] if len(_CORES) >= 2 else None
_TTL_MS = 3_600_000
_PARTITIONS = Settings.from_env({}).job_partitions
_MAXLEN = 100_000


class Publisher(Protocol):
    """Takes tokens and writes them as the system wants, each stream's in order."""

    writes: int  # entries (events) written so far
    renewals: int  # of those, the ones that renewed their message's expiry (two PEXPIREs)

    async def publish(self, tokens: list[tuple[int, str]]) -> None: ...

    def next_flush(self) -> float | None:
        """When (event loop time) held text must be written; None when nothing is held."""

    async def flush_due(self) -> None:
        """Write what a coalescing window has held long enough."""

    async def flush_all(self) -> None: ...


@dataclass
class Running:
    """A started system: where clients connect, and what to measure."""

    port: int
    paths: list[str]  # the SSE path of each stream
    server_pid: int
    publisher: Publisher
    redis: RedisClient | None = None
    #: Every Redis process that serves writes (one, or a cluster's primaries).
    redis_pids: list[int] = field(default_factory=list)
    #: A cluster's replicas (their CPU is reported apart).
    replica_pids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Redis commands each publisher write costs (the worker's append script: its EVALSHA,
    #: and HMGET, XADD, HSET and SPUBLISH inside it; two PEXPIREs more on a renewal of the
    #: expiry); what Redis served beyond these is the system's own.
    commands_per_write: int = 5


class System(Protocol):
    name: str

    def start(self, streams: int) -> contextlib.AbstractAsyncContextManager[Running]: ...


async def spawn(
    argv: list[str], *, pin: int | None, **kwargs: object
) -> asyncio.subprocess.Process:
    if pin is not None:
        argv = ["taskset", "-c", str(pin), *argv]
    return await asyncio.create_subprocess_exec(*argv, **kwargs)  # type: ignore[arg-type]


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


async def wait_for_port(port: int, process: asyncio.subprocess.Process, what: str) -> None:
    for _ in range(400):
        if process.returncode is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.025)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError(f"{what} did not listen on {port} within 10 s")


@contextlib.asynccontextmanager
async def redis_server(workdir: str) -> AsyncIterator[tuple[Redis, int]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the benchmark needs redis-server (Debian package redis-server)")
    port = free_port()
    process = await spawn(
        redis_server_argv(binary, port, workdir),
        pin=None,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_for_port(port, process, "redis-server")
        # Blocking pool: thousands of streams append at once, and redis-py's plain pool fails
        # past its cap (MaxConnectionsError) where this one waits.
        pool = BlockingConnectionPool(
            port=port, max_connections=64, timeout=None, socket_timeout=30
        )
        redis = Redis(connection_pool=pool)
        try:
            yield redis, process.pid
        finally:
            await redis.aclose(close_connection_pool=True)  # a pool passed in is not closed
    finally:
        await stop(process)


class TokenrelayPublisher:
    """Writes tokens as a worker does: the append script, through the worker's coalescing."""

    def __init__(self, redis: RedisClient, appends: ScriptBatch, coalesce_ms: float) -> None:
        self._redis = redis
        self._appends = appends
        self._coalesce_s = coalesce_ms / 1000
        self.message_ids: list[str] = []
        self._chunkers: list[_Chunker] = []
        self._writers: list[StreamWriter] = []
        self.writes = 0
        self.renewals = 0

    async def create(self, streams: int) -> None:
        """Create the messages as the gateway does, and claim them as a worker does."""

        async def one() -> None:
            job = Job(message_id=new_message_id(), prompt="bench", max_tokens=1)
            await submit(self._redis, job, ttl_ms=_TTL_MS, model="bench", partitions=_PARTITIONS)
            writer = StreamWriter(
                self._redis, self._appends, job.message_id, "bench", ttl_ms=_TTL_MS, maxlen=_MAXLEN
            )
            if await writer.claim() != "ok":
                raise RuntimeError("could not claim a bench message")
            self.message_ids.append(job.message_id)
            self._writers.append(writer)

        for start in range(0, streams, 256):
            await asyncio.gather(*(one() for _ in range(min(256, streams - start))))
        self._chunkers = [_Chunker(w, self._coalesce_s) for w in self._writers]

    async def publish(self, tokens: list[tuple[int, str]]) -> None:
        per_stream: dict[int, list[str]] = {}
        for stream, text in tokens:
            per_stream.setdefault(stream, []).append(text)
        # Streams in parallel; one stream's tokens in order, as a worker writes them.
        await asyncio.gather(*(self._add(stream, texts) for stream, texts in per_stream.items()))
        self._count()

    def _count(self) -> None:
        self.writes = sum(w.events_written for w in self._writers)
        self.renewals = sum(w.renewals for w in self._writers)

    async def _add(self, stream: int, texts: list[str]) -> None:
        for text in texts:
            await self._chunkers[stream].add(text)

    def next_flush(self) -> float | None:
        if not self._coalesce_s:
            return None
        waits = [w for c in self._chunkers if (w := c.time_left()) is not None]
        return asyncio.get_running_loop().time() + min(waits) if waits else None

    async def flush_due(self) -> None:
        due = [c for c in self._chunkers if c.time_left() == 0.0]
        if due:
            await asyncio.gather(*(c.flush() for c in due))
            self._count()

    async def flush_all(self) -> None:
        await asyncio.gather(*(c.flush() for c in self._chunkers))
        self._count()


@contextlib.asynccontextmanager
async def on_redis(
    server_argv: list[str],
    what: str,
    path: str,
    *,
    streams: int,
    pin: int | None,
    coalesce_ms: float,
    cwd: Path | None = None,
    cluster: bool = False,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Running]:
    """A server (``server_argv`` + ``--port P``, run in ``cwd``, with ``env``) reading a private
    Redis (a 3+3 Redis Cluster with ``cluster``) whose messages a :class:`TokenrelayPublisher`
    writes; ``path`` + message id is a stream's path."""
    workdir = tempfile.mkdtemp(prefix="bench-")
    try:
        async with _redis_for(workdir, cluster) as (redis, url, pids, replica_pids):
            port = free_port()
            server_env = {
                **os.environ,
                "REDIS_URL": url,
                "TOKENRELAY_LOG_LEVEL": "warning",
                "TOKENRELAY_AUTH": "off",  # measured without access control
                **(env or {}),
            }
            if cwd is not None:  # its own code first, before this checkout's
                server_env["PYTHONPATH"] = str(cwd)
            argv = [*server_argv, "--port", str(port)]
            server = await spawn(argv, pin=pin, env=server_env, cwd=cwd)
            try:
                await wait_for_port(port, server, what)
                # The appends of every stream share round trips, as a worker process's do, and
                # the collector runs as in a worker process (`tokenrelay worker`).
                gc_policy.settle(Settings().gc_full_s)
                collecting = asyncio.create_task(gc_policy.collect())
                try:
                    async with append_batch(redis) as appends:
                        publisher = TokenrelayPublisher(redis, appends, coalesce_ms)
                        await publisher.create(streams)
                        paths = [path + m for m in publisher.message_ids]
                        yield Running(port, paths, server.pid, publisher, redis, pids, replica_pids)
                finally:
                    collecting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await collecting
                    gc_policy.release()
            finally:
                await stop(server)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def _redis_for(
    workdir: str, cluster: bool
) -> AsyncIterator[tuple[RedisClient, str, list[int], list[int]]]:
    """A private Redis (or Redis Cluster): a client, its URL, the pids of its primaries and of
    its replicas."""
    if not cluster:
        async with redis_server(workdir) as (redis, pid):
            port = redis.connection_pool.connection_kwargs["port"]
            yield redis, f"redis://127.0.0.1:{port}", [pid], []
        return
    nodes = await asyncio.to_thread(start_cluster, workdir)
    try:
        connector = RedisConnector(Settings(redis_url=nodes.url, redis_max_connections=64))
        try:
            primaries = set(nodes.primaries())
            pids = [nodes.processes[p].pid for p in primaries]
            replicas = [nodes.processes[p].pid for p in nodes.processes if p not in primaries]
            client = connector.client()
            await connector.ready()
            yield client, nodes.url, pids, replicas
        finally:
            await connector.aclose()
    finally:
        await asyncio.to_thread(nodes.stop)


async def command_counts(redis: RedisClient) -> dict[str, int]:
    """Commands each primary has served since its stats were reset, per node (the
    benchmark's own INFO calls left out)."""
    if isinstance(redis, RedisCluster):
        per_node = await redis.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
    else:
        per_node = {"redis": await redis.info("commandstats")}
    return {
        node: sum(int(v["calls"]) for k, v in stats.items() if k not in _OWN_COMMANDS)
        for node, stats in per_node.items()
    }


async def reset_stats(redis: RedisClient) -> None:
    if isinstance(redis, RedisCluster):
        await redis.config_resetstat(target_nodes=RedisCluster.ALL_NODES)
    else:
        await redis.config_resetstat()


_OWN_COMMANDS = {"cmdstat_info", "cmdstat_config|resetstat", "cmdstat_cluster|slots",
                 "cmdstat_cluster|shards", "cmdstat_command", "cmdstat_ping"}  # fmt: skip
