"""Model backends. ``create_backend`` picks one from the settings."""

from __future__ import annotations

from shared.errors import ConfigError
from shared.settings import Settings
from worker.backends.base import GenerationRequest, ModelBackend
from worker.backends.mock import MockBackend
from worker.backends.openai_upstream import OpenAIUpstream

__all__ = ["GenerationRequest", "MockBackend", "ModelBackend", "OpenAIUpstream", "create_backend"]


def create_backend(settings: Settings) -> ModelBackend:
    """The backend named by ``TOKENRELAY_BACKEND``."""
    if settings.backend == "mock":
        return MockBackend(
            token_delay_s=settings.mock_token_delay_ms / 1000,
            fault_injection=settings.fault_injection,
        )
    if settings.backend == "openai" and settings.upstream_base_url is not None:
        return OpenAIUpstream(
            base_url=settings.upstream_base_url,
            api_key=settings.upstream_api_key,
            model=settings.upstream_model,
            timeout_s=settings.upstream_timeout_s,
        )
    raise ConfigError(
        f"TOKENRELAY_BACKEND={settings.backend!r} needs settings it lacks (see tokenrelay --help)"
    )
