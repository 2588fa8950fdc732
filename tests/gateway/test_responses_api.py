"""The Responses API through the official openai client: streamed and not, background,
resumed with starting_after after a dropped connection, retrieved, cancelled twice."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from shared.messages import prompt_of
from shared.settings import Settings
from tests.support import Stack, parse_sse, start_stack
from worker.backends.mock import mock_text

INPUT = "Tell me about resumable streams"
PROMPT = prompt_of([{"role": "user", "content": INPUT}])


@pytest.fixture
async def running(settings: Settings) -> AsyncIterator[tuple[Stack, openai.AsyncOpenAI]]:
    paced = dataclasses.replace(settings, mock_token_delay_ms=5)
    async with start_stack(paced) as stack:
        client = openai.AsyncOpenAI(api_key="any", base_url=f"{stack.url}/v1", max_retries=0)
        try:
            yield stack, client
        finally:
            await client.close()


def _text(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def test_a_streamed_response_has_the_documented_sequence(
    running: tuple[Stack, openai.AsyncOpenAI],
) -> None:
    _, client = running
    stream = await client.responses.create(
        model="tokenrelay-mock", input=INPUT, max_output_tokens=30, stream=True
    )
    events: list[Any] = [event async for event in stream]
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # the mock always stops at max_output_tokens
    ]
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers))
    assert _text(events) == mock_text(PROMPT, 30)
    assert events[-4].text == mock_text(PROMPT, 30)
    final = events[-1].response
    assert final.output_text == mock_text(PROMPT, 30)
    assert final.incomplete_details is not None
    assert final.usage is not None
    assert final.usage.output_tokens == 30


async def test_a_background_stream_resumes_after_a_dropped_connection(
    running: tuple[Stack, openai.AsyncOpenAI],
) -> None:
    _, client = running
    stream = await client.responses.create(
        model="tokenrelay-mock", input=INPUT, max_output_tokens=200, background=True, stream=True
    )
    seen: list[Any] = []
    async for event in stream:
        seen.append(event)
        if len(seen) == 12:
            break  # the connection drops
    await stream.close()
    response_id = seen[0].response.id
    cursor = seen[-1].sequence_number
    resumed = await client.responses.retrieve(response_id, stream=True, starting_after=cursor)
    rest: list[Any] = [event async for event in resumed]
    assert rest[0].sequence_number > cursor
    whole = await client.responses.create(
        model="tokenrelay-mock", input=INPUT, max_output_tokens=200
    )
    assert _text(seen) + _text(rest) == whole.output_text == mock_text(PROMPT, 200)
    retrieved = await client.responses.retrieve(response_id)
    assert retrieved.status == "incomplete"
    assert retrieved.output_text == whole.output_text


async def test_background_without_stream_answers_at_once_and_cancel_is_idempotent(
    running: tuple[Stack, openai.AsyncOpenAI],
) -> None:
    _, client = running
    queued = await client.responses.create(
        model="tokenrelay-mock", input=INPUT, max_output_tokens=3000, background=True
    )
    assert queued.status in ("queued", "in_progress")
    assert (await client.responses.retrieve(queued.id)).status in ("queued", "in_progress")
    first = await client.responses.cancel(queued.id)
    second = await client.responses.cancel(queued.id)
    assert first.status == second.status == "cancelled"
    events: list[Any] = [e async for e in await client.responses.retrieve(queued.id, stream=True)]
    assert events[-1].response.status == "cancelled"
    assert (await client.responses.retrieve(queued.id)).status == "cancelled"


async def test_instructions_and_message_items_and_a_finished_cancel(
    running: tuple[Stack, openai.AsyncOpenAI],
) -> None:
    _, client = running
    answer = await client.responses.create(
        model="tokenrelay-mock",
        instructions="Be brief.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": INPUT}]}],
        max_output_tokens=12,
    )
    asked = prompt_of(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": INPUT}]
    )
    assert answer.output_text == mock_text(asked, 12)
    with pytest.raises(openai.ConflictError):
        await client.responses.cancel(answer.id)


async def test_the_object_reports_what_was_asked_now_and_when_retrieved(
    running: tuple[Stack, openai.AsyncOpenAI],
) -> None:
    _, client = running
    asked: dict[str, Any] = {
        "instructions": "Be brief.",
        "max_output_tokens": 16,
        "temperature": 0.5,
        "top_p": 0.9,
        "metadata": {"ticket": "T-1"},
    }
    answer = await client.responses.create(model="tokenrelay-mock", input=INPUT, **asked)
    retrieved = await client.responses.retrieve(answer.id)
    for reported in (answer, retrieved):
        assert reported.background is False
        assert {name: getattr(reported, name) for name in asked} == asked
    queued = await client.responses.create(model="m", input=INPUT, background=True)
    assert queued.background is True
    assert queued.max_output_tokens is None  # not asked: the server's default applies
    await client.responses.cancel(queued.id)
    # Streamed as asked, a response runs at once; only in the background is it queued first.
    foreground: list[Any] = [
        e
        async for e in await client.responses.create(
            model="m", input=INPUT, max_output_tokens=3, stream=True
        )
    ]
    assert foreground[0].response.status == "in_progress"
    background: list[Any] = [
        e
        async for e in await client.responses.create(
            model="m", input=INPUT, max_output_tokens=3, stream=True, background=True
        )
    ]
    assert background[0].response.status == "queued"
    with pytest.raises(openai.BadRequestError, match="store"):
        await client.responses.create(model="m", input=INPUT, background=True, store=False)


async def test_what_is_not_supported_is_named(running: tuple[Stack, openai.AsyncOpenAI]) -> None:
    _, client = running
    with pytest.raises(openai.BadRequestError, match="tools"):
        await client.responses.create(
            model="m",
            input="x",
            tools=[{"type": "function", "name": "f", "parameters": {}}],  # type: ignore[list-item]
        )
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        await client.responses.create(model="m", input="x", previous_response_id="resp_1")
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_" + "A" * 22)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("nonsense")


async def test_last_event_id_resumes_a_responses_stream_too(
    running: tuple[Stack, openai.AsyncOpenAI],
) -> None:
    stack, _ = running
    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as http:
        created = await http.post(
            "/v1/responses",
            json={"model": "m", "input": INPUT, "max_output_tokens": 20, "stream": True},
        )
        events = parse_sse(created.content).events
        with_ids = [e for e in events if e.id]
        response_id = "resp_" + created.headers["x-message-id"]
        cursor = with_ids[5].id or ""
        resumed = await http.get(
            f"/v1/responses/{response_id}",
            params={"stream": "true"},
            headers={"Last-Event-ID": cursor},
        )
        rest = parse_sse(resumed.content).events
    assert [e.data for e in rest] == [e.data for e in events[events.index(with_ids[5]) + 1 :]]
