"""``Idempotency-Key``: a request repeated with the same key (by the same tenant, within the
message's lifetime) answers the message the first one created, and never starts a second
generation. Clients send one with every POST and may then retry it freely: after a timeout,
a dropped connection, a 5xx.

The key maps to the message id and a fingerprint of the request (its path and body); a repeat
with another body is refused (422), as it is a different request under the same key.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson

from gateway.errors import ApiError
from shared import keys
from shared.messages import CREATED_MS
from shared.redis_client import RedisClient

MAX_KEY_CHARS = 255
# A repeat that arrives while the first request is still creating its message waits for it.
_CREATION_WAIT_S = 5.0


def fingerprint(path: str, body: dict[str, Any]) -> str:
    """What identifies a request under its key: its path and its body, keys in order."""
    return hashlib.sha256(
        path.encode() + b"\0" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


def check_key(value: str) -> str:
    """A client's key, or 400: 1-255 visible ASCII characters."""
    if not 1 <= len(value) <= MAX_KEY_CHARS or not value.isascii() or not value.isprintable():
        raise ApiError(
            400,
            f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable ASCII characters",
            param="Idempotency-Key",
        )
    return value


class Idempotency:
    """Claims keys for new messages and finds the messages of repeated ones."""

    def __init__(self, redis: RedisClient, *, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    def _key(self, tenant: str, client_key: str) -> str:
        return keys.idempotency(tenant, hashlib.sha256(client_key.encode()).hexdigest()[:32])

    async def claim(
        self, tenant: str, client_key: str, request_fingerprint: str, message_id: str
    ) -> str | None:
        """Record ``message_id`` as this key's message and return None, or return the message
        an earlier request with this key created (422 when that request was another one)."""
        key = self._key(tenant, client_key)
        value = f"{message_id} {request_fingerprint}"
        if await self._redis.set(key, value, nx=True, ex=self._ttl_s):
            return None
        raw = await self._redis.get(key)
        if raw is None:  # released meanwhile (the first request failed): this one goes ahead
            return await self.claim(tenant, client_key, request_fingerprint, message_id)
        earlier, _, earlier_fingerprint = (
            raw.decode() if isinstance(raw, bytes) else raw
        ).partition(" ")
        if earlier_fingerprint != request_fingerprint:
            raise ApiError(
                422,
                "this Idempotency-Key was used for a different request (another path or body)",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        await self._created(earlier)
        return earlier

    async def release(self, tenant: str, client_key: str, message_id: str) -> None:
        """The request that claimed the key created nothing (it failed): free the key."""
        key = self._key(tenant, client_key)
        raw = await self._redis.get(key)
        if raw is not None and (raw.decode() if isinstance(raw, bytes) else raw).startswith(
            message_id + " "
        ):
            await self._redis.delete(key)

    async def _created(self, message_id: str) -> None:
        """Wait (a little) for the first request to create its message."""
        meta = keys.message_meta(message_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CREATION_WAIT_S
        while await self._redis.hget(meta, CREATED_MS) is None:
            if loop.time() > deadline:
                raise ApiError(
                    409,
                    "the request with this Idempotency-Key is still being accepted; retry",
                    code="idempotency_key_in_use",
                    retry_after_s=1,
                )
            await asyncio.sleep(0.05)
