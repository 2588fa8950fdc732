"""The systems measured side by side, each started fresh for a run, and how tokens reach them.

Each system's server is pinned to core 0 (``taskset``); Redis, the load generator and the
publisher run on the other core (the harness pins itself there, and its children inherit it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from redis.asyncio import BlockingConnectionPool, Redis

from bench import native
from shared.messages import Job, new_message_id, submit
from shared.settings import Settings
from tokenrelay.stack import free_port, redis_server_argv
from worker.generation import _Chunker  # the worker's own coalescing rule
from worker.script_batch import ScriptBatch
from worker.stream_writer import StreamWriter, append_batch

_CORES = sorted(os.sched_getaffinity(0))
# The server under test gets one core, everything else (Redis, load, publisher) the other.
# With a single core there is nothing to pin (the smoke run in CI may have one).
SERVER_CORE: int | None = _CORES[0] if len(_CORES) >= 2 else None
LOAD_CORE: int | None = _CORES[1] if len(_CORES) >= 2 else None
_TTL_MS = 3_600_000
_MAXLEN = 100_000


class Publisher(Protocol):
    """Takes tokens and writes them as the system wants, each stream's in order."""

    writes: int  # entries (events) written so far

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
    redis: Redis | None = None
    redis_pid: int | None = None
    notes: list[str] = field(default_factory=list)
    #: Redis commands each publisher write costs (the worker's append script: its EVALSHA,
    #: and HMGET, XADD, HSET, 2 PEXPIRE and PUBLISH inside it); what Redis served beyond
    #: these is the system's own.
    commands_per_write: int = 7


class System(Protocol):
    name: str

    def start(self, streams: int) -> contextlib.AbstractAsyncContextManager[Running]: ...


async def _spawn(
    argv: list[str], *, pin: int | None, **kwargs: object
) -> asyncio.subprocess.Process:
    if pin is not None:
        argv = ["taskset", "-c", str(pin), *argv]
    return await asyncio.create_subprocess_exec(*argv, **kwargs)  # type: ignore[arg-type]


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _wait_for_port(port: int, process: asyncio.subprocess.Process, what: str) -> None:
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
async def _redis_server(workdir: str) -> AsyncIterator[tuple[Redis, int]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the benchmark needs redis-server (Debian package redis-server)")
    port = free_port()
    process = await _spawn(
        redis_server_argv(binary, port, workdir),
        pin=None,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        await _wait_for_port(port, process, "redis-server")
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
        await _stop(process)


class TokenrelayPublisher:
    """Writes tokens as a worker does: the append script, through the worker's coalescing."""

    def __init__(self, redis: Redis, appends: ScriptBatch, coalesce_ms: float) -> None:
        self._redis = redis
        self._appends = appends
        self._coalesce_s = coalesce_ms / 1000
        self.message_ids: list[str] = []
        self._chunkers: list[_Chunker] = []
        self._writers: list[StreamWriter] = []
        self.writes = 0

    async def create(self, streams: int) -> None:
        """Create the messages as the gateway does, and claim them as a worker does."""

        async def one() -> None:
            job = Job(message_id=new_message_id(), prompt="bench", max_tokens=1)
            await submit(self._redis, job, ttl_ms=_TTL_MS, model="bench")
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
        self.writes = sum(w.events_written for w in self._writers)

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
            self.writes = sum(w.events_written for w in self._writers)

    async def flush_all(self) -> None:
        await asyncio.gather(*(c.flush() for c in self._chunkers))
        self.writes = sum(w.events_written for w in self._writers)


@contextlib.asynccontextmanager
async def _on_redis(
    server_argv: list[str],
    what: str,
    path: str,
    *,
    streams: int,
    pin: int | None,
    coalesce_ms: float,
) -> AsyncIterator[Running]:
    """A server (``server_argv`` + ``--port P``) reading a private Redis whose messages a
    :class:`TokenrelayPublisher` writes; ``path`` + message id is a stream's path."""
    workdir = tempfile.mkdtemp(prefix="bench-")
    try:
        async with _redis_server(workdir) as (redis, redis_pid):
            port = free_port()
            redis_port = redis.connection_pool.connection_kwargs["port"]
            env = {
                **os.environ,
                "REDIS_URL": f"redis://127.0.0.1:{redis_port}",
                "TOKENRELAY_LOG_LEVEL": "warning",
            }
            server = await _spawn([*server_argv, "--port", str(port)], pin=pin, env=env)
            try:
                await _wait_for_port(port, server, what)
                # The appends of every stream share round trips, as a worker process's do.
                async with append_batch(redis) as appends:
                    publisher = TokenrelayPublisher(redis, appends, coalesce_ms)
                    await publisher.create(streams)
                    paths = [path + m for m in publisher.message_ids]
                    yield Running(port, paths, server.pid, publisher, redis, redis_pid)
            finally:
                await _stop(server)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Tokenrelay:
    """tokenrelay's gateway (one process) on a private Redis, fed through the worker's path."""

    coalesce_ms: float = 0.0
    name: str = "tokenrelay"
    workers: int = 1
    pinned: bool = True

    def start(self, streams: int) -> contextlib.AbstractAsyncContextManager[Running]:
        argv = [sys.executable, "-m", "tokenrelay", "gateway"]
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        return _on_redis(
            argv,
            "the tokenrelay gateway",
            "/chat/stream/",
            streams=streams,
            pin=SERVER_CORE if self.pinned else None,
            coalesce_ms=self.coalesce_ms,
        )


@dataclass
class Naive:
    """sse-starlette with one XREAD BLOCK per client, on the same streams and publisher."""

    name: str = "naive"

    def start(self, streams: int) -> contextlib.AbstractAsyncContextManager[Running]:
        argv = [
            sys.executable, "-m", "uvicorn", "--factory", "bench.naive_app:create_app",
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
        return _on_redis(
            argv, "the naive gateway", "/naive/", streams=streams, pin=SERVER_CORE, coalesce_ms=0
        )


_NGINX_CONF = """
load_module {module};
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  # The publisher keeps its connections: nginx would close each after 1,000 requests.
  keepalive_requests 100000000;
  keepalive_timeout 3600s;
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fastcgi;
  uwsgi_temp_path {workdir}/uwsgi;
  scgi_temp_path {workdir}/scgi;
  nchan_shared_memory_size 256M;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location ~ ^/sub/(\\d+)$ {{
      nchan_subscriber eventsource;
      nchan_channel_id $1;
    }}
    location ~ ^/pub/(\\d+)$ {{
      nchan_publisher;
      nchan_channel_id $1;
      nchan_message_buffer_length 2000;
      nchan_message_timeout 1h;
    }}
  }}
}}
"""
_NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"


class _Unbuffered:
    """A publisher that writes every token at once (nothing to flush)."""

    def next_flush(self) -> float | None:
        return None

    async def flush_due(self) -> None:
        return

    async def flush_all(self) -> None:
        return


class NchanPublisher(_Unbuffered):
    """POSTs each token to Nchan's publisher endpoint over a few keep-alive connections
    (a stream always on the same one, so its tokens stay in order)."""

    def __init__(self, port: int, connections: int = 4) -> None:
        self._port = port
        self._count = connections
        self._conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.writes = 0

    async def connect(self) -> None:
        for _ in range(self._count):
            self._conns.append(await asyncio.open_connection("127.0.0.1", self._port))

    async def close(self) -> None:
        for _, writer in self._conns:
            writer.close()
            await writer.wait_closed()

    async def publish(self, tokens: list[tuple[int, str]]) -> None:
        per_conn: list[list[tuple[int, str]]] = [[] for _ in self._conns]
        for stream, text in tokens:
            per_conn[stream % len(self._conns)].append((stream, text))
        await asyncio.gather(
            *(self._send(self._conns[i], batch) for i, batch in enumerate(per_conn) if batch)
        )
        self.writes += len(tokens)

    @staticmethod
    async def _send(
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], batch: list[tuple[int, str]]
    ) -> None:
        reader, writer = conn
        for stream, text in batch:
            body = text.encode()
            writer.write(
                b"POST /pub/%d HTTP/1.1\r\nHost: nchan\r\nContent-Length: %d\r\n\r\n%s"
                % (stream, len(body), body)
            )
        await writer.drain()
        for _ in batch:
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status >= 300:
                raise RuntimeError(f"nchan refused a publish: {head[:200]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)


@dataclass
class Nchan:
    """Debian's nginx with libnginx-mod-nchan: in-memory channels, EventSource subscribers."""

    name: str = "nchan"

    @contextlib.asynccontextmanager
    async def start(self, streams: int) -> AsyncIterator[Running]:
        nginx, workdir, port = _nchan_config()
        conf = f"{workdir}/nginx.conf"
        server = await _spawn(
            [nginx, "-c", conf, "-p", workdir, "-e", f"{workdir}/error.log"], pin=SERVER_CORE
        )
        try:
            await _wait_for_port(port, server, "nginx")
            publisher = NchanPublisher(port)
            await publisher.connect()
            try:
                paths = [f"/sub/{i}" for i in range(streams)]
                yield Running(port, paths, server.pid, publisher)
            finally:
                await publisher.close()
        finally:
            await _stop(server)
            shutil.rmtree(workdir, ignore_errors=True)


def _nchan_config() -> tuple[str, str, int]:
    """nginx's path, a fresh work directory holding nginx.conf, and the port it listens on."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not (Path(nginx).exists() and Path(_NCHAN_MODULE).exists()):
        raise RuntimeError("Nchan needs Debian's nginx and libnginx-mod-nchan")
    workdir = tempfile.mkdtemp(prefix="bench-nchan-")
    Path(workdir, "body").mkdir()  # nginx insists on its body buffer directory
    port = free_port()
    conf = _NGINX_CONF.format(module=_NCHAN_MODULE, workdir=workdir, port=port)
    Path(workdir, "nginx.conf").write_text(conf)
    return nginx, workdir, port


class LinePublisher(_Unbuffered):
    """Writes each token to the server's stdin as a line ``<stream> <text>``."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdin is not None
        self._stdin = process.stdin
        self.writes = 0

    async def publish(self, tokens: list[tuple[int, str]]) -> None:
        self._stdin.write(b"".join(b"%d %s\n" % (s, t.encode()) for s, t in tokens))
        await self._stdin.drain()
        self.writes += len(tokens)


@dataclass
class Floor:
    """A plain C server that write()s each event to every socket: what the kernel costs."""

    name: str = "floor"

    @contextlib.asynccontextmanager
    async def start(self, streams: int) -> AsyncIterator[Running]:
        port = free_port()
        server = await _spawn(
            [str(native.program("floor")), str(port), str(streams)],
            pin=SERVER_CORE,
            stdin=asyncio.subprocess.PIPE,
        )
        try:
            await _wait_for_port(port, server, "the floor server")
            paths = [f"/s/{i}" for i in range(streams)]
            yield Running(port, paths, server.pid, LinePublisher(server))
        finally:
            assert server.stdin is not None
            server.stdin.close()
            await _stop(server)


@dataclass
class ResumableStream:
    """Vercel's resumable-stream (npm) on a private Redis: one Node process produces every
    stream and serves its subscribers (``bench/node/resumable_server.mjs``)."""

    name: str = "resumable-stream"

    @contextlib.asynccontextmanager
    async def start(self, streams: int) -> AsyncIterator[Running]:
        script = native.node_script("resumable_server.mjs")
        node = shutil.which("node") or "node"
        workdir = tempfile.mkdtemp(prefix="bench-")
        try:
            async with _redis_server(workdir) as (redis, redis_pid):
                port = free_port()
                redis_port = redis.connection_pool.connection_kwargs["port"]
                env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}"}
                server = await _spawn(
                    [node, str(script), str(port), str(streams)],
                    pin=SERVER_CORE,
                    stdin=asyncio.subprocess.PIPE,
                    env=env,
                )
                try:
                    await _wait_for_port(port, server, "the resumable-stream server")
                    paths = [f"/s/{i}" for i in range(streams)]
                    publisher = LinePublisher(server)
                    yield Running(
                        port, paths, server.pid, publisher, redis, redis_pid, commands_per_write=0
                    )
                finally:
                    assert server.stdin is not None
                    server.stdin.close()
                    await _stop(server)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


ALL: dict[str, System] = {
    "tokenrelay": Tokenrelay(),
    # The worker's default coalescing window (TOKENRELAY_COALESCE_MS).
    "tokenrelay+coalescing": Tokenrelay(
        coalesce_ms=Settings.from_env({}).coalesce_ms, name="tokenrelay+coalescing"
    ),
    "naive": Naive(),
    "nchan": Nchan(),
    "floor": Floor(),
    "resumable-stream": ResumableStream(),
}
