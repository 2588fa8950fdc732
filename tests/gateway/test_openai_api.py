"""The OpenAI-compatible API, checked with the official openai package as the client."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from shared import keys
from shared.messages import prompt_of
from shared.redis_client import RedisClient
from shared.settings import Settings
from tests.support import ON_BOTH, Stack, parse_sse, queued_jobs, read_stream, start_stack
from worker.backends.mock import mock_text

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How do resumable streams work?"},
]


def _client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


@ON_BOTH
async def test_streaming_matches_non_streaming_with_role_finish_and_usage(stack: Stack) -> None:
    client = _client(stack)
    stream = await client.chat.completions.create(
        model="tokenrelay-mock",
        messages=MESSAGES,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    whole = await client.chat.completions.create(
        model="tokenrelay-mock", messages=MESSAGES, max_tokens=30
    )
    await client.close()
    expected = mock_text(prompt_of([dict(m) for m in MESSAGES]), 30)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 30
    *body, usage_chunk = chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert body[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in body) == expected
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in body)
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 30
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 30


async def test_without_include_usage_there_is_no_usage_chunk(stack: Stack) -> None:
    client = _client(stack)
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=5, stream=True
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert all(c.choices for c in chunks)
    assert chunks[0].model == "m"


async def test_errors_arrive_as_the_packages_own_exceptions(stack: Stack) -> None:
    client = _client(stack)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="m", messages=MESSAGES, temperature=5)
    assert bad.value.status_code == 400
    assert bad.value.param == "temperature"
    assert bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        await client.get("/chat/completions/AAAAAAAAAAAAAAAAAAAAAA/stream", cast_to=httpx.Response)

    async def consume_failing_stream() -> None:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x [[fail_after=3]]"}], stream=True
        )
        async for _ in stream:
            pass

    with pytest.raises(openai.APIError, match="mock model failed after 3 tokens"):
        await consume_failing_stream()
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "[[fail_after=1]]"}]
        )
    await client.close()
    # One shape streamed or not, and no retry of a failure that would happen again.
    assert failed.value.code == "model_error"
    assert failed.value.type == "server_error"
    assert failed.value.response.headers["x-should-retry"] == "false"


async def test_a_deterministic_failure_is_generated_once_by_a_retrying_client(
    stack: Stack, redis: RedisClient
) -> None:
    client = openai.AsyncOpenAI(api_key="x", base_url=f"{stack.url}/v1", max_retries=2)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "[[fail_after=1]]"}]
        )
    await client.close()
    assert len([k async for k in redis.scan_iter(match="tr:{*}:meta")]) == 1


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "messages", "missing_required_parameter"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        ({"messages": MESSAGES, "max_tokens": "9"}, "max_tokens", "invalid_type"),
        (
            {"messages": MESSAGES, "max_completion_tokens": 0},
            "max_completion_tokens",
            "invalid_value",
        ),
        ({"messages": MESSAGES, "top_p": 2}, "top_p", "decimal_out_of_range"),
        ({"messages": MESSAGES, "n": 2}, "n", "invalid_value"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"messages": MESSAGES, "stream": "yes"}, "stream", "invalid_type"),
        (
            {"messages": [{"role": "user", "content": "y" * 200_000}]},
            "messages",
            "context_length_exceeded",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages[0].content[0].text",
            "invalid_type",
        ),
        (
            {"messages": [{"role": "user", "content": [None]}]},
            "messages[0].content[0]",
            "invalid_type",
        ),
        (
            {"messages": [{"role": "user", "content": [["text"]]}]},
            "messages[0].content[0]",
            "invalid_type",
        ),
        ({"messages": MESSAGES, "model": "m" * 257}, "model", "invalid_value"),
    ],
)
async def test_invalid_requests_get_openai_errors(
    stack: Stack, body: dict[str, Any], param: str, code: str
) -> None:
    async with stack.client() as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]


async def test_unparseable_body_is_an_openai_400(stack: Stack) -> None:
    async with stack.client() as client:
        response = await client.post(
            "/v1/chat/completions", content=b"{oops", headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_every_error_of_the_openai_routes_has_an_openai_type(stack: Stack) -> None:
    """OpenAI's clients know invalid_request_error and server_error; the gateway's own name
    of an error moves to its code there (the seed routes keep their names)."""
    missing = "A" * 22
    async with stack.client() as client:
        json = {"Content-Type": "application/json"}
        answers = {
            "not_found": await client.get(f"/v1/chat/completions/{missing}/stream"),
            "bad_request": await client.get(
                f"/v1/chat/completions/{missing}/stream", headers={"Last-Event-ID": "x"}
            ),
            "method_not_allowed": await client.delete("/v1/chat/completions"),
            "invalid_json": await client.post("/v1/responses", content=b"{", headers=json),
            "invalid_request": await client.post(
                "/v1/chat/completions", content=b"[1, 2]", headers=json
            ),
        }
        for path in (f"/v1/responses/resp_{missing}", "/v1/responses/resp_doesnotexist"):
            answers[f"not_found {path}"] = await client.get(path)
        seed = await client.get(f"/chat/stream/{missing}")
    for name, answer in answers.items():
        error = answer.json()["error"]
        code = name.partition(" ")[0]
        assert (error["type"], error["code"]) == ("invalid_request_error", code), answer.text
    assert seed.json()["error"]["type"] == "not_found"


@ON_BOTH
async def test_every_frame_resumes_in_the_chunk_format_usage_included(stack: Stack) -> None:
    async with stack.client() as client:
        response, raw = await read_stream(
            client,
            "POST",
            "/v1/chat/completions",
            json={
                "messages": MESSAGES,
                "max_tokens": 12,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        message_id = response.headers["x-message-id"]
        full = parse_sse(raw).events
        assert full[-1].data == "[DONE]"
        assert all(e.id for e in full)  # unlike OpenAI, every frame is a resume position
        assert "usage" in orjson.loads(full[-2].data)
        for index, event in enumerate(full[:-1]):
            _, rest = await read_stream(
                client,
                "GET",
                f"/v1/chat/completions/{message_id}/stream",
                headers={"Last-Event-ID": event.id or ""},
            )
            assert parse_sse(rest).events == full[index + 1 :], index
        done = await client.get(
            f"/v1/chat/completions/{message_id}/stream",
            headers={"Last-Event-ID": full[-1].id or ""},
        )
        assert done.status_code == 204


async def test_message_id_header_reaches_the_openai_client(stack: Stack) -> None:
    client = _client(stack)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, max_tokens=3
    )
    completion = raw.parse()
    await client.close()
    assert completion.id == f"chatcmpl-{raw.headers['x-message-id']}"


@pytest.mark.usefixtures("redis")
async def test_seed_and_openai_formats_read_the_same_message(settings: Settings) -> None:
    async with (
        start_stack(dataclasses.replace(settings, coalesce_ms=0)) as stack,
        stack.client() as client,
    ):
        response, raw = await read_stream(
            client,
            "POST",
            "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 8, "stream": True},
        )
        message_id = response.headers["x-message-id"]
        _, seed = await read_stream(client, "GET", f"/chat/stream/{message_id}")
    seed_text = "".join(orjson.loads(e.data)["content"] for e in parse_sse(seed).events[:-1])
    assert seed_text == mock_text(prompt_of([dict(m) for m in MESSAGES]), 8)
    assert parse_sse(raw).events[-1].data == "[DONE]"


async def test_redis_key_count_is_bounded(stack: Stack, redis: RedisClient) -> None:
    client = _client(stack)
    await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
    await client.close()
    # One message: its stream and meta hash, and the jobs stream (empty once acknowledged).
    assert len(await redis.keys("tr:{*")) == 2


@pytest.mark.usefixtures("redis")
async def test_heartbeats_do_not_trip_the_openai_package(settings: Settings) -> None:
    """A pause longer than the heartbeat interval (a slow model) must not break the client."""
    pausing = dataclasses.replace(settings, heartbeat_s=0.1, mock_token_delay_ms=500.0)
    async with start_stack(pausing) as stack:
        client = _client(stack)
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=3, stream=True
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == mock_text(
        prompt_of([dict(m) for m in MESSAGES]), 3
    )


@pytest.mark.usefixtures("redis")
async def test_trimmed_history_and_vanished_messages_are_errors_to_the_sdk(
    settings: Settings, redis: RedisClient
) -> None:
    trimmed = dataclasses.replace(settings, stream_maxlen=5, heartbeat_s=0.2)
    async with start_stack(trimmed) as stack, stack.client() as client:
        response, raw = await read_stream(
            client,
            "POST",
            "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 12, "stream": True},
        )
        message_id = response.headers["x-message-id"]
        first = parse_sse(raw).events[0].id
        _, resumed = await read_stream(
            client,
            "GET",
            f"/v1/chat/completions/{message_id}/stream",
            headers={"Last-Event-ID": first or ""},
        )
        assert (
            orjson.loads(parse_sse(resumed).events[0].data)["error"]["code"] == "history_truncated"
        )
    async with (
        start_stack(trimmed, worker=False) as stack,
        stack.client() as client,
        client.stream(
            "POST", "/v1/chat/completions", json={"messages": MESSAGES, "stream": True}
        ) as response,
    ):
        message_id = response.headers["x-message-id"]
        await redis.delete(keys.message_meta(message_id), keys.message_stream(message_id))
        raw = await asyncio.wait_for(response.aread(), 5)
    assert orjson.loads(parse_sse(raw).events[-1].data)["error"]["code"] == "message_lost"


async def test_bad_requests_write_nothing(stack: Stack, redis: RedisClient) -> None:
    """Refused before any write: a pass-through field nested past what a message can hold,
    content parts of the wrong shape, an overlong model."""
    nested: Any = "deep"
    for _ in range(300):
        nested = [nested]
    bodies = [
        {"messages": MESSAGES, "metadata": {"x": nested}},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
        {"messages": MESSAGES, "model": "m" * 10_000},
    ]
    async with stack.client() as client:
        for body in bodies:
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["type"] == "invalid_request_error"
    assert await redis.keys("tr:{*}:meta") == []
    assert await queued_jobs(redis) == 0


async def test_the_openai_client_resumes_a_chat_stream_after_the_chunks_it_has(
    stack: Stack,
) -> None:
    """The README's example: the client keeps SSE ids to itself, so it resumes by count."""
    client = openai.AsyncOpenAI(api_key="x", base_url=f"{stack.url}/v1", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, max_tokens=30, stream=True
    )
    message_id = raw.headers["x-message-id"]
    chunks = raw.parse()
    have: list[str] = []
    async for chunk in chunks:
        have.append(chunk.choices[0].delta.content or "")
        if len(have) == 10:
            break  # the connection drops
    await chunks.close()
    rest = await client.get(
        f"/chat/completions/{message_id}/stream",
        cast_to=ChatCompletionChunk,
        options={"params": {"after_chunk": len(have)}},
        stream=True,
        stream_cls=openai.AsyncStream[ChatCompletionChunk],
    )
    async for chunk in rest:
        have.extend(choice.delta.content or "" for choice in chunk.choices)
    with pytest.raises(openai.BadRequestError, match="no chunk 999"):
        await client.get(
            f"/chat/completions/{message_id}/stream",
            cast_to=httpx.Response,
            options={"params": {"after_chunk": 999}},
        )
    for not_a_count in ("\u00b2", "\u0661", "-1", "1e3"):  # superscript 2, Arabic-Indic 1
        with pytest.raises(openai.BadRequestError, match="must be a count of chunks"):
            await client.get(
                f"/chat/completions/{message_id}/stream",
                cast_to=httpx.Response,
                options={"params": {"after_chunk": not_a_count}},
            )
    await client.close()
    assert "".join(have) == mock_text(prompt_of([dict(m) for m in MESSAGES]), 30)
