"""A stopping gateway hands its clients over: streams end with a retry hint, clients resume."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys

import httpx
import orjson
import pytest

from shared.redis_client import RedisClient
from shared.settings import Settings
from tests.support import SseEvent, eventually, parse_sse, read_stream, start_stack
from tokenrelay.local_redis import free_port
from worker.backends.mock import mock_text


@pytest.mark.usefixtures("redis")
async def test_draining_ends_streams_with_a_retry_hint_and_clients_resume_elsewhere(
    settings: Settings,
) -> None:
    paced = dataclasses.replace(settings, mock_token_delay_ms=20.0, retry_ms=123, coalesce_ms=0)
    async with start_stack(paced) as leaving, start_stack(paced, worker=False) as staying:
        async with (
            leaving.client() as client,
            client.stream(
                "POST", "/chat/stream", json={"prompt": "hand over", "max_tokens": 60}
            ) as response,
        ):
            message_id = response.headers["x-message-id"]
            raw = b""
            async for chunk in response.aiter_bytes():
                raw += chunk
                if raw.count(b"data:") == 5:
                    leaving.hub.drain()
        first = parse_sse(raw)
        assert raw.endswith(b"retry: 123\n: this gateway is shutting down; reconnect\n")
        assert first.events[-1].data != "[DONE]"  # ended early, not finished
        async with staying.client() as client:
            _, rest = await read_stream(
                client,
                "GET",
                f"/chat/stream/{message_id}",
                headers={"Last-Event-ID": first.events[-1].id or ""},
            )
    assert _text(first.events + parse_sse(rest).events) == mock_text("hand over", 60)


async def test_a_join_waiting_for_redis_when_draining_starts_is_sent_elsewhere(
    settings: Settings, redis: RedisClient
) -> None:
    """Not a 500 when the server's shutdown timeout cancels it: a retry hint, at once."""
    async with start_stack(settings) as stack, stack.client() as client:
        answered = await client.post(
            "/chat/stream", json={"prompt": "wait", "max_tokens": 3, "stream": False}
        )
        message_id = answered.json()["id"]
        await redis.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # its tail cannot start
        try:
            joining = asyncio.ensure_future(client.get(f"/chat/stream/{message_id}"))
            await eventually(lambda: message_id in stack.hub._tails)
            stack.hub.drain()
            response = await asyncio.wait_for(joining, 2)  # before Redis answers again
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
    assert response.status_code == 200
    assert response.text.startswith("retry: ")
    assert "shutting down" in response.text


def _text(events: list[SseEvent]) -> str:
    return "".join(orjson.loads(e.data)["content"] for e in events if e.data != "[DONE]")


@pytest.mark.usefixtures("redis")
async def test_sigterm_drains_a_gateway_process(settings: Settings) -> None:
    paced = dataclasses.replace(settings, mock_token_delay_ms=20.0, coalesce_ms=0)
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": paced.effective_redis_url,
        "TOKENRELAY_SHUTDOWN_GRACE_S": "30",
        "TOKENRELAY_AUTH": "off",
    }
    gateway = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenrelay",
        "gateway",
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with (
            start_stack(paced) as elsewhere,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            for _ in range(200):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            async with client.stream(
                "POST", "/chat/stream", json={"prompt": "sigterm", "max_tokens": 80}
            ) as response:
                message_id = response.headers["x-message-id"]
                raw = b""
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if raw.count(b"data:") == 5 and gateway.returncode is None:
                        gateway.send_signal(signal.SIGTERM)
            # The stream ended with the hint long before the 30 s grace, and the process exits.
            assert b": this gateway is shutting down; reconnect" in raw
            await asyncio.wait_for(gateway.wait(), 20)
            events = parse_sse(raw).events
            async with elsewhere.client() as other:
                _, rest = await read_stream(
                    other,
                    "GET",
                    f"/chat/stream/{message_id}",
                    headers={"Last-Event-ID": events[-1].id or ""},
                )
        assert _text(events + parse_sse(rest).events) == mock_text("sigterm", 80)
    finally:
        if gateway.returncode is None:
            gateway.kill()
        await gateway.wait()
