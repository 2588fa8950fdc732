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
from shared.redis_url import Topology, parse_redis_url

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
        "Redis to use (`REDIS_URL`): `redis://host:port/db`, a cluster as "
        "`redis+cluster://host:port,host:port`, a Sentinel-managed primary as "
        "`redis+sentinel://host:port,host:port/name/db` (`rediss` for TLS). Unset: "
        f"`tokenrelay dev` embeds fakeredis, the others use `{DEFAULT_REDIS_URL}`.",
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
    live_replay_bytes: int = _setting(
        131_072,
        "Bytes of event data of each followed message a gateway keeps in memory at most (the "
        "oldest of TOKENRELAY_LIVE_REPLAY events go first); also bounds what a joining client "
        "is sent from memory at once.",
        minimum=1024,
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
    max_queued_jobs: int = _setting(
        10_000,
        "Jobs queued or generating past which gateways refuse new requests (503 with "
        "Retry-After) before writing anything.",
        minimum=1,
    )
    job_block_ms: int = _setting(2000, "How long a worker's job read blocks in Redis.", minimum=10)
    redis_max_connections: int = _setting(
        64,
        "Redis connections per process for ordinary commands (callers queue beyond it); on a "
        "cluster, ten times as many per node, a safety cap (redis-py's cluster client fails "
        "past it instead of queueing).",
        minimum=2,
    )
    redis_timeout_s: float = _setting(
        10.0, "Socket timeout of Redis commands; kept above `job_block_ms`.", minimum=0.1
    )
    send_timeout_s: float = _setting(
        30.0,
        "A client that reads nothing of what a gateway writes for this long is disconnected "
        "(it can resume).",
        minimum=0.1,
    )
    header_timeout_s: float = _setting(
        10.0,
        "A connection whose request head is not complete this long after it opened (or after "
        "its last answer) is closed.",
        minimum=0.1,
    )
    shutdown_grace_s: float = _setting(
        10.0, "Seconds a stopping process waits for open work.", minimum=0
    )
    job_partitions: int = _setting(
        16,
        "Streams the jobs are spread over (each its own cluster slot; every worker reads all). "
        "Gateways and workers must agree on it.",
        minimum=1,
    )
    read_from_replicas: bool = _setting(
        False,
        "Durable mode (a cluster or Sentinel with one replica per primary): gateways read "
        "streams and follow announcements on replicas, so a client is only sent events a "
        "replica holds, and a failover to it loses none of them.",
    )
    worker_metrics: str = _setting(
        "",
        "Where a worker serves Prometheus metrics, as host:port (empty: it serves none; "
        "gateways serve /metrics on their own port).",
    )
    log_level: str = _setting("info", "Log level.", choices=("debug", "info", "warning", "error"))
    gc_full_s: float = _setting(
        600.0,
        "Seconds between a gateway's or worker's full passes of the cyclic garbage collector "
        "(it pauses every stream; the passes in between only look at young objects).",
        minimum=1,
    )
    auth: str = _setting(
        "keys",
        "Access control: `keys` requires an API key to start a generation and a key of the "
        "message's tenant or its token to read or cancel it; `off` lets anyone do anything "
        "(what `tokenrelay dev` and `tokenrelay stack` run with).",
        choices=("keys", "off"),
    )
    api_keys_file: str = _setting(
        "",
        "A JSON file of API keys (`tokenrelay keys create --file`), read at start, for "
        "deployments without keys in Redis; keys in Redis are found first.",
    )
    token_secret: str = _setting(
        "",
        "Secret (32 characters or more) that signs per-message tokens; the same on every "
        "gateway. Required with `TOKENRELAY_AUTH=keys`.",
    )
    token_secret_previous: str = _setting(
        "",
        "The secret before the last rotation: tokens it signed are still accepted (keep it one "
        "`TOKENRELAY_TOKEN_TTL_S` after rotating, then remove it).",
    )
    token_ttl_s: int = _setting(86_400, "Lifetime of a per-message token, in seconds.", minimum=60)
    quota_hold_s: float = _setting(
        3600.0,
        "A generation counts against its key's concurrency until it ends, or at most this long "
        "(should its end never be reported).",
        minimum=1,
    )
    cors_origins: str = _setting(
        "",
        "Comma-separated origins (`https://app.example.com`) whose pages may call the gateway "
        "from a browser, with credentials (empty: no CORS headers at all).",
    )
    fault_injection: bool = _setting(
        False,
        "Lets the mock model obey `[[fail_after=N]]` and `[[crash_after=N]]` in prompts (for "
        "tests and the chaos harness); off, they are ordinary text.",
    )
    fast_path: bool = _setting(
        True,
        "Gateways write live events to client sockets themselves and answer stream GETs they "
        "can answer from memory without the ASGI stack (off: everything through plain ASGI).",
    )

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
        settings._check()
        return settings

    def _check(self) -> None:
        """The rules that tie settings together; ConfigError naming what is wrong."""
        target = parse_redis_url(self.effective_redis_url)  # ConfigError naming REDIS_URL
        if self.read_from_replicas and target.topology is Topology.STANDALONE:
            raise ConfigError(
                "TOKENRELAY_READ_FROM_REPLICAS needs replicas to read from: a REDIS_URL of a "
                "cluster (redis+cluster://) or of Sentinel (redis+sentinel://)"
            )
        if self.redis_max_connections <= self.job_partitions:
            raise ConfigError(
                "TOKENRELAY_REDIS_MAX_CONNECTIONS must exceed TOKENRELAY_JOB_PARTITIONS: a "
                "worker holds a blocked read on every partition"
            )
        if self.redis_timeout_s * 1000 <= self.job_block_ms:
            raise ConfigError(
                "TOKENRELAY_REDIS_TIMEOUT_S must exceed TOKENRELAY_JOB_BLOCK_MS: redis-py fails a "
                "blocking read that lasts longer than the socket timeout"
            )
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError("TOKENRELAY_DEFAULT_MAX_TOKENS exceeds TOKENRELAY_MAX_TOKENS_LIMIT")
        if self.backend == "openai" and not self.upstream_base_url:
            raise ConfigError("TOKENRELAY_BACKEND=openai needs TOKENRELAY_UPSTREAM_BASE_URL")
        if self.worker_metrics:
            self.worker_metrics_address()  # ConfigError naming TOKENRELAY_WORKER_METRICS
        if self.token_secret_previous and len(self.token_secret_previous) < 32:
            raise ConfigError("TOKENRELAY_TOKEN_SECRET_PREVIOUS must be 32 characters or more")
        for origin in self.cors_origin_list:
            if origin != origin.rstrip("/") or "://" not in origin:
                raise ConfigError(
                    f"TOKENRELAY_CORS_ORIGINS: {origin!r} is not an origin such as "
                    "https://app.example.com (scheme, host, optional port; no path)"
                )

    def check_gateway(self) -> None:
        """What only a gateway needs (a worker starts without it); ConfigError naming it."""
        if self.auth == "keys" and len(self.token_secret) < 32:
            raise ConfigError(
                "TOKENRELAY_AUTH=keys needs TOKENRELAY_TOKEN_SECRET of 32 characters or more "
                "(the same on every gateway; e.g. `openssl rand -base64 48`), or "
                "TOKENRELAY_AUTH=off to let anyone in"
            )

    @property
    def cors_origin_list(self) -> list[str]:
        """TOKENRELAY_CORS_ORIGINS as a list."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def worker_metrics_address(self) -> tuple[str, int]:
        """TOKENRELAY_WORKER_METRICS as (host, port)."""
        host, _, port = self.worker_metrics.rpartition(":")
        if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ConfigError(
                f"TOKENRELAY_WORKER_METRICS must be host:port, e.g. 127.0.0.1:9464 (got "
                f"{self.worker_metrics!r})"
            )
        return host.strip("[]"), int(port)

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
    kinds: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "bool": _boolean}
    kind = kinds.get(str(f.type), str)
    try:
        value = kind(raw.strip())
    except ValueError:
        what = "boolean (1/0, true/false)" if kind is _boolean else kind.__name__
        raise ConfigError(f"{name}={raw!r} is not a valid {what}") from None
    if isinstance(value, bool):
        return value
    minimum = f.metadata["minimum"]
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} is below the minimum {minimum:g}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name}={raw!r} is not a finite number")
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return value


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, for ``--help`` and the README."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = "unset" if f.default is None else str(f.default)
        if isinstance(f.default, bool):
            default = str(f.default).lower()
        rows.append((env_name(f.name), default, f.metadata["doc"]))
    return rows


def settings_help() -> str:
    """The settings as plain text for ``--help`` epilogs."""
    lines = ["environment (read once at start):"]
    for name, default, doc in settings_table():
        lines.append(f"  {name} (default {default})\n      {doc.replace('`', '')}")
    return "\n".join(lines)
