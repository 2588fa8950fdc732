"""Every setting, read once from the environment into a frozen object that is passed explicitly.

Each field documents its variable and default; ``SETTINGS_HELP`` renders them for ``--help`` and
the README table is generated from the same source (see ``tests/shared/test_settings.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_PREFIX = "TOKENRELAY_"
_log = logging.getLogger(__name__)


def _setting(
    default: Any, doc: str, *, minimum: float | None = None, choices: tuple[str, ...] = ()
) -> Any:
    return field(default=default, metadata={"doc": doc, "minimum": minimum, "choices": choices})


@dataclass(frozen=True, slots=True)
class Settings:
    """tokenrelay's configuration; build it with :meth:`from_env` (nothing else reads the env)."""

    redis_url: str | None = _setting(
        None,
        "Redis to use (`REDIS_URL`). Unset: `tokenrelay dev` embeds fakeredis, the others use "
        f"`{DEFAULT_REDIS_URL}`.",
    )
    heartbeat_s: float = _setting(
        15.0, "Seconds of silence before a stream gets a `: ping` comment.", minimum=0.05
    )
    retry_ms: int = _setting(
        2000, "Reconnect delay sent to clients as the SSE `retry:` hint.", minimum=0
    )
    stream_ttl_s: int = _setting(
        3600, "Seconds a message stays resumable after its last event (then 404).", minimum=1
    )
    stream_maxlen: int = _setting(
        10000,
        "Entries kept per message stream; older ones are trimmed (clients get `event: truncated`).",
        minimum=1,
    )
    coalesce_ms: float = _setting(
        50.0,
        "After the first chunk, tokens arriving within this window share one entry "
        "(0: one entry per token).",
        minimum=0,
    )
    mock_token_delay_ms: float = _setting(20.0, "The mock model's pause between tokens.", minimum=0)
    backend: str = _setting(
        "mock",
        "Model backend of the workers: the deterministic mock, or an OpenAI-compatible upstream.",
        choices=("mock", "openai"),
    )
    upstream_base_url: str | None = _setting(
        None, "With `openai`: the upstream API base, e.g. `http://127.0.0.1:8001/v1` (required)."
    )
    upstream_api_key: str | None = _setting(None, "With `openai`: the bearer token sent upstream.")
    upstream_model: str | None = _setting(
        None, "Model of requests that name none (set it on gateways and workers alike)."
    )
    upstream_timeout_s: float = _setting(
        60.0,
        "With `openai`: longest wait for the upstream's next byte before the message fails.",
        minimum=0.1,
    )
    cancel_grace_s: float = _setting(
        30.0, "`cancel_on_disconnect` messages stop after this long without any client.", minimum=1
    )
    max_prompt_chars: int = _setting(
        100_000, "Longest accepted prompt; longer ones get 413.", minimum=1
    )
    default_max_tokens: int = _setting(256, "`max_tokens` when a request names none.", minimum=1)
    max_tokens_limit: int = _setting(
        4096, "Largest accepted `max_tokens`; larger gets 422.", minimum=1
    )
    subscriber_backlog: int = _setting(
        256,
        "Events a slow client may have queued in a gateway; past it the client catches up "
        "from Redis instead.",
        minimum=1,
    )
    live_replay: int = _setting(
        512,
        "Latest events of each followed message a gateway keeps in memory: a client that joins "
        "or reconnects within them needs no Redis read (0: always read Redis; at most "
        "TOKENRELAY_STREAM_MAXLEN).",
        minimum=0,
    )
    worker_concurrency: int = _setting(
        32, "Generations one worker process runs at once.", minimum=1
    )
    job_lease_s: float = _setting(
        30.0,
        "A job whose worker shows no sign of life for this long is taken over by another "
        "(healthy workers renew their lease every third of it).",
        minimum=0.5,
    )
    job_max_attempts: int = _setting(
        3,
        "Deliveries after which a job that keeps losing its worker goes to the dead letters.",
        minimum=1,
    )
    job_block_ms: int = _setting(2000, "How long a worker's job read blocks in Redis.", minimum=10)
    redis_max_connections: int = _setting(
        64,
        "Redis connections per process for ordinary commands (callers queue beyond it).",
        minimum=2,
    )
    redis_timeout_s: float = _setting(
        10.0, "Socket timeout of Redis commands; kept above `job_block_ms`.", minimum=0.1
    )
    shutdown_grace_s: float = _setting(
        10.0, "Seconds a stopping process waits for open work.", minimum=0
    )
    log_level: str = _setting("info", "Log level.", choices=("debug", "info", "warning", "error"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read and validate every setting; raise :class:`ConfigError` naming the bad variable."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = env_name(f.name)
            raw = environ.get(name)
            if raw is None or (raw == "" and f.name != "redis_url"):
                continue
            values[f.name] = _parse(name, raw, f)
        for name in environ:
            if name.startswith(_PREFIX) and name not in _ENV_NAMES:
                _log.warning("ignoring unknown setting %s", name)
        settings = cls(**values)
        if settings.redis_timeout_s * 1000 <= settings.job_block_ms:
            raise ConfigError(
                "TOKENRELAY_REDIS_TIMEOUT_S must exceed TOKENRELAY_JOB_BLOCK_MS: redis-py fails a "
                "blocking read that lasts longer than the socket timeout"
            )
        if settings.default_max_tokens > settings.max_tokens_limit:
            raise ConfigError("TOKENRELAY_DEFAULT_MAX_TOKENS exceeds TOKENRELAY_MAX_TOKENS_LIMIT")
        if settings.backend == "openai" and not settings.upstream_base_url:
            raise ConfigError("TOKENRELAY_BACKEND=openai needs TOKENRELAY_UPSTREAM_BASE_URL")
        return settings

    @property
    def default_model(self) -> str:
        """The model of requests that name none."""
        return self.upstream_model or "tokenrelay-mock"

    @property
    def effective_redis_url(self) -> str:
        """The Redis URL the gateway and worker connect to."""
        return self.redis_url or DEFAULT_REDIS_URL


def env_name(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return "REDIS_URL" if field_name == "redis_url" else _PREFIX + field_name.upper()


_ENV_NAMES = frozenset(env_name(f.name) for f in dataclasses.fields(Settings))


def _parse(name: str, raw: str, f: dataclasses.Field[Any]) -> Any:
    kind: Callable[[str], Any] = {"int": int, "float": float}.get(str(f.type), str)
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    minimum = f.metadata["minimum"]
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} is below the minimum {minimum:g}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name}={raw!r} is not a finite number")
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return value


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, for ``--help`` and the README."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = "unset" if f.default is None else str(f.default)
        rows.append((env_name(f.name), default, f.metadata["doc"]))
    return rows


def settings_help() -> str:
    """The settings as plain text for ``--help`` epilogs."""
    lines = ["environment (read once at start):"]
    for name, default, doc in settings_table():
        lines.append(f"  {name} (default {default})\n      {doc.replace('`', '')}")
    return "\n".join(lines)
