"""A deterministic stand-in model for demos, benchmarks and tests.

Its answer is a pure function of the prompt and ``max_tokens``: the prompt seeds a generator of
word tokens, and the answer is its first ``max_tokens`` tokens (a longer answer extends a shorter
one, as a real model's would at temperature 0). The vocabulary includes quotes, backslashes,
newlines and non-ASCII text so that every path of the wire encoding is exercised.

After the last token it reports ``finish_reason: "length"`` (the answer is exactly
``max_tokens`` long) and usage: prompt tokens counted as whitespace-separated words.

Failing on purpose (only when ``TOKENRELAY_FAULT_INJECTION`` is on; otherwise these are
ordinary text): a prompt containing ``[[fail_after=N]]`` makes the backend raise
:class:`~shared.errors.ModelError` after ``N`` tokens. ``[[crash_after=N]]`` ends the whole
process after ``N`` tokens, with no cleanup (exit status 70), as a model that takes its worker
down would: a poison job, which must end in the dead letters.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import sys
from collections.abc import AsyncIterator

from shared.errors import ModelError
from worker.backends.base import Choice, GenerationRequest, Piece, Usage

_FAIL_AFTER = re.compile(r"\[\[fail_after=(\d{1,9})\]\]")
_CRASH_AFTER = re.compile(r"\[\[crash_after=(\d{1,9})\]\]")
CRASH_STATUS = 70

_WORDS = (
    "the",
    "a",
    "stream",
    "token",
    "relay",
    "model",
    "answer",
    "Redis",
    "gateway",
    "worker",
    "event",
    "client",
    "resume",
    "quickly",
    "every",
    "message",
    "is",
    "of",
    "and",
    "to",
    "in",
    "without",
    "gap",
    "duplicate",
    "café",
    "naïve",
    "Zürich",
    "日本語",
    "🙂",
    "—",
    '"quoted"',
    "back\\slash",
    "x<y>z",
    "50%",
    "it's",
    "data:",
    "id:",
    "über",
    "façade",
    "λ",
)
_ENDINGS = (".", ",", "!", "?", ":", ";", ".\n", ".\n\n", "\r\n")


def mock_tokens(prompt: str, max_tokens: int) -> list[str]:
    """The exact tokens the mock answers ``prompt`` with: tests compare against this."""
    rng = random.Random(hashlib.sha256(prompt.encode()).digest())
    tokens: list[str] = []
    while len(tokens) < max_tokens:
        word = rng.choice(_WORDS)
        tokens.append(word if not tokens else " " + word)
        if len(tokens) < max_tokens and rng.random() < 0.12:
            tokens.append(rng.choice(_ENDINGS))
    return tokens


def mock_text(prompt: str, max_tokens: int) -> str:
    """The whole answer of the mock to ``prompt``."""
    return "".join(mock_tokens(prompt, max_tokens))


class MockBackend:
    """Yields :func:`mock_tokens` one by one, ``token_delay_s`` apart."""

    def __init__(self, *, token_delay_s: float, fault_injection: bool = False) -> None:
        self._token_delay_s = token_delay_s
        self._fault_injection = fault_injection

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        """Generate the answer to ``request``; see the module docstring for failing on purpose."""
        fail_after = crash_after = None
        if self._fault_injection:
            fail = _FAIL_AFTER.search(request.prompt)
            fail_after = int(fail.group(1)) if fail else None
            crash = _CRASH_AFTER.search(request.prompt)
            crash_after = int(crash.group(1)) if crash else None
        tokens = mock_tokens(request.prompt, request.max_tokens)
        for index, token in enumerate(tokens):
            if index == fail_after:
                raise ModelError(f"mock model failed after {index} tokens, as the prompt asked")
            if index == crash_after:
                print(
                    f"mock model: crashing after {index} tokens, as the prompt asked",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(CRASH_STATUS)
            if index and self._token_delay_s:
                await asyncio.sleep(self._token_delay_s)
            yield token
        yield Choice({"delta": {}, "finish_reason": "length"})
        prompt_tokens = len(request.prompt.split())
        yield Usage(
            {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            }
        )

    async def aclose(self) -> None:
        """Nothing to release."""
