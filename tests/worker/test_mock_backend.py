"""The mock model: deterministic, paced, and able to fail on request."""

from __future__ import annotations

import pytest

from shared.errors import ModelError
from worker.backends.base import Choice, GenerationRequest, Usage
from worker.backends.mock import MockBackend, mock_text, mock_tokens


async def _collect(backend: MockBackend, prompt: str, max_tokens: int) -> list[str]:
    pieces = [piece async for piece in backend.stream(GenerationRequest(prompt, max_tokens))]
    *tokens, finish, usage = pieces
    assert finish == Choice({"delta": {}, "finish_reason": "length"})
    prompt_tokens = len(prompt.split())
    assert usage == Usage(
        {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": max_tokens,
            "total_tokens": prompt_tokens + max_tokens,
        }
    )
    assert all(isinstance(token, str) for token in tokens)
    return [str(token) for token in tokens]


async def test_output_is_a_pure_function_of_prompt_and_max_tokens() -> None:
    backend = MockBackend(token_delay_s=0)
    first = await _collect(backend, "same prompt", 50)
    assert first == await _collect(backend, "same prompt", 50) == mock_tokens("same prompt", 50)
    assert len(first) == 50
    assert first != await _collect(backend, "other prompt", 50)
    # A longer answer extends the shorter one, as a real model's would.
    assert (await _collect(backend, "same prompt", 80))[:50] == first
    assert mock_text("same prompt", 50) == "".join(first)


def test_vocabulary_exercises_escaping() -> None:
    text = mock_text("escape me", 4000)
    for needle in ('"', "\\", "\n", "\r\n", "é", "🙂", "data:"):
        assert needle in text


async def test_fail_after_raises_a_model_error_after_n_tokens() -> None:
    backend = MockBackend(token_delay_s=0, fault_injection=True)
    tokens: list[str] = []

    async def consume() -> None:
        async for token in backend.stream(GenerationRequest("x [[fail_after=3]]", 10)):
            tokens.append(str(token))

    with pytest.raises(ModelError, match="after 3 tokens"):
        await consume()
    assert tokens == mock_tokens("x [[fail_after=3]]", 10)[:3]


async def test_without_fault_injection_the_hooks_are_ordinary_text() -> None:
    backend = MockBackend(token_delay_s=0)
    prompt = "x [[fail_after=1]] [[crash_after=2]]"
    tokens = [str(token) async for token in backend.stream(GenerationRequest(prompt, 10))]
    assert tokens[:10] == mock_tokens(prompt, 10)
