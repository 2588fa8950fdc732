"""What the gateway asks of uvicorn: access lines only when they would be shown."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.server_options import uvicorn_options
from shared.settings import Settings
from tests.support import bounded
from tokenrelay.stack import free_port


async def _one_request(settings: Settings) -> None:
    async def hello(_: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    port = free_port()
    config = uvicorn.Config(
        Starlette(routes=[Route("/hello", hello)]),
        **uvicorn_options(settings, "127.0.0.1", port),
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/hello")
        assert response.text == "hello"
    finally:
        server.should_exit = True
        await bounded(serving, "stopping the server")


@pytest.mark.parametrize(("level", "logged"), [("info", True), ("debug", True), ("warning", False)])
async def test_access_lines_follow_the_log_level(
    level: str, logged: bool, capfd: pytest.CaptureFixture[str]
) -> None:
    await _one_request(Settings(log_level=level))
    out, err = capfd.readouterr()
    assert ('"GET /hello HTTP/1.1" 200' in out + err) is logged
    # uvicorn builds a request's access-log arguments only when this logger has handlers.
    assert logging.getLogger("uvicorn.access").hasHandlers() is logged


def test_the_graceful_shutdown_is_bounded_by_the_grace_setting() -> None:
    options = uvicorn_options(Settings(shutdown_grace_s=2.5), "0.0.0.0", 8000)
    assert options["timeout_graceful_shutdown"] == 3
    assert (options["host"], options["port"], options["log_level"]) == ("0.0.0.0", 8000, "info")
