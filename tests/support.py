"""Test helpers: an in-process gateway + worker on real sockets, and an SSE parser."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from gateway.admission import Admission
from gateway.app import create_app
from gateway.hub import Hub
from gateway.server import served, uvicorn_options
from shared import keys
from shared.redis_client import RedisClient, RedisConnector
from shared.settings import Settings
from tokenrelay.local_redis import free_port
from worker import service

#: Partitions of the jobs queue in the tests' settings.
PARTITIONS = Settings().job_partitions
#: Runs a test on the one Redis and on the Redis Cluster.
ON_BOTH = pytest.mark.parametrize("redis_kind", ["standalone", "cluster"], indirect=True)


def jobs_stream(message_id: str) -> str:
    """The jobs partition stream a message's job goes to."""
    return keys.jobs_stream(keys.job_partition(message_id, PARTITIONS), PARTITIONS)


async def queued_jobs(redis: RedisClient) -> int:
    """Jobs in every partition stream."""
    lengths = [await redis.xlen(keys.jobs_stream(p, PARTITIONS)) for p in range(PARTITIONS)]
    return sum(lengths)


@dataclass
class SseEvent:
    """One dispatched SSE event, as a browser EventSource would see it."""

    data: str
    event: str = "message"
    id: str | None = None


@dataclass
class SseParse:
    events: list[SseEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None


def parse_sse(raw: bytes) -> SseParse:
    """Parse an event stream as the WHATWG rules say (CRLF, LF or CR end a line; an event cut
    off by the end of the stream is dropped)."""
    text = raw.decode("utf-8").removeprefix("\ufeff")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    result = SseParse()
    data: list[str] = []
    event_type = ""
    last_id: str | None = None
    for line in lines[:-1]:  # the text after the last line break is an incomplete line
        if line == "":
            if data:
                result.events.append(SseEvent("\n".join(data), event_type or "message", last_id))
            data, event_type = [], ""
            continue
        if line.startswith(":"):
            result.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isdigit():
            result.retry = int(value)
    return result


async def bounded(task: asyncio.Task[None], what: str, timeout_s: float = 20.0) -> None:
    """Await a shutdown step; if it hangs, fail with the stack of every pending task (the hung
    one included: it is not cancelled before its stack is taken)."""
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        task.result()
        return
    stacks = io.StringIO()
    for pending in asyncio.all_tasks():
        pending.print_stack(file=stacks)
    task.cancel()
    raise AssertionError(f"{what} took over {timeout_s} s; pending tasks:\n{stacks.getvalue()}")


@dataclass
class Stack:
    """A running gateway (and optionally a worker) inside the test's event loop."""

    url: str
    app: Starlette
    settings: Settings
    worker_stop: asyncio.Event | None = None

    @property
    def hub(self) -> Hub:
        hub: Hub = self.app.state.gateway.hub
        return hub

    @property
    def admission(self) -> Admission:
        admission: Admission = self.app.state.gateway.admission
        return admission

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(20.0), **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def run_worker(
    settings: Settings, connector: RedisConnector | None = None
) -> AsyncIterator[None]:
    """A worker running until the block exits."""
    stop = asyncio.Event()
    task = asyncio.create_task(service.serve(settings, connector or RedisConnector(settings), stop))
    try:
        yield
    finally:
        stop.set()
        await bounded(task, "stopping the worker")


@contextlib.asynccontextmanager
async def serve(
    app: Starlette, settings: Settings | None = None, **overrides: Any
) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free port inside the test's loop; yield its URL. With
    ``settings``, as ``tokenrelay gateway`` serves the gateway (``overrides``: other uvicorn
    options); without, as uvicorn serves any app."""
    port = free_port()
    options: dict[str, Any] = {"host": "127.0.0.1", "port": port, "ws": "none"}
    if settings is not None:
        options = uvicorn_options(settings, "127.0.0.1", port)
    options.update({"log_level": "warning", "timeout_graceful_shutdown": 1, **overrides})
    config = uvicorn.Config(served(app) if settings is not None else app, **options)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    for _ in range(1000):
        if server.started:
            break
        if serving.done():
            serving.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await bounded(serving, "stopping the server")


@contextlib.asynccontextmanager
async def start_stack(
    settings: Settings,
    *,
    worker: bool = True,
    embedded: fakeredis.FakeServer | None = None,
    linger_s: float | None = None,
    **overrides: Any,
) -> AsyncIterator[Stack]:
    """Start a gateway on a free port (and a worker unless ``worker=False``); ``overrides``:
    see :func:`serve`."""
    app = create_app(settings, lambda: RedisConnector(settings, embedded=embedded), demo=True)
    async with serve(app, settings, **overrides) as url:
        stack = Stack(url, app, settings)
        if linger_s is not None:
            stack.hub.linger_s = linger_s
        if worker:
            async with run_worker(settings, RedisConnector(settings, embedded=embedded)):
                yield stack
        else:
            yield stack


async def read_stream(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: object
) -> tuple[httpx.Response, bytes]:
    """Send a request and read its whole (event-stream) body."""
    async with client.stream(method, url, **kwargs) as response:  # type: ignore[arg-type]
        body = await response.aread()
    return response, body


async def post_stream(
    client: httpx.AsyncClient, prompt: str, max_tokens: int
) -> tuple[str, SseParse, bytes]:
    """POST /chat/stream and read it to the end: (message id, parsed, raw body)."""
    response, body = await read_stream(
        client,
        "POST",
        "/chat/stream",
        json={"prompt": prompt, "stream": True, "max_tokens": max_tokens},
        headers={"Accept": "text/event-stream"},
    )
    assert response.status_code == 200, body
    return response.headers["x-message-id"], parse_sse(body), body


def content_of(parsed: SseParse) -> str:
    """The text carried by a parsed stream's chunk events."""
    import orjson

    return "".join(
        orjson.loads(e.data)["content"]
        for e in parsed.events
        if e.event == "message" and e.data != "[DONE]"
    )


async def eventually(predicate: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, checking every 10 ms; fail after ``timeout_s``."""
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout_s} s")


async def post_and_hang_up(stack: Stack, body: dict[str, object]) -> str:
    """POST /chat/stream, read until the first event, hang up; the message id."""
    async with (
        stack.client() as client,
        client.stream("POST", "/chat/stream", json=body) as response,
    ):
        message_id = response.headers["x-message-id"]
        async for chunk in response.aiter_bytes():
            if b"data:" in chunk:
                break
    return message_id


class CuttingProxy:
    """A TCP proxy to a local port whose :meth:`cut` drops every connection it carries, and
    whose :meth:`freeze` makes them go silent without closing (a half-open connection: a phone
    that lost its network). ``hold_s`` delays the first bytes of every answer (a busy server)."""

    def __init__(self, target_port: int, *, hold_s: float = 0.0) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.connections = 0
        self.hold_s = hold_s
        self._frozen: set[asyncio.StreamWriter] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()  # an abrupt RST, as a network that vanishes

    def freeze(self) -> None:
        self._frozen |= self._writers

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((writer, up_writer))
        pipes = (
            asyncio.create_task(self._pipe(reader, up_writer, 0.0)),
            asyncio.create_task(self._pipe(up_reader, writer, self.hold_s)),
        )
        self._pipes.update(pipes)
        done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        if writer in self._frozen and pipes[0] not in done:
            await pipes[0]  # a frozen connection ends only when its client leaves
        for stream_writer in (writer, up_writer):
            stream_writer.transport.abort()
            self._writers.discard(stream_writer)
            self._frozen.discard(stream_writer)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold_s: float
    ) -> None:
        with contextlib.suppress(ConnectionError):
            first = await reader.read(65536)
            await asyncio.sleep(hold_s)
            data = first
            while data:
                if writer not in self._frozen:
                    writer.write(data)
                    await writer.drain()
                data = await reader.read(65536)
