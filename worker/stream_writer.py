"""Appends a message's events to its stream: fenced, idempotent, announced, expiring.

One Lua script per event does everything atomically on the message's slot:

- it refuses to write when the message no longer exists (expired or deleted: never resurrect),
  or when ``owner`` is not this attempt's token (a stale worker can never interleave tokens);
- it is idempotent: every append names the sequence number it writes, and the script skips one
  the message already has, so redis-py's automatic retry of a call whose reply was lost cannot
  append the same event twice. A message that has fewer events than the attempt wrote lost
  them (a failover to a replica that had not received them): the script says so;
- before a non-terminal event it checks for a cancellation request, and for
  ``cancel_on_disconnect`` messages whether any client still watches; either stops generation;
- it XADDs the entry, trims the stream to ``maxlen``, records the terminal entry id, renews both
  keys' expiry when the writer says it is due (at the first event, every quarter of the TTL,
  and at the end), and SPUBLISHes the event on the message's shard channel for gateways.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque

from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterError,
    MasterDownError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys, metrics
from shared.backoff import retry_delay_s
from shared.errors import TokenrelayError
from shared.events import Kind
from shared.messages import REWOUND, RUNNING
from shared.redis_client import RedisClient
from worker.script_batch import ScriptBatch, ScriptCall

APPEND_SCRIPT = """
local meta = redis.call('HMGET', KEYS[2], 'owner', 'seq', 'cancel', 'watch_ms', 'end')
if not meta[2] then return {0, 'gone'} end
if meta[1] ~= ARGV[1] then return {0, 'fenced'} end
local n = tonumber(meta[2])
local wanted = tonumber(ARGV[2])
if n > wanted then return {2, 'duplicate'} end
if n < wanted then return {4, meta[2]} end
if meta[5] then return {0, 'finished'} end
local terminal = ARGV[7] == '1'
if not terminal and ARGV[8] ~= '1' then
  if meta[3] then return {3, meta[3]} end
  if meta[4] and redis.call('EXISTS', KEYS[4]) == 0 then
    redis.call('HSET', KEYS[2], 'cancel', 'disconnected')
    return {3, 'disconnected'}
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[6], '*', 'n', n, 'k', ARGV[3], 'd', ARGV[4])
if terminal then
  redis.call('HSET', KEYS[2], 'seq', n + 1, 'status', ARGV[3], 'end', id)
else
  redis.call('HSET', KEYS[2], 'seq', n + 1)
end
if terminal or ARGV[9] == '1' then
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
redis.call('SPUBLISH', KEYS[3], id .. ' ' .. n .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
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
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'status', ARGV[2])
if meta[3] then return {'cancelled', '', meta[2]} end
return {'ok', meta[5] or '', meta[2]}
"""


_log = logging.getLogger(__name__)
_APPENDED = {kind: metrics.EVENTS_APPENDED.labels(kind.value) for kind in Kind}
# Events an attempt keeps to write again after a failover lost them.
_RESEND_LIMIT = 4096
# Errors after which a call may or may not have been applied, and that pass: a lost
# connection, a failover under way (a read-only former primary, a primary down), a slot in
# migration (TRYAGAIN, or redis-py giving up on redirections).
_TRANSIENT = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    TryAgainError,
    MasterDownError,
    ReadOnlyError,
)


class WriteRefused(TokenrelayError):
    """The append script refused the write: the message is gone or finished, or another
    attempt owns it (``reason`` is ``gone``, ``finished`` or ``fenced``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"append refused: {reason}")
        self.reason = reason


class EventsLost(TokenrelayError):
    """The message has fewer events than this attempt wrote: Redis lost the last ones (its
    primary failed over to a replica that had not received them)."""

    def __init__(self, held: int, written: int) -> None:
        super().__init__(f"the message holds {held} events; {written} were written")
        self.held = held


class CancelRequested(TokenrelayError):
    """Generation must stop: a client cancelled, or nobody watched a cancel-on-disconnect one."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cancelled: {reason}")
        self.reason = reason


def append_batch(redis: RedisClient, *, close_within_s: float | None = None) -> ScriptBatch:
    """The append script of one process, its calls batched (see worker.script_batch);
    every writer of the process shares it."""
    return ScriptBatch(redis, APPEND_SCRIPT, close_within_s=close_within_s, operation="append")


class StreamWriter:
    """Writes one message's events in order for one generation attempt."""

    def __init__(
        self,
        redis: RedisClient,
        appends: ScriptCall,
        message_id: str,
        owner: str,
        *,
        ttl_ms: int,
        maxlen: int,
        retry_for_s: float = 0.0,
        queued_s: float | None = None,
    ) -> None:
        self.message_id = message_id
        self._keys = [
            keys.message_stream(message_id),
            keys.message_meta(message_id),
            keys.message_channel(message_id),
            keys.message_watched(message_id),
        ]
        self._owner = owner
        self._ttl_ms = str(ttl_ms)
        self._maxlen = str(maxlen)
        # Renew the keys' expiry when a quarter of it has passed since the last renewal.
        self._renew_every_s = ttl_ms / 4000
        self._renewed_at: float | None = None
        # Sequence numbers: Redis holds the events before _next_n (as far as this attempt
        # knows); this attempt has written (or has due) those before _top. Both set by claim.
        self._next_n = 0
        self._top = 0
        self._retry_for_s = retry_for_s
        # For the metrics: when the job was queued (wall clock), when this attempt last wrote.
        self._queued_s = queued_s
        self._wrote_at: float | None = None
        # The last call failed without an answer: it may or may not have been applied.
        self._uncertain = False
        #: The terminal event this attempt wrote, once it did.
        self.ended_with: Kind | None = None
        #: Appends that renewed the message's expiry (the renewals due, and the last event).
        self.renewals = 0
        # What this attempt wrote, by sequence number, to write again what a failover lost.
        # The events before _top, the newest last (the oldest fall out). Tuples of a str and
        # bytes only: the garbage collector stops tracking those, and a worker keeps many.
        self._sent: deque[tuple[str, bytes]] = deque(maxlen=_RESEND_LIMIT)
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
            self.events_before = self._next_n = self._top = int(result[2])
            self._sent.clear()  # what an earlier claim wrote is not this attempt's to resend
            self._uncertain = False
        if outcome == "ok" and result[1]:
            self.watch_ms = int(result[1])
        return outcome

    async def watched(self) -> bool:
        """Whether a client still watches this cancel-on-disconnect message."""
        return bool(await self._redis.exists(self._keys[3]))

    async def append(self, kind: Kind, data: bytes) -> None:
        """Append one event.

        Raise :class:`WriteRefused` when the fence or the message says no,
        :class:`CancelRequested` (for non-terminal events) when generation must stop, and
        :class:`EventsLost` when Redis lost events this attempt wrote and no longer keeps.
        A call that fails without an answer (a lost connection, a failover, a slot in
        migration) is retried, without ever writing an event twice, for up to
        ``retry_for_s``; past it the error is raised and the event stays due: the next append
        writes it first, unless Redis had it.
        """
        self._sent.append((kind.value, data))
        self._top += 1
        try:
            if not self._uncertain and self._next_n == self._top - 1:
                try:  # the usual case, without the retry loop's own allocations
                    await self._send(self._next_n)
                except _TRANSIENT:
                    self._uncertain = True
                    if self._retry_for_s <= 0:
                        raise
            if self._uncertain or self._next_n < self._top:
                await self._sync()
        except (WriteRefused, CancelRequested):
            if self._sent and self._next_n < self._top:
                self._sent.pop()  # refused: never written
                self._top -= 1
            raise

    async def _sync(self) -> None:
        """Make Redis hold every event this attempt wrote: settle an uncertain call, write
        again what a failover lost, then what is new."""
        started = time.monotonic()
        for failures in itertools.count():
            try:
                if self._uncertain:
                    await self._settle()
                while self._next_n < self._top:
                    await self._send(self._next_n)
                return
            except _TRANSIENT as exc:
                self._uncertain = True
                if time.monotonic() - started >= self._retry_for_s:
                    raise
                _log.log(
                    logging.WARNING if failures == 0 else logging.DEBUG,
                    "message %s: appending failed (%s: %s); retrying",
                    self._keys[1],
                    type(exc).__name__,
                    exc,
                )
                await asyncio.sleep(retry_delay_s(failures))

    async def _send(self, n: int) -> None:
        first = self._top - len(self._sent)
        if n < first:
            raise EventsLost(n, self._top)
        value, data = self._sent[n - first]
        kind = Kind(value)
        now = time.monotonic()
        renewed_at = self._renewed_at
        renew = renewed_at is None or now - renewed_at >= self._renew_every_s
        # An event written again after a failover was announced before: no cancel check.
        finishing = self.finishing or n < self._top - 1
        args = [
            self._owner,
            str(n),
            kind.value,
            data,
            self._ttl_ms,
            self._maxlen,
            "1" if kind.terminal else "0",
            "1" if finishing else "0",
            "1" if renew else "0",
        ]
        code, detail = await self._append(keys=self._keys, args=args)
        if code == 0:
            raise WriteRefused(detail.decode())
        if code == 3:
            raise CancelRequested(detail.decode())
        if code == 4:
            await self._lost(int(detail))
            return
        # 1: written; 2: Redis had it already (a retried call whose reply was lost).
        if code == 1:
            self._observe(kind, now)
            if renew or kind.terminal:
                self.renewals += 1
        if renew:
            self._renewed_at = now
        self._next_n = n + 1

    def _observe(self, kind: Kind, now: float) -> None:
        _APPENDED[kind].inc()
        if kind.terminal:
            self.ended_with = kind
        if self._wrote_at is not None:
            metrics.INTER_TOKEN_GAP.observe(now - self._wrote_at)
        elif self._queued_s is not None and self.events_before == 0:
            metrics.TIME_TO_FIRST_TOKEN.observe(max(0.0, time.time() - self._queued_s))
        self._wrote_at = now

    async def _settle(self) -> None:
        """After a call that failed without an answer: learn how many events Redis holds."""
        seq = await self._redis.hget(self._keys[1], "seq")
        if seq is None:
            self._uncertain = False
            return  # gone: the next call says so
        held = int(seq)
        if held < self._next_n:
            await self._lost(held)
        else:
            # Applied or not; more than this attempt wrote means another owns it now, which
            # the next call is told.
            self._next_n = min(held, self._top)
        self._uncertain = False

    async def _lost(self, held: int) -> None:
        """Redis holds ``held`` events, fewer than it acknowledged (its primary failed over
        before a replica had them): mark the message as rewound (readers whose position is
        among the lost events start again) and write them again from what this attempt keeps.
        Raises :class:`EventsLost` when they are no longer all at hand."""
        first = self._top - len(self._sent)
        await self._redis.hset(self._keys[1], REWOUND, b"1")
        if held < first:
            # The answer cannot be mended: what follows (an error event) comes after `held`.
            written = self._next_n
            self._sent.clear()
            self._next_n = self._top = held
            raise EventsLost(held, written)
        _log.warning(
            "message %s: Redis lost events %d to %d; writing them again",
            self._keys[1],
            held,
            self._next_n - 1,
        )
        self._next_n = held

    @property
    def events_written(self) -> int:
        """How many events this attempt appended (or has due, after a failed call)."""
        return self._top - self.events_before
