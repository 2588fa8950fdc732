"""Model backends. ``create_backend`` picks one from the settings."""

from __future__ import annotations

from shared.settings import Settings
from worker.backends.base import GenerationRequest, ModelBackend
from worker.backends.mock import MockBackend

__all__ = ["GenerationRequest", "MockBackend", "ModelBackend", "create_backend"]


def create_backend(settings: Settings) -> ModelBackend:
    """The backend named by ``TOKENRELAY_BACKEND``."""
    if settings.backend == "mock":
        return MockBackend(token_delay_s=settings.mock_token_delay_ms / 1000)
    raise AssertionError(f"unhandled backend {settings.backend!r}")  # settings validated the choice
