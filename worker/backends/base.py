"""The interface every model backend implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What a backend is asked to generate."""

    prompt: str
    max_tokens: int


class ModelBackend(Protocol):
    """Streams the text of one answer as it is generated.

    ``stream`` yields text pieces in order; it raises :class:`shared.errors.ModelError` when the
    model fails, after which the worker ends the message with an error event. Closing the
    iterator early (``aclose``) must release whatever the backend holds.
    """

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]: ...
