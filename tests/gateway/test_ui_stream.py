"""The AI SDK's chat stream, driven by the ai package's own DefaultChatTransport in Node.js:
an answer asked on one gateway, the page gone mid-answer, resumed on mount from another,
204 once nothing is in progress, and stop."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.native import node_script
from shared.messages import prompt_of
from shared.settings import Settings
from tests.support import Stack, parse_sse, start_stack
from worker.backends.mock import mock_text

NODE_SOURCES = Path(__file__).parents[1] / "node"
QUESTION = "What does a resumable stream need?"


@pytest.fixture(scope="module")
def chat_client() -> Path:
    """The Node.js script, with the ai package (and the Node.js it needs) installed."""
    return node_script("ui_chat.mjs", NODE_SOURCES)


async def _node(script: Path, *args: str, key: str | None = None) -> dict[str, Any]:
    env = {**os.environ, **({"TOKENRELAY_KEY": key} if key else {})}
    node = script.parent / "node_modules" / ".bin" / "node"
    process = await asyncio.create_subprocess_exec(
        str(node),
        str(script),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


def _deltas(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


@pytest.fixture
async def two_gateways(settings: Settings) -> AsyncIterator[tuple[Stack, Stack]]:
    paced = dataclasses.replace(settings, mock_token_delay_ms=5, default_max_tokens=120)
    async with start_stack(paced) as asked, start_stack(paced, worker=False) as other:
        yield asked, other


@pytest.mark.usefixtures("redis")
async def test_a_chat_resumes_on_another_gateway_with_the_sdks_own_transport(
    chat_client: Path, two_gateways: tuple[Stack, Stack]
) -> None:
    asked, other = two_gateways
    expected = mock_text(prompt_of([{"role": "user", "content": QUESTION}]), 120)
    gone = await _node(chat_client, asked.url, "ask", "chat-1", QUESTION, "5")
    assert [c["type"] for c in gone["chunks"][:3]] == ["start", "start-step", "text-start"]
    assert expected.startswith(_deltas(gone["chunks"]))
    resumed = await _node(chat_client, other.url, "resume", "chat-1")
    chunks = resumed["chunks"]
    assert chunks[0] == {"type": "start", "messageId": gone["chunks"][0]["messageId"]}
    assert [c["type"] for c in chunks[-3:]] == ["text-end", "finish-step", "finish"]
    assert chunks[-1]["finishReason"] == "length"  # the mock stops at max_tokens
    assert _deltas(chunks) == resumed["text"] == expected
    # Once the answer is over, nothing is in progress: the SDK is told so with a 204.
    assert await _node(chat_client, other.url, "resume", "chat-1") == {"status": 204}
    assert await _node(chat_client, asked.url, "resume", "never-asked") == {"status": 204}


@pytest.mark.usefixtures("redis")
async def test_stop_ends_the_answer_for_every_reader(chat_client: Path, settings: Settings) -> None:
    slow = dataclasses.replace(settings, mock_token_delay_ms=30, default_max_tokens=1000)
    async with start_stack(slow) as stack, stack.client() as client:
        asking = asyncio.ensure_future(_node(chat_client, stack.url, "ask", "chat-2", QUESTION))
        # The SDK's request is in when the chat has an answer in progress.
        for _ in range(1000):
            async with client.stream("GET", "/api/chat/chat-2/stream") as following:
                if following.status_code == 200:
                    break
            await asyncio.sleep(0.02)
        stopped = await client.post("/api/chat/chat-2/stop")
        answer = await asking
    assert stopped.status_code == 202
    assert answer["chunks"][-1] == {"type": "abort", "reason": "requested"}
    assert len(_deltas(answer["chunks"])) < len(mock_text(QUESTION, 1000))


async def test_bad_chat_requests_are_refused_by_name(stack: Stack) -> None:
    async with stack.client() as client:
        for body, needle in (
            ({"id": "bad id!", "messages": []}, "chat id"),
            ({"id": "c", "messages": []}, "messages"),
            ({"id": "c", "messages": [{"role": "robot", "parts": []}]}, "role"),
            ({"id": "c", "messages": [{"role": "user", "parts": [{"type": "text"}]}]}, "text"),
            ({"id": "c", "messages": [{"role": "user", "parts": []}]}, "no text"),
            (
                {"id": "c", "messages": [{"role": "user", "parts": [{"type": "file"}]}]},
                "no text",
            ),
        ):
            answer = await client.post("/api/chat", json=body)
            assert answer.status_code == 400
            assert needle in answer.json()["error"]["message"]
        raw = await client.post(
            "/api/chat",
            json={
                "id": "c3",
                "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}],
            },
        )
        assert raw.headers["x-vercel-ai-ui-message-stream"] == "v1"
        assert parse_sse(raw.content).events[-1].data == "[DONE]"
        assert (await client.post("/api/chat/c9/stop")).status_code == 204
        assert (await client.get("/api/chat/bad%20id/stream")).status_code == 400
