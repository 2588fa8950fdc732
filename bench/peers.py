"""The peers measured beside tokenrelay: a naive sse-starlette gateway, Nchan, a C floor
server, and Vercel's resumable-stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bench import native
from bench.servers import (
    SERVER_CORE,
    Running,
    on_redis,
    redis_server,
    spawn,
    stop,
    wait_for_port,
)
from tokenrelay.local_redis import free_port


@dataclass
class Naive:
    """sse-starlette with one XREAD BLOCK per client, on the same streams and publisher."""

    name: str = "naive"

    def start(self, streams: int) -> contextlib.AbstractAsyncContextManager[Running]:
        argv = [
            sys.executable, "-m", "uvicorn", "--factory", "bench.naive_app:create_app",
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
        return on_redis(
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
        self.renewals = 0

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
        server = await spawn(
            [nginx, "-c", conf, "-p", workdir, "-e", f"{workdir}/error.log"], pin=SERVER_CORE
        )
        try:
            await wait_for_port(port, server, "nginx")
            publisher = NchanPublisher(port)
            await publisher.connect()
            try:
                paths = [f"/sub/{i}" for i in range(streams)]
                yield Running(port, paths, server.pid, publisher)
            finally:
                await publisher.close()
        finally:
            await stop(server)
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
        if process.stdin is None:
            raise RuntimeError("the server was started without a pipe to its stdin")
        self._stdin = process.stdin
        self.writes = 0
        self.renewals = 0

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
        server = await spawn(
            [str(native.program("floor")), str(port), str(streams)],
            pin=SERVER_CORE,
            stdin=asyncio.subprocess.PIPE,
        )
        try:
            await wait_for_port(port, server, "the floor server")
            paths = [f"/s/{i}" for i in range(streams)]
            yield Running(port, paths, server.pid, LinePublisher(server))
        finally:
            if server.stdin is not None:
                server.stdin.close()
            await stop(server)


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
            async with redis_server(workdir) as (redis, redis_pid):
                port = free_port()
                redis_port = redis.connection_pool.connection_kwargs["port"]
                env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}"}
                server = await spawn(
                    [node, str(script), str(port), str(streams)],
                    pin=SERVER_CORE,
                    stdin=asyncio.subprocess.PIPE,
                    env=env,
                )
                try:
                    await wait_for_port(port, server, "the resumable-stream server")
                    paths = [f"/s/{i}" for i in range(streams)]
                    publisher = LinePublisher(server)
                    yield Running(
                        port, paths, server.pid, publisher, redis, [redis_pid], commands_per_write=0
                    )
                finally:
                    if server.stdin is not None:
                        server.stdin.close()
                    await stop(server)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
