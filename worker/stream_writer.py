"""Appends a message's events to its stream: fenced, idempotent, announced, expiring.

One Lua script per event does everything atomically on the message's slot:

- it refuses to write when the message no longer exists (expired or deleted: never resurrect),
  or when ``owner`` is not this attempt's token (a stale worker can never interleave tokens);
- it checks the expected sequence number, so redis-py's automatic retry of a call whose reply
  was lost cannot append the same event twice (the retry sees ``seq`` already advanced);
- it XADDs the entry, trims the stream to ``maxlen``, renews both keys' expiry, records the
  terminal entry id, and PUBLISHes the event on the message's channel for gateways.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from shared import keys
from shared.errors import TokenrelayError
from shared.events import Kind
from shared.messages import RUNNING

_APPEND = """
local meta = redis.call('HMGET', KEYS[2], 'owner', 'seq')
if not meta[2] then return {0, 'gone'} end
if meta[1] ~= ARGV[1] then return {0, 'fenced'} end
local n = tonumber(ARGV[2])
local seq = tonumber(meta[2])
if seq == n + 1 then return {2, 'duplicate'} end
if seq ~= n then return {0, 'sequence'} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[6], '*',
                      'n', ARGV[2], 'k', ARGV[3], 'd', ARGV[4])
if ARGV[3] == 'chunk' then
  redis.call('HSET', KEYS[2], 'seq', n + 1)
else
  redis.call('HSET', KEYS[2], 'seq', n + 1, 'status', ARGV[3], 'end', id)
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', KEYS[3], id .. ' ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
return {1, id}
"""

# Claim a queued message for one generation attempt. Issue-2 semantics: a message is generated
# once; a job redelivered for a message that already has an owner is not generated again.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if redis.call('HGET', KEYS[1], 'owner') ~= '' then return 'owned' end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'status', ARGV[2])
return 'ok'
"""


class WriteRefused(TokenrelayError):
    """The append script refused the write: the message is gone or another attempt owns it."""


class StreamWriter:
    """Writes one message's events in order for one generation attempt."""

    def __init__(
        self, redis: Redis, message_id: str, owner: str, *, ttl_ms: int, maxlen: int
    ) -> None:
        self._redis = redis
        self._keys = [
            keys.message_stream(message_id),
            keys.message_meta(message_id),
            keys.message_channel(message_id),
        ]
        self._owner = owner
        self._ttl_ms = str(ttl_ms)
        self._maxlen = str(maxlen)
        self._next_n = 0
        self._append: AsyncScript = redis.register_script(_APPEND)
        self._claim: AsyncScript = redis.register_script(_CLAIM)

    async def claim(self) -> bool:
        """Take the message for this attempt; False when it is gone or already taken."""
        result = await self._claim(keys=[self._keys[1]], args=[self._owner, RUNNING])
        return bool(result == b"ok")

    async def append(self, kind: Kind, data: bytes) -> None:
        """Append one event; raise :class:`WriteRefused` when the fence or the message says no."""
        args = [self._owner, str(self._next_n), kind.value, data, self._ttl_ms, self._maxlen]
        code, detail = await self._append(keys=self._keys, args=args)
        if code == 0:
            raise WriteRefused(f"append refused: {detail.decode()}")
        self._next_n += 1

    @property
    def events_written(self) -> int:
        """How many events this writer has appended."""
        return self._next_n
