"""Appends a message's events to its stream: fenced, idempotent, announced, expiring.

One Lua script per event does everything atomically on the message's slot:

- it refuses to write when the message no longer exists (expired or deleted: never resurrect),
  or when ``owner`` is not this attempt's token (a stale worker can never interleave tokens);
- it is idempotent per call: every append carries a fresh call id, and the script skips a call
  whose id is the last one applied, so redis-py's automatic retry of a call whose reply was lost
  cannot append the same event twice. The script numbers events itself (``seq``), so a call made
  after such a failure lands right after what was really written;
- before a non-terminal event it checks for a cancellation request, and for
  ``cancel_on_disconnect`` messages whether any client still watches; either stops generation;
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
from worker.script_batch import ScriptBatch, ScriptCall

APPEND_SCRIPT = """
local meta = redis.call('HMGET', KEYS[2], 'owner', 'seq', 'cancel', 'watch_ms', 'call', 'end')
if not meta[2] then return {0, 'gone'} end
if meta[1] ~= ARGV[1] then return {0, 'fenced'} end
if meta[5] == ARGV[2] then return {2, 'duplicate'} end
if meta[6] then return {0, 'finished'} end
local terminal = ARGV[7] == '1'
if not terminal and ARGV[8] ~= '1' then
  if meta[3] then return {3, meta[3]} end
  if meta[4] and redis.call('EXISTS', KEYS[4]) == 0 then
    redis.call('HSET', KEYS[2], 'cancel', 'disconnected')
    return {3, 'disconnected'}
  end
end
local n = meta[2]
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[6], '*', 'n', n, 'k', ARGV[3], 'd', ARGV[4])
if terminal then
  redis.call('HSET', KEYS[2], 'seq', n + 1, 'call', ARGV[2], 'status', ARGV[3], 'end', id)
else
  redis.call('HSET', KEYS[2], 'seq', n + 1, 'call', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', KEYS[3], id .. ' ' .. n .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
return {1, id}
"""

# Take a message for one generation attempt. A queued message is taken once: a job delivered
# again while its owner lives is not generated twice. A retried claim (its reply lost) finds its
# own owner token and succeeds. A takeover (the job's lease lapsed: its worker is gone) replaces
# the owner, which fences the old attempt out for good.
_CLAIM = """
local meta = redis.call('HMGET', KEYS[1], 'owner', 'seq', 'cancel', 'end', 'watch_ms')
if not meta[2] then return {'gone'} end
if meta[4] then return {'finished'} end
if ARGV[3] ~= '1' and meta[1] ~= '' and meta[1] ~= ARGV[1] then return {'owned'} end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'status', ARGV[2], 'call', '')
if meta[3] then return {'cancelled', '', meta[2]} end
return {'ok', meta[5] or '', meta[2]}
"""


class WriteRefused(TokenrelayError):
    """The append script refused the write: the message is gone or finished, or another
    attempt owns it (``reason`` is ``gone``, ``finished`` or ``fenced``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"append refused: {reason}")
        self.reason = reason


class CancelRequested(TokenrelayError):
    """Generation must stop: a client cancelled, or nobody watched a cancel-on-disconnect one."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cancelled: {reason}")
        self.reason = reason


def append_batch(redis: Redis, *, close_within_s: float | None = None) -> ScriptBatch:
    """The append script of one process, its calls batched (see worker.script_batch);
    every writer of the process shares it."""
    return ScriptBatch(redis, APPEND_SCRIPT, close_within_s=close_within_s)


class StreamWriter:
    """Writes one message's events in order for one generation attempt."""

    def __init__(
        self,
        redis: Redis,
        appends: ScriptCall,
        message_id: str,
        owner: str,
        *,
        ttl_ms: int,
        maxlen: int,
    ) -> None:
        self._keys = [
            keys.message_stream(message_id),
            keys.message_meta(message_id),
            keys.message_channel(message_id),
            keys.message_watched(message_id),
        ]
        self._owner = owner
        self._ttl_ms = str(ttl_ms)
        self._maxlen = str(maxlen)
        self._calls = 0  # call ids issued, whatever became of the calls
        self._written = 0
        #: For cancel-on-disconnect messages: how long they may go unwatched (set by claim).
        self.watch_ms: int | None = None
        #: Set once the finish reason is written: a cancellation after it changes nothing.
        self.finishing = False
        #: Events the message already had when this attempt claimed it (a takeover's start).
        self.events_before = 0
        self._redis = redis
        self._append = appends
        self._claim: AsyncScript = redis.register_script(_CLAIM)

    async def claim(self, *, takeover: bool = False) -> str:
        """Take the message for this attempt: ``ok``, ``cancelled`` (taken, but cancellation was
        requested before it started), or not taken: ``gone``, ``owned``, ``finished``.

        ``takeover`` takes it from an attempt whose worker was lost.
        """
        args: list[str | bytes] = [self._owner, RUNNING, "1" if takeover else "0"]
        result = await self._claim(keys=[self._keys[1]], args=args)
        outcome: str = result[0].decode()
        if outcome in ("ok", "cancelled"):
            self.events_before = int(result[2])
        if outcome == "ok" and result[1]:
            self.watch_ms = int(result[1])
        return outcome

    async def watched(self) -> bool:
        """Whether a client still watches this cancel-on-disconnect message."""
        return bool(await self._redis.exists(self._keys[3]))

    async def append(self, kind: Kind, data: bytes) -> None:
        """Append one event.

        Raise :class:`WriteRefused` when the fence or the message says no, and
        :class:`CancelRequested` (for non-terminal events) when generation must stop.
        """
        # A fresh call id per call, even after a failed one: only redis-py's own retries of
        # this very call may repeat it.
        call = str(self._calls)
        self._calls += 1
        terminal = "1" if kind.terminal else "0"
        checks_off = "1" if self.finishing else "0"
        args = [
            self._owner,
            call,
            kind.value,
            data,
            self._ttl_ms,
            self._maxlen,
            terminal,
            checks_off,
        ]
        code, detail = await self._append(keys=self._keys, args=args)
        if code == 0:
            raise WriteRefused(detail.decode())
        if code == 3:
            raise CancelRequested(detail.decode())
        self._written += 1

    @property
    def events_written(self) -> int:
        """How many events this writer knows it appended."""
        return self._written
