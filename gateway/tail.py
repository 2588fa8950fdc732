"""The live feed of one message in a gateway process (see docs/gateway.md): announcements
in, batches to the attached subscribers out, the newest events in memory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.exceptions import RedisError

from gateway import redis_reads
from gateway.batches import Batch, consecutive
from gateway.counters import Counters
from gateway.errors import MessageGone
from gateway.positions import MessageInfo, StartPoint
from gateway.redis_reads import READ_BATCH, StreamReads, retrieved
from gateway.replay import Replay
from shared import keys
from shared.backoff import retry_delay_s
from shared.events import ZERO_ID, EntryId, Event
from shared.redis_client import RedisClient

_log = logging.getLogger(__name__)
# Durable mode: how long to wait, read after read, for an announced event to reach the replica
# read (replication is usually sub-millisecond behind; give up after about 5 s).
_REPLICA_WAITS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, *(0.1,) * 50)


class NotInMemory:
    """What :meth:`Tail.locate` answers when only Redis can tell."""

    __slots__ = ()


NOT_IN_MEMORY = NotInMemory()


class Listener(Protocol):
    """What a tail needs of what is attached to it (gateway.subscriber)."""

    def push(self, batch: Batch, now: float) -> None:
        """New events, in order."""

    def fall_back(self) -> None:
        """Leave the tail and read the stream by yourself."""

    def end(self, *, gone: bool) -> None:
        """The tail stops: the message is ``gone``, or the tail broke (the client reconnects)."""

    def rewind(self) -> None:
        """Events delivered were lost: start again from the message's start, saying so."""


class LiveChannels(Protocol):
    """What a tail needs of :class:`shared.live.LiveChannels`."""

    async def subscribe(self, channel: bytes) -> None: ...

    async def unsubscribe(self, channel: bytes) -> None: ...


class Tail:
    """The live feed of one message. It starts at once; :meth:`started` waits for it."""

    def __init__(
        self,
        message_id: str,
        *,
        redis: RedisClient,
        live: LiveChannels,
        replay: int,
        replay_bytes: int,
        ttl_ms: int,
        counters: Counters,
        clock: Callable[[], float],
        schedule_flush: Callable[[Tail], None],
        mark_rewound: Callable[[str], Awaitable[object]],
        info: MessageInfo | None = None,
        hints_only: bool = False,
        reads_gate: asyncio.Semaphore | None = None,
    ) -> None:
        self.message_id = message_id
        self.channel = keys.message_channel(message_id).encode()
        #: What the message's meta says, once known.
        self.info = info
        self.ready = False
        self.broken = False
        #: Its start failed.
        self.failed = False
        self.last_id = ZERO_ID
        self.last_n = -1
        #: Subscribers of this message in this process, attached or not (kept by the hub).
        self.watchers = 0
        self.unwatched_since: float | None = clock()
        self.last_heard = clock()
        self._stream = keys.message_stream(message_id)
        self._redis = redis
        self._live = live
        self._counters = counters
        self._clock = clock
        self._schedule_flush = schedule_flush
        self._mark_rewound = mark_rewound
        self._listeners: set[Listener] = set()
        # The latest events delivered.
        self._replay = Replay(replay, replay_bytes, ttl_ms)
        # Announcements that arrive while the tail starts or re-reads the stream wait here;
        # None while announcements are delivered as they come.
        self._held: list[Event] | None = []
        # Events delivered but not yet handed to listeners (see flush).
        self._unsent: list[Event] = []
        self._dirty = False  # another re-read was asked for while one ran
        self._verify = False
        self._check_last = False
        self._rewinding = False
        self._closed = False
        # Durable mode: an announcement only says that an event exists, and the tail reads it
        # where it reads (a replica), so it delivers only what a replica holds. A cluster
        # replica hears of an event over the cluster bus, maybe before replication brings it.
        self._hints_only = hints_only
        # Reads of every tail of the process queue at one gate rather than open connection
        # after connection (a cluster client fails past its cap instead of queueing).
        self._gate = reads_gate or asyncio.Semaphore(64)
        self._reads = StreamReads(redis, self._stream, self._gate, counters)
        self._hinted_n = -1  # the newest event announced
        self.when_started: asyncio.Future[MessageInfo] = asyncio.get_running_loop().create_future()
        # Waiters retrieve a failure; this keeps one nobody waited for from being reported.
        self.when_started.add_done_callback(retrieved)
        self._task: asyncio.Task[None] | None = asyncio.create_task(self._sync(starting=True))

    # What joins ask

    @property
    def sound(self) -> bool:
        """Started and not broken: what it delivered (and holds in memory) can be trusted."""
        return self.ready and not self.broken

    async def started(self) -> MessageInfo:
        """Wait until the tail has started; what the message's meta says. Raises what made its
        start fail (MessageGone when the message does not exist, RedisError)."""
        return await asyncio.shield(self.when_started)

    @property
    def held_bytes(self) -> int:
        """Bytes of event data this tail keeps in memory."""
        return self._replay.held_bytes

    def covers(self, position: EntryId) -> bool:
        """Whether every event after ``position`` that this tail delivered is in memory."""
        return self._replay.covers(position, self.last_id)

    def events_after(self, position: EntryId) -> list[Event]:
        """The events in memory after ``position``, oldest first."""
        return self._replay.events_after(position)

    def locate(self, cursor: EntryId | None) -> StartPoint | NotInMemory | None:
        """Where a reader at ``cursor`` (None: the start) starts, as this tail's memory tells;
        None when ``cursor`` is the final event; :data:`NOT_IN_MEMORY` when only Redis can
        tell."""
        info = self.info
        if not self.sound or info is None or self._replay.expiring():
            return NOT_IN_MEMORY
        if cursor is None or cursor == ZERO_ID:
            return StartPoint(ZERO_ID, 0, info, from_memory=True)
        event = self._replay.at(cursor)
        if event is None:
            return NOT_IN_MEMORY
        if event.kind.terminal:
            return None
        return StartPoint(cursor, event.n + 1, info, from_memory=True)

    async def read_after(self, position: EntryId) -> list[Event]:
        """Up to :data:`READ_BATCH` events after ``position`` from Redis; readers at the same
        position share one read."""
        return await self._reads.shared(position)

    async def exists(self) -> bool:
        """Whether the message still exists in Redis."""
        return bool(await self._redis.exists(keys.message_meta(self.message_id)))

    def attach(self, listener: Listener) -> None:
        self._listeners.add(listener)

    def detach(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    @property
    def attached(self) -> int:
        return len(self._listeners)

    # What the live channel brings

    def announce(self, event: Event) -> None:
        """Handle one event announced on the channel."""
        if self._hints_only:
            self._hinted_n = max(self._hinted_n, event.n)
            if event.n > self.last_n:
                self.resync()
            elif event.id > self.last_id:  # rewritten (see below)
                self._rewinding = True
                self.resync()
            return
        if self._held is not None:
            self._held.append(event)
        elif event.n == self.last_n + 1:
            self._deliver(event)
        elif event.n > self.last_n:
            self._held = [event]
            self._start_sync()
        elif event.id > self.last_id:  # a newer event, numbered as one delivered: rewritten
            self._rewinding = True
            self.resync()

    def resync(self, *, verify: bool = False, check_last: bool = False) -> None:
        """Re-read the stream from the last delivered event: announcements may have been lost.

        With ``verify``, also check that the message still exists; with ``check_last``, that
        the last event delivered does (Redis may have failed over and lost it).
        """
        self._verify = self._verify or verify
        self._check_last = self._check_last or check_last
        if self._held is None:
            self._held = []
            self._start_sync()
        else:
            self._dirty = True  # a running start or re-read reads once more when it is done

    def flush(self) -> None:
        """Hand the events delivered since the last flush to every attached listener."""
        events, self._unsent = self._unsent, []
        now = self.last_heard = self._clock()
        if not events or not self._listeners:
            return
        for batch in consecutive(events):
            for listener in list(self._listeners):
                try:
                    listener.push(batch, now)
                except Exception:
                    # One client's failure (an event its format cannot render, say) is its
                    # own: the others get the batch, and it reads the stream again by itself.
                    _log.exception("live delivery to a client of %s failed", self.message_id)
                    listener.fall_back()

    # Reading the stream

    def _start_sync(self) -> None:
        self._reap()
        self._task = asyncio.create_task(self._sync(starting=False))

    async def _sync(self, *, starting: bool) -> None:
        try:
            if starting:
                await self._start()
            else:
                await self._read_stream()
            while self._release_held():
                self._dirty = False
                await self._read_stream()
        except asyncio.CancelledError:
            raise
        except (RedisError, MessageGone) as exc:
            if self.ready:
                raise  # unexpected after the start: _read_stream retries Redis failures
            self.failed = True
            self.when_started.set_exception(exc)  # each join waiting for it gets it
        except Exception:
            _log.exception("tail of %s broke; its clients will reconnect", self.message_id)
            self._end_all(gone=False)

    async def _start(self) -> None:
        # Subscribe before reading: nothing published after the read is missed.
        await self._live.subscribe(self.channel)
        count = max(self._replay.capacity, 1)
        async with self._gate:
            info, events = await redis_reads.read_head(self._redis, self.message_id, count)
        self._counters.reads += 1
        self.info = info = self.info or info
        for event in events:
            self._replay.add(event)
        if events:
            self.last_id, self.last_n = events[-1].id, events[-1].n
        self._replay.started(self.last_id)
        self.last_heard = self._clock()
        self.ready = True
        self.when_started.set_result(info)

    def _release_held(self) -> bool:
        """Deliver held announcements in order; True when the stream must be read again."""
        held, self._held = self._held or [], None
        for index, event in enumerate(held):
            if event.n == self.last_n + 1:
                self._deliver(event)
            elif event.n > self.last_n:  # still a gap
                self._held = held[index:]
                return True
            elif event.id > self.last_id:  # rewritten (see announce)
                self._rewinding = True
                self._held = []
                return True
        if self._dirty:
            self._held = []
            return True
        return False

    async def _read_stream(self) -> None:
        """Deliver every entry after ``last_id``, retrying until Redis answers."""
        failures = 0
        behind = -1  # reads in a row that found nothing announced yet (durable mode)
        while not self._closed:
            try:
                if not await self._checked():
                    self._end_all(gone=True)
                    return
                events = await self._reads.read(self.last_id)
            except RedisError as exc:
                delay = retry_delay_s(failures)
                failures += 1
                _log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "re-reading %s failed (%s: %s); retrying",
                    self.message_id,
                    type(exc).__name__,
                    exc,
                )
                await asyncio.sleep(delay)
                continue
            self.last_heard = self._clock()
            for event in events:
                if event.n <= self.last_n:  # rewritten (see announce): start again
                    self._rewinding = True
                    break
                # A jump in n here means trimmed history; subscribers report it as a Gap.
                self._deliver(event)
            if len(events) < READ_BATCH and not self._rewinding:
                if self.last_n >= self._hinted_n:
                    return
                # Announced, not yet on the replica: read again soon, for a while (the next
                # announcement, or a resubscription, asks again after that).
                behind = 0 if events else behind + 1
                if behind >= len(_REPLICA_WAITS_S):
                    return
                await asyncio.sleep(_REPLICA_WAITS_S[behind])

    async def _checked(self) -> bool:
        """The checks a re-read was asked to make first; False when the message is gone."""
        if self._verify and not await self.exists():
            return False
        self._verify = False
        if self._check_last and self.last_id != ZERO_ID:
            # The last event delivered is gone while the message is not: lost.
            last = self.last_id
            found = await self._redis.xrange(self._stream, min=str(last), max=str(last))
            if not found and await self.exists():
                self._rewinding = True
        self._check_last = False
        if self._rewinding:
            await self._rewind()
        return True

    async def _rewind(self) -> None:
        """Redis lost events this tail delivered (it failed over to a replica that lacked
        them): mark the message so that every gateway starts lost positions again, tell every
        attached reader to start again, and follow the stream anew from its start."""
        _log.warning("Redis lost events of %s; its readers start again", self.message_id)
        await self._mark_rewound(self.message_id)
        self._rewinding = False
        self._counters.rewinds += 1
        self._replay.clear()
        self._unsent.clear()
        self.last_id, self.last_n = ZERO_ID, -1
        listeners, self._listeners = self._listeners, set()
        for listener in listeners:
            listener.rewind()

    def _deliver(self, event: Event) -> None:
        """Take ``event`` as the tail's newest; listeners get it at the next :meth:`flush`.

        The tail's position and memory move at once: a subscriber that attaches before the
        flush has read up to here, and the flush skips what it has.
        """
        if event.id <= self.last_id:
            return
        self.last_id, self.last_n = event.id, event.n
        self._replay.add(event)
        if not self._unsent:
            self._schedule_flush(self)
        self._unsent.append(event)

    def _end_all(self, *, gone: bool) -> None:
        self.flush()
        self.broken = True
        listeners, self._listeners = self._listeners, set()
        for listener in listeners:
            listener.end(gone=gone)

    def _reap(self) -> None:
        """Collect a finished sync task, logging how it failed."""
        task = self._task
        if task is not None and task.done():
            self._task = None
            if not task.cancelled() and task.exception() is not None:
                _log.warning("tail %s failed", self.message_id, exc_info=task.exception())

    async def aclose(self) -> None:
        self._closed = True  # re-reads stop retrying even if the cancellation below is lost
        tasks: list[asyncio.Future[Any]] = self._reads.running()
        if self._task is not None:
            tasks.append(self._task)
            self._task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not self.when_started.done():
            self.when_started.set_exception(MessageGone(f"tail of {self.message_id} closed"))
