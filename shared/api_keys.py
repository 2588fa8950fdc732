"""API keys: what a key looks like, how it is stored (only a hash of its secret), and its
tenant and limits.

A key reads ``trk_<key id>_<secret>``. The key id is public (it names the key in
``tokenrelay keys list`` and ``revoke``, and in quotas); the secret is 256 random bits, kept
nowhere: a store holds its SHA-256, compared in constant time. A slow password hash would add
nothing here, as no dictionary guesses a random 256-bit secret.

Keys live in Redis (``tokenrelay keys create|list|revoke``; a revoked key is deleted, so every
gateway refuses it at its next request) or, for small deployments, in a JSON file read at start
(``TOKENRELAY_API_KEYS_FILE``, written by ``tokenrelay keys create --file``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared import keys
from shared.errors import ConfigError
from shared.redis_client import RedisClient

KEY_PREFIX = "trk_"
_KEY = re.compile(r"trk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LIMIT_NAMES = ("max_concurrent", "tokens_per_minute", "max_tokens", "max_prompt_chars")


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's limits (None: no limit of the key's own; the gateway's settings still apply)."""

    #: Generations of the key running or queued at once.
    max_concurrent: int | None = None
    #: ``max_tokens`` of the requests admitted within one minute (what they may generate).
    tokens_per_minute: int | None = None
    #: Largest ``max_tokens`` of one request.
    max_tokens: int | None = None
    #: Longest prompt of one request, in characters.
    max_prompt_chars: int | None = None

    @classmethod
    def from_dict(cls, value: object) -> Limits:
        """Limits from their JSON form; ValueError naming what is wrong."""
        if not isinstance(value, dict):
            raise ValueError("limits must be an object")
        unknown = set(value) - set(_LIMIT_NAMES)
        if unknown:
            raise ValueError(f"unknown limits: {', '.join(sorted(unknown))}")
        for name, limit in value.items():
            if limit is not None and (
                not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
            ):
                raise ValueError(f"limit {name} must be a positive integer or null")
        return cls(**value)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as a store holds it: never its secret, only the secret's hash."""

    key_id: str
    tenant: str
    secret_sha256: str
    limits: Limits = field(default_factory=Limits)
    created_ms: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.key_id,
            "tenant": self.tenant,
            "secret_sha256": self.secret_sha256,
            "limits": asdict(self.limits),
            "created_ms": self.created_ms,
        }

    @classmethod
    def from_dict(cls, value: object) -> ApiKey:
        """A key from its JSON form; ValueError naming what is wrong."""
        if not isinstance(value, dict):
            raise ValueError("a key must be an object")
        try:
            key_id, tenant, digest = value["id"], value["tenant"], value["secret_sha256"]
        except KeyError as exc:
            raise ValueError(f"a key needs {exc.args[0]!r}") from None
        if not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-f]{16}", key_id):
            raise ValueError(f"key id {key_id!r} is not 16 hex digits")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"secret_sha256 of key {key_id} is not 64 hex digits")
        check_tenant(tenant)
        created = value.get("created_ms", 0)
        return cls(key_id, tenant, digest, Limits.from_dict(value.get("limits", {})), int(created))

    def matches(self, secret: str) -> bool:
        """Whether ``secret`` is this key's, compared in constant time."""
        return hmac.compare_digest(self.secret_sha256, _sha256(secret))


def check_tenant(tenant: object) -> str:
    """``tenant`` if it is a valid tenant name; ValueError otherwise."""
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    return tenant


def new_key(tenant: str, limits: Limits) -> tuple[str, ApiKey]:
    """A new key: its text (shown once, stored nowhere) and what a store keeps of it."""
    check_tenant(tenant)
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    text = f"{KEY_PREFIX}{key_id}_{secret}"
    return text, ApiKey(key_id, tenant, _sha256(secret), limits, time.time_ns() // 1_000_000)


def parse_key(text: str) -> tuple[str, str] | None:
    """(key id, secret) of a key's text; None when it is not shaped like one."""
    match = _KEY.fullmatch(text)
    return (match.group(1), match.group(2)) if match else None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# Stores


async def store_key(redis: RedisClient, key: ApiKey) -> None:
    """Keep ``key`` in Redis (and in the index that ``list`` reads)."""
    await redis.set(keys.api_key(key.key_id), json.dumps(key.to_dict()))
    await redis.sadd(keys.api_key_index(), key.key_id)


async def load_key(redis: RedisClient, key_id: str) -> ApiKey | None:
    """The key ``key_id`` as stored in Redis; None when there is none (or it was revoked)."""
    raw = await redis.get(keys.api_key(key_id))
    return None if raw is None else ApiKey.from_dict(json.loads(raw))


async def list_keys(redis: RedisClient) -> list[ApiKey]:
    """Every key stored in Redis, oldest first."""
    members = await redis.smembers(keys.api_key_index())
    ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
    found = [key for key_id in ids if (key := await load_key(redis, key_id)) is not None]
    return sorted(found, key=lambda key: key.created_ms)


async def revoke_key(redis: RedisClient, key_id: str) -> bool:
    """Delete the key: every gateway refuses it from its next request on. False if unknown."""
    deleted = int(await redis.delete(keys.api_key(key_id)))
    await redis.srem(keys.api_key_index(), key_id)
    return deleted > 0


def read_key_file(path: str) -> dict[str, ApiKey]:
    """The keys of a JSON key file (a list of keys), by key id; ConfigError naming the problem."""
    try:
        value = json.loads(Path(path).read_text())
        if not isinstance(value, list):
            raise ValueError("the file must hold a JSON list of keys")
        found = [ApiKey.from_dict(item) for item in value]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"TOKENRELAY_API_KEYS_FILE={path!r}: {exc}") from None
    return {key.key_id: key for key in found}


def append_to_key_file(path: str, key: ApiKey) -> None:
    """Add ``key`` to a JSON key file (created if missing)."""
    file = Path(path)
    current = json.loads(file.read_text()) if file.exists() and file.read_text().strip() else []
    if not isinstance(current, list):
        raise ConfigError(f"{path} does not hold a JSON list of keys")
    current.append(key.to_dict())
    file.write_text(json.dumps(current, indent=2) + "\n")
    file.chmod(0o600)


def remove_from_key_file(path: str, key_id: str) -> bool:
    """Remove a key from a JSON key file (gateways stop accepting it when restarted)."""
    file = Path(path)
    current = json.loads(file.read_text())
    kept = [item for item in current if item.get("id") != key_id]
    file.write_text(json.dumps(kept, indent=2) + "\n")
    return len(kept) < len(current)
