"""Per-key quotas, enforced atomically in Redis so that every gateway sees the same counts.

Two limits are counted: generations running or queued at once (a sorted set of message ids per
key; the worker removes a message when it ends, and each entry also stops counting after
``hold_ms`` in case that end is never reported) and the ``max_tokens`` admitted per minute (a
counter per key and minute). One script checks both and admits or refuses, so 100 requests
racing for 10 places admit exactly 10. Both keys carry the key's hash tag: one slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared import keys
from shared.api_keys import ApiKey
from shared.redis_client import RedisClient

_WINDOW_MS = 60_000

# KEYS: active set, this minute's token counter.
# ARGV: now (ms), message id, max concurrent (0: none), hold (ms), tokens per minute (0: none),
#       this request's tokens, the window's end (ms).
_ADMIT = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local active = redis.call('ZCARD', KEYS[1])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local max_active, tpm, tokens = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
if max_active > 0 and active >= max_active then return {'concurrency', active, used} end
if tpm > 0 and used + tokens > tpm then return {'tokens', active, used} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('INCRBY', KEYS[2], tokens)
redis.call('PEXPIREAT', KEYS[2], tonumber(ARGV[7]) + 1000)
return {'ok', active + 1, used + tokens}
"""


@dataclass(frozen=True, slots=True)
class Admitted:
    """What a request's admission decided, and the counts after it (for ``x-ratelimit-*``)."""

    #: ``ok``, or the limit that refused it: ``concurrency`` or ``tokens``.
    outcome: str
    active: int
    tokens_used: int
    #: Milliseconds until the tokens-per-minute window starts again.
    window_reset_ms: int

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


async def admit(
    redis: RedisClient, key: ApiKey, message_id: str, tokens: int, *, hold_ms: int
) -> Admitted:
    """Count a request of ``key`` for ``tokens`` against its limits, or refuse it (nothing
    counted). A key without these limits is admitted without a Redis call."""
    now = time.time_ns() // 1_000_000
    window_end = (now // _WINDOW_MS + 1) * _WINDOW_MS
    max_active, tpm = key.limits.max_concurrent or 0, key.limits.tokens_per_minute or 0
    if not max_active and not tpm:
        return Admitted("ok", 0, 0, window_end - now)
    quota_keys = (keys.quota_active(key.key_id), keys.quota_tokens(key.key_id, now // _WINDOW_MS))
    reply = await redis.eval(
        _ADMIT, 2, *quota_keys, now, message_id, max_active, hold_ms, tpm, tokens, window_end
    )
    outcome = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    return Admitted(outcome, int(reply[1]), int(reply[2]), window_end - now)


async def release(redis: RedisClient, key_id: str, message_id: str) -> None:
    """The message ended: it no longer counts against its key's concurrency."""
    await redis.zrem(keys.quota_active(key_id), message_id)
