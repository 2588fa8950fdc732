"""The upstream backend over real HTTP: another tokenrelay as the upstream, and a scripted
OpenAI-compatible server for every way an upstream fails."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.messages import prompt_of
from shared.redis_client import RedisClient
from shared.settings import Settings
from tests.support import Stack, parse_sse, read_stream, serve, start_stack
from tokenrelay.local_redis import free_port
from worker.backends.mock import mock_text

TOOL_CHUNKS: list[dict[str, Any]] = [
    {
        "delta": {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": ""},
                }
            ],
        }
    },
    {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]}},
    {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"redis"}'}}]}},
    {"delta": {}, "finish_reason": "tool_calls"},
]
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def _frame(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _chunk(choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "up-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": [{"index": 0, **choice}],
    }


async def _tools() -> AsyncIterator[bytes]:
    for choice in TOOL_CHUNKS:
        yield _frame(_chunk(choice))
    yield _frame({**_chunk({}), "choices": [], "usage": USAGE})
    yield b"data: [DONE]\n\n"


async def _malformed() -> AsyncIterator[bytes]:
    yield _frame(_chunk({"delta": {"content": "fine "}}))
    yield b"data: {not json\n\n"


async def _cut() -> AsyncIterator[bytes]:
    yield _frame(_chunk({"delta": {"content": "half "}}))


async def _stall() -> AsyncIterator[bytes]:
    yield _frame(_chunk({"delta": {"content": "then silence"}}))
    await asyncio.sleep(30)


async def _midway_error() -> AsyncIterator[bytes]:
    yield _frame(_chunk({"delta": {"content": "a"}}))
    yield _frame({"error": {"message": "overloaded"}})


async def _slow() -> AsyncIterator[bytes]:
    for i in range(200):
        yield _frame(_chunk({"delta": {"content": f"{i} "}}))
        await asyncio.sleep(0.02)
    yield b"data: [DONE]\n\n"


_STREAMS = {
    "tools": _tools,
    "malformed": _malformed,
    "cut": _cut,
    "stall": _stall,
    "midway-error": _midway_error,
    "slow": _slow,
}


async def _scripted(request: Request) -> Response:
    """An OpenAI-compatible server whose behaviour the request's model names."""
    body = await request.json()
    model = body.get("model")
    request.app.state.requests.append(body)
    if model == "refuse":
        return JSONResponse(
            {
                "error": {
                    "message": "model 'refuse' does not exist",
                    "type": "invalid_request_error",
                }
            },
            404,
        )
    if model == "crash":
        return JSONResponse({"error": {"message": "the server had an error"}}, 500)
    if model == "json":
        return JSONResponse({"hello": "not a stream"})
    return StreamingResponse(_STREAMS[model](), media_type="text/event-stream")


@contextlib.asynccontextmanager
async def scripted_upstream() -> AsyncIterator[tuple[str, Starlette]]:
    app = Starlette(routes=[Route("/v1/chat/completions", _scripted, methods=["POST"])])
    app.state.requests = []
    async with serve(app) as url:
        yield f"{url}/v1", app


def _relay_settings(settings: Settings, base_url: str, **changes: Any) -> Settings:
    return dataclasses.replace(
        settings, backend="openai", upstream_base_url=base_url, upstream_timeout_s=1.0, **changes
    )


async def _completion(stack: Stack, model: str, *, stream: bool = True) -> tuple[list[Any], bytes]:
    async with stack.client() as client:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        _, raw = await read_stream(client, "POST", "/v1/chat/completions", json=body)
    if not stream:
        return [], raw
    return [orjson.loads(e.data) for e in parse_sse(raw).events if e.data != "[DONE]"], raw


async def test_relays_another_tokenrelay_end_to_end(settings: Settings, redis: RedisClient) -> None:
    upstream_settings = dataclasses.replace(
        settings, redis_url=settings.effective_redis_url[:-1] + "1"
    )
    async with start_stack(upstream_settings) as upstream:
        relay = _relay_settings(settings, f"{upstream.url}/v1", coalesce_ms=0)
        async with start_stack(relay) as stack, stack.client() as client:
            messages = [{"role": "user", "content": "relay me"}]
            _, raw = await read_stream(
                client,
                "POST",
                "/v1/chat/completions",
                json={
                    "model": "tokenrelay-mock",
                    "messages": messages,
                    "max_tokens": 25,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            )
            _, seed = await read_stream(
                client, "POST", "/chat/stream", json={"prompt": "relay me", "max_tokens": 25}
            )
    chunks = [orjson.loads(e.data) for e in parse_sse(raw).events if e.data != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == mock_text(prompt_of(messages), 25)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 25
    seed_text = "".join(orjson.loads(e.data)["content"] for e in parse_sse(seed).events[:-1])
    assert seed_text == mock_text(
        "user: relay me", 25
    )  # a plain prompt goes up as one user message
    del redis


@pytest.mark.usefixtures("redis")
async def test_every_delta_field_reaches_the_client_unchanged(settings: Settings) -> None:
    async with (
        scripted_upstream() as (url, upstream),
        start_stack(_relay_settings(settings, url)) as stack,
    ):
        chunks, _ = await _completion(stack, "tools")
        _, whole = await _completion(stack, "tools", stream=False)
    relayed = [
        {k: v for k, v in c["choices"][0].items() if k != "index"} for c in chunks if c["choices"]
    ]
    expected = [{"logprobs": None, "finish_reason": None, **choice} for choice in TOOL_CHUNKS]
    assert relayed == expected
    assert chunks[-1]["usage"] == USAGE
    message = orjson.loads(whole)["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"q": "redis"}'},
        }
    ]
    sent = upstream.state.requests[0]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


@pytest.mark.usefixtures("redis")
@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ("refuse", "upstream answered 404: model 'refuse' does not exist"),
        ("crash", "upstream answered 500: the server had an error"),
        ("json", "did not answer with an event stream"),
        ("malformed", "malformed chunk"),
        ("cut", "ended before [DONE]"),
        ("stall", "timed out"),
        ("midway-error", "upstream error: overloaded"),
    ],
)
async def test_upstream_failures_end_the_message_with_an_error(
    settings: Settings, model: str, fragment: str
) -> None:
    async with (
        scripted_upstream() as (url, _),
        start_stack(_relay_settings(settings, url)) as stack,
    ):
        _, raw = await _completion(stack, model)
        events = parse_sse(raw).events
        error = orjson.loads(events[-1].data)["error"]
        assert (error["type"], error["code"]) == ("server_error", "upstream_error")
        assert fragment in error["message"]
        # The worker is healthy and takes the next job.
        chunks, _ = await _completion(stack, "tools")
        assert chunks[-1]["usage"] == USAGE


@pytest.mark.usefixtures("redis")
async def test_unreachable_upstream_is_an_error_event(settings: Settings) -> None:
    async with start_stack(
        _relay_settings(settings, f"http://127.0.0.1:{free_port()}/v1")
    ) as stack:
        _, raw = await _completion(stack, "anything")
    error = orjson.loads(parse_sse(raw).events[-1].data)["error"]
    assert (error["type"], error["code"]) == ("server_error", "upstream_error")
    assert "unreachable" in error["message"]


async def _comments_only() -> AsyncIterator[bytes]:
    for _ in range(100):
        yield b": keep-alive\n\n"
        await asyncio.sleep(0.2)


async def _running_usage() -> AsyncIterator[bytes]:
    for i in range(1, 4):
        usage = {"prompt_tokens": 2, "completion_tokens": i, "total_tokens": 2 + i}
        yield _frame(
            {
                **_chunk({"delta": {"role": "assistant", "content": f"{i} ", "tool_calls": None}}),
                "usage": usage,
            }
        )
    yield _frame({**_chunk({"delta": {}, "finish_reason": "stop"}), "usage": USAGE})
    yield b"data: [DONE]\n\n"


_STREAMS["comments"] = _comments_only
_STREAMS["running-usage"] = _running_usage


@pytest.mark.usefixtures("redis")
async def test_keep_alive_comments_do_not_hold_a_dead_upstream_open(settings: Settings) -> None:
    async with (
        scripted_upstream() as (url, _),
        start_stack(_relay_settings(settings, url)) as stack,
    ):
        _, raw = await _completion(stack, "comments")
    error = orjson.loads(parse_sse(raw).events[-1].data)["error"]
    assert "sent no data" in error["message"]


@pytest.mark.usefixtures("redis")
async def test_running_usage_is_relayed_once_and_text_still_coalesces(settings: Settings) -> None:
    relay = _relay_settings(settings, "", coalesce_ms=0)
    async with (
        scripted_upstream() as (url, _),
        start_stack(dataclasses.replace(relay, upstream_base_url=url)) as stack,
    ):
        chunks, _ = await _completion(stack, "running-usage")
    usage_chunks = [c for c in chunks if not c["choices"]]
    assert [c["usage"] for c in usage_chunks] == [USAGE]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    # After the first, text apart from nulls and a repeated role counts as text (merged by the
    # coalescing window, which is off here).
    assert deltas[:3] == [
        {"role": "assistant", "content": "1 ", "tool_calls": None},  # the first, relayed as sent
        {"content": "2 "},
        {"content": "3 "},
    ]


@pytest.mark.usefixtures("redis")
async def test_limits_reach_the_upstream_only_as_the_client_set_them(settings: Settings) -> None:
    async with (
        scripted_upstream() as (url, upstream),
        start_stack(_relay_settings(settings, url)) as stack,
        stack.client() as client,
    ):
        for extra in ({}, {"max_completion_tokens": 7}):
            body = {"model": "tools", "messages": [{"role": "user", "content": "hi"}], **extra}
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    unlimited, limited = upstream.state.requests
    assert "max_tokens" not in unlimited
    assert "max_completion_tokens" not in unlimited
    assert limited["max_completion_tokens"] == 7
    assert "max_tokens" not in limited


@pytest.mark.usefixtures("redis")
async def test_an_upstream_refusal_keeps_its_status_when_not_streamed(settings: Settings) -> None:
    async with (
        scripted_upstream() as (url, _),
        start_stack(_relay_settings(settings, url)) as stack,
        stack.client() as client,
    ):
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "refuse", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "does not exist" in response.json()["error"]["message"]
