"""The interface every model backend implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What a backend is asked to generate."""

    #: The whole request as text (the mock model answers this).
    prompt: str
    max_tokens: int
    #: Chat messages for a real model; None means one user message with ``prompt``.
    messages: list[dict[str, Any]] | None = None
    model: str | None = None
    #: Other request fields (temperature, top_p, stop, user, ...) passed through unchanged.
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Choice:
    """A choice object (``delta``, ``finish_reason``, ``logprobs``...) to relay as it is."""

    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of the whole generation (an OpenAI ``usage`` object)."""

    fields: dict[str, Any]


#: What a backend yields: answer text (merged by the coalescing window), or a structured piece.
Piece = str | Choice | Usage


class ModelBackend(Protocol):
    """Streams one answer as it is generated.

    ``stream`` yields pieces in order; it raises :class:`shared.errors.ModelError` when the model
    fails, after which the worker ends the message with an error event. Closing the iterator
    early (``aclose``, on cancellation) must release what the backend holds for that request,
    such as an upstream HTTP response. :meth:`aclose` releases the backend itself.
    """

    def stream(self, request: GenerationRequest) -> AsyncIterator[Piece]: ...

    async def aclose(self) -> None: ...
