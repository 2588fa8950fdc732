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
import uvicorn
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.hub import Hub
from gateway.protocol import GatewayProtocol
from shared.redis_client import RedisConnector
from shared.settings import Settings
from tokenrelay.stack import free_port
from worker import service


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
async def serve(app: Starlette, *, http: Any = GatewayProtocol) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free port inside the test's loop; yield its URL.

    ``http`` is uvicorn's protocol: the gateway's, as in production, unless a test asks for
    uvicorn's own ("httptools").
    """
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=1,
        http=http,
    )
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
    http: Any = GatewayProtocol,
) -> AsyncIterator[Stack]:
    """Start a gateway on a free port (and a worker unless ``worker=False``); ``http``: see
    :func:`serve`."""
    app = create_app(settings, lambda: RedisConnector(settings, embedded=embedded), demo=True)
    async with serve(app, http=http) as url:
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
    """A TCP proxy to a local port whose :meth:`cut` drops every connection it carries."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.connections = 0
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((writer, up_writer))
        pipes = (
            asyncio.create_task(_pipe(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        )
        self._pipes.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for stream_writer in (writer, up_writer):
            stream_writer.transport.abort()
            self._writers.discard(stream_writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
