"""Fan-out inside one gateway process: one live feed per message, any number of subscribers.

::

    worker ─XADD+PUBLISH─▶ Redis ─one subscribed connection─▶ LiveChannels ─▶ Hub
                             ▲                                               │ a _Tail per message
                             └───── XRANGE (join, catch-up, resync) ◀────────┤
                                                                             ▼
                                                Subscriber (bounded queue) per client

A subscriber first reads the stream itself (XRANGE from its cursor) until it has caught up, then
attaches to the message's tail, which pushes every announced event to all attached subscribers:
the live path costs no Redis read per token, however many clients watch. The seam is exact: a
subscriber attaches only when the tail has delivered nothing newer than what it has read (checked
without yielding to the event loop), and drops any event at or before its own position.

A tail trusts pub/sub only while sequence numbers are consecutive. It re-reads the stream from
its last event on a jump, after the subscribed connection was re-established, and whenever it
has been quiet for a heartbeat interval (which also finds a last announcement that was lost, and
a message that expired). A subscriber whose queue reaches ``backlog`` events is detached and
catches up from Redis at its own pace, so a slow client neither stalls others nor loses anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.errors import TokenrelayError
from shared.events import ZERO_ID, EntryId, Event
from shared.streams import read_after, read_newest

if TYPE_CHECKING:
    from gateway.resume import MessageInfo

_log = logging.getLogger(__name__)
_READ_BATCH = 512


class MessageGone(TokenrelayError):
    """The message expired or was deleted while a client was reading it."""


class Draining(TokenrelayError):
    """This gateway is shutting down: the client is to reconnect (to another one)."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Events between ``after`` (None: the start) and ``resumes_at`` are no longer retained."""

    after: EntryId | None
    resumes_at: EntryId


Item = Event | Gap


class LiveBatch:
    """Consecutive events a tail hands to its subscribers at once, with their bytes per format.

    Announcements that arrive together (the gateway was busy while they came) are delivered
    together, so a client that keeps up gets them in one write: under load the cost per event
    falls instead of the queue growing.
    """

    __slots__ = ("chunks", "events", "terminal")

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.terminal = events[-1].kind.terminal  # asked once here, not once per subscriber
        #: The batch as one HTTP/1.1 chunk per output format, made by the first subscriber of
        #: that format and written as is to the others (see gateway.sse).
        self.chunks: dict[str, bytes] = {}


class LiveSink(Protocol):
    """Where a live subscriber's events go as the tail delivers them (see gateway.direct)."""

    def offer(self, batch: LiveBatch) -> bool:
        """Send ``batch`` now; False (nothing sent) when the client is not keeping up."""
        ...


class Subscriber:
    """One client's view of a message from a cursor on: :meth:`next_batch` until None, then
    :meth:`close`."""

    # Slots: a gateway holds one per connection, and thousands of connections.
    __slots__ = (
        "_catching_up",
        "_closed",
        "_finished",
        "_gone",
        "_heartbeat_due",
        "_hub",
        "_last_id",
        "_next_n",
        "_pending",
        "_tail",
        "_waiter",
        "info",
        "last_active",
        "message_id",
        "sink",
    )

    def __init__(
        self,
        hub: Hub,
        message_id: str,
        after: EntryId,
        next_n: int | None,
        info: MessageInfo | None,
    ) -> None:
        self.message_id = message_id
        #: The message's meta as the join read it; left with the tail for later joins.
        self.info = info
        self._hub = hub
        self._last_id = after
        self._next_n = next_n
        self._pending: list[Item] = []
        self._catching_up = True
        self._finished = False
        self._closed = False
        self._gone = False
        self._heartbeat_due = False
        self._waiter: asyncio.Future[None] | None = None
        self._tail: _Tail | None = None
        self.last_active = hub.now()
        #: Set by the response when it can write events itself, without a task switch each.
        self.sink: LiveSink | None = None

    async def next_batch(self) -> list[Item] | None:
        """Items ready to send, in order; ``[]`` means "send a heartbeat"; None means the end.

        The end comes after the terminal event, or once :meth:`close` was called. Raises
        :class:`MessageGone` when the message disappeared, and RedisError when Redis fails.
        """
        while True:
            if self._pending:
                return self._take_pending()
            if self._gone:
                raise MessageGone(f"message {self.message_id} expired or was deleted")
            if self._hub.draining:
                raise Draining("this gateway is shutting down")
            if self._finished or self._closed:
                return None
            if self._heartbeat_due:
                self._heartbeat_due = False
                self.last_active = self._hub.now()
                return []
            if self._catching_up:
                await self._catch_up()
            else:
                await self._wait()

    def ready_now(self) -> list[Item]:
        """The items that can be sent without waiting: what is queued, after catching up from
        this gateway's memory when it covers the position (which attaches to the tail).
        :meth:`next_batch` goes on from there."""
        if self._catching_up and not (self._closed or self._gone or self._hub.draining):
            self._catch_up_in_memory()
        return self._take_pending() if self._pending else []

    def _take_pending(self) -> list[Item]:
        batch, self._pending = self._pending, []
        self._heartbeat_due = False  # what is sent now counts as a sign of life
        self.last_active = self._hub.now()
        return batch

    def close(self) -> None:
        """Release everything this subscriber holds; a pending :meth:`next_batch` returns None."""
        if self._closed:
            return
        self._closed = True
        self._detach()
        self._hub._forget(self)
        self._wake()

    def end_gone(self) -> None:
        """The message is gone: end this subscriber with :class:`MessageGone`."""
        self._gone = True
        self._detach()
        self._wake()

    async def _wait(self, *also: asyncio.Future[None]) -> None:
        """Sleep until pushed, woken (heartbeat, close, end), or one of ``also`` completes."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            if also:
                await asyncio.wait({waiter, *also}, return_when=asyncio.FIRST_COMPLETED)
            else:
                await waiter
        finally:
            self._waiter = None

    def _push(self, batch: LiveBatch, now: float) -> None:
        """Called by the tail with every batch of live events."""
        events = batch.events
        last_id = self._last_id
        if events[-1].id <= last_id:
            return  # already read from the stream while catching up
        if events[0].id <= last_id:  # partly read: only the rest is new (rare)
            batch = LiveBatch([event for event in events if event.id > last_id])
            events = batch.events
        sink = self.sink
        # Straight to the client when nothing is queued before it and nothing is missing.
        if sink is not None and not self._pending and self._next_n == events[0].n:
            if sink.offer(batch):
                last = events[-1]
                self._last_id = last.id
                self._next_n = last.n + 1
                self.last_active = now
                if batch.terminal:
                    self._finished = True
                    self._detach()
                    self._wake()
                return
            # The client is not keeping up: catch up from Redis once it has drained.
            self._hub.fell_behind += 1
            self._fall_back()
            return
        if len(self._pending) + len(events) > self._hub.backlog:
            # Too slow, or too much at once: stop buffering in memory and read the stream.
            self._fall_back()
            return
        for event in events:
            self._enqueue(event)
        self._wake()

    def _fall_back(self) -> None:
        """Leave the tail and catch up from the stream (memory or Redis) at the client's pace."""
        self._detach()
        self._catching_up = True
        self._wake()

    def _enqueue(self, event: Event) -> None:
        if self._next_n != event.n:
            self._pending.append(Gap(None if self._last_id == ZERO_ID else self._last_id, event.id))
        self._pending.append(event)
        self._last_id = event.id
        self._next_n = event.n + 1
        if event.kind.terminal:
            self._finished = True
            self._detach()

    async def _catch_up(self) -> None:
        hub = self._hub
        if self._catch_up_in_memory():
            return
        events = await read_after(
            hub.redis, keys.message_stream(self.message_id), self._last_id, count=_READ_BATCH
        )
        hub.reads += 1
        for event in events:
            self._enqueue(event)
            if self._finished:
                return
        if len(events) == _READ_BATCH or self._closed or self._gone:
            return
        tail = hub._tail(self.message_id, self.info)
        if not tail.ready:
            # Wait for the tail to start, but stay responsive to heartbeats and close().
            assert tail.task is not None
            await self._wait(tail.task)
            if tail.failed:
                tail.raise_failure()
            return  # read again: events may have arrived while the tail started
        # No await between the read above and this check: the tail cannot move in between.
        if tail.last_id <= self._last_id:
            self._catching_up = False
            self._tail = tail
            tail.subscribers.add(self)
        elif not events:
            # The tail is ahead, yet Redis has nothing after our position: the stream was
            # deleted or expired under us. Say so rather than asking again in a tight loop.
            if not await hub.redis.exists(keys.message_meta(self.message_id)):
                self.end_gone()
            else:
                await asyncio.sleep(0.05)

    def _catch_up_in_memory(self) -> bool:
        """Catch up from the tail's latest events and attach, if they cover this subscriber's
        position; no Redis read and no await, so nothing can arrive in between."""
        tail = self._hub.warm_tail(self.message_id)
        if tail is None or not tail.covers(self._last_id):
            return False
        if tail.info is None:
            tail.info = self.info
        for event in tail.events_after(self._last_id):
            self._enqueue(event)
            if self._finished:
                return True
        self._catching_up = False
        self._tail = tail
        tail.subscribers.add(self)
        return True

    def _detach(self) -> None:
        if self._tail is not None:
            self._tail.subscribers.discard(self)
            self._tail = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Tail:
    """The live feed of one message in this process."""

    def __init__(self, hub: Hub, message_id: str) -> None:
        self.hub = hub
        self.message_id = message_id
        self.stream = keys.message_stream(message_id)
        self.channel = keys.message_channel(message_id).encode()
        self.subscribers: set[Subscriber] = set()
        self.ready = False
        self.broken = False
        self.last_id = ZERO_ID
        self.last_n = -1
        self.last_heard = hub.now()
        # The latest events delivered, in order; every event after ``floor`` up to ``last_id``
        # is among them.
        self.recent: deque[Event] = deque(maxlen=hub.replay)
        self.floor = ZERO_ID
        #: What the message's meta says (it does not change), once a join has read it.
        self.info: MessageInfo | None = None
        # Announcements that arrive while the tail starts or re-reads the stream wait here;
        # None while announcements are delivered as they come.
        self.held: list[Event] | None = []
        # Events delivered but not yet handed to subscribers (see flush).
        self.unsent: list[Event] = []
        # Set when another re-read was asked for while one was running.
        self.dirty = False
        self.verify = False
        self.closed = False
        self.task: asyncio.Task[None] | None = asyncio.create_task(self._sync(starting=True))

    @property
    def failed(self) -> bool:
        """It could not start (its task ended before it was ready)."""
        return not self.ready and self.task is not None and self.task.done()

    def raise_failure(self) -> None:
        assert self.task is not None
        exc = self.task.exception()
        raise exc if exc is not None else MessageGone(f"tail of {self.message_id} stopped")

    @property
    def sound(self) -> bool:
        """Started and not broken: what it delivered (and holds in memory) can be trusted."""
        return self.ready and not self.broken

    def covers(self, position: EntryId) -> bool:
        """Whether every event after ``position`` that this tail has delivered is in memory."""
        return self.floor <= position <= self.last_id

    def events_after(self, position: EntryId) -> list[Event]:
        """The events in memory after ``position``, oldest first."""
        recent = self.recent
        start = len(recent)
        while start and recent[start - 1].id > position:
            start -= 1
        return [recent[i] for i in range(start, len(recent))]

    def find(self, position: EntryId) -> Event | None:
        """The event at ``position``, if it is in memory."""
        for event in reversed(self.recent):
            if event.id <= position:
                return event if event.id == position else None
        return None

    def announce(self, event: Event) -> None:
        """Handle one event announced on the channel."""
        if self.held is not None:
            self.held.append(event)
        elif event.n == self.last_n + 1:
            self._deliver(event)
        elif event.n > self.last_n:
            self.held = [event]
            self._start_sync()

    def resync(self, *, verify: bool = False) -> None:
        """Re-read the stream from the last delivered event: announcements may have been lost.

        With ``verify``, also check that the message still exists.
        """
        self.verify = self.verify or verify
        if self.held is None:
            self.held = []
            self._start_sync()
        else:
            self.dirty = True  # a running start or re-read reads once more when it is done

    def _start_sync(self) -> None:
        self._reap()
        self.task = asyncio.create_task(self._sync(starting=False))

    async def _sync(self, *, starting: bool) -> None:
        try:
            if starting:
                # Subscribe before reading the newest entry: nothing published after the read
                # is missed.
                await self.hub.live.subscribe(self.channel)
                newest = await read_newest(self.hub.redis, self.stream)
                self.hub.reads += 1
                if newest is not None:
                    self.last_id, self.last_n = newest.id, newest.n
                self.floor = self.last_id
                self.ready = True
            else:
                await self._read_stream()
            while self._release_held():
                self.dirty = False
                await self._read_stream()
        except (asyncio.CancelledError, RedisError):
            raise  # cancelled with the tail; a failed start is reported to its subscribers
        except Exception:
            _log.exception("tail of %s broke; its clients will reconnect", self.message_id)
            self._break()

    def _release_held(self) -> bool:
        """Deliver held announcements in order; True when the stream must be read again."""
        held, self.held = self.held or [], None
        for index, event in enumerate(held):
            if event.n == self.last_n + 1:
                self._deliver(event)
            elif event.n > self.last_n:  # still a gap
                self.held = held[index:]
                return True
        if self.dirty:
            self.held = []
            return True
        return False

    async def _read_stream(self) -> None:
        """Deliver every entry after ``last_id``, retrying until Redis answers."""
        failures = 0
        while not self.closed:
            try:
                if self.verify and not await self.hub.redis.exists(
                    keys.message_meta(self.message_id)
                ):
                    self._end_gone()
                    return
                self.verify = False
                events = await read_after(
                    self.hub.redis, self.stream, self.last_id, count=_READ_BATCH
                )
            except RedisError as exc:
                failures += 1
                _log.warning("re-reading %s failed (%s); retrying", self.message_id, exc)
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))
                continue
            self.hub.reads += 1
            self.last_heard = self.hub.now()
            for event in events:
                # A jump in n here means trimmed history; subscribers report it as a Gap.
                self._deliver(event)
            if len(events) < _READ_BATCH:
                return

    def _deliver(self, event: Event) -> None:
        """Take ``event`` as the tail's newest; subscribers get it at the next :meth:`flush`.

        The tail's position and memory move at once: a subscriber that attaches before the
        flush has read up to here, and the flush skips what it has.
        """
        self.last_heard = self.hub.now()
        if event.id <= self.last_id:
            return
        self.last_id, self.last_n = event.id, event.n
        recent = self.recent
        if recent.maxlen:
            if len(recent) == recent.maxlen:
                self.floor = recent[0].id  # about to be dropped: covered no more
            recent.append(event)
        else:
            self.floor = event.id
        if not self.unsent:
            self.hub._to_flush(self)
        self.unsent.append(event)

    def flush(self) -> None:
        """Hand the events delivered since the last flush to every attached subscriber."""
        events, self.unsent = self.unsent, []
        if not events or not self.subscribers:
            return
        now = self.hub.now()
        for batch in _consecutive(events):
            for subscriber in list(self.subscribers):
                try:
                    subscriber._push(batch, now)
                except Exception:
                    # One client's failure (an event its format cannot render, say) is its
                    # own: the others get the batch, and it reads the stream again by itself.
                    _log.exception("live delivery to a client of %s failed", self.message_id)
                    subscriber._fall_back()

    def _end_gone(self) -> None:
        self.flush()
        for subscriber in list(self.subscribers):
            subscriber.end_gone()
        self.broken = True

    def _break(self) -> None:
        self.flush()
        for subscriber in list(self.subscribers):
            subscriber.close()
        self.broken = True

    def _reap(self) -> None:
        """Collect a finished sync task, logging how it failed."""
        task = self.task
        if task is not None and task.done():
            self.task = None
            if not task.cancelled() and task.exception() is not None:
                _log.warning("tail %s failed", self.message_id, exc_info=task.exception())

    async def aclose(self) -> None:
        self.closed = True  # re-reads stop retrying even if the cancellation below is lost
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _consecutive(events: list[Event]) -> list[LiveBatch]:
    """``events`` in batches of consecutive sequence numbers (a jump is trimmed history,
    which each subscriber reports as a gap before the events after it)."""
    start = 0
    batches = []
    for index in range(1, len(events)):
        if events[index].n != events[index - 1].n + 1:
            batches.append(LiveBatch(events[start:index]))
            start = index
    batches.append(LiveBatch(events[start:] if start else events))
    return batches


class LiveChannelsLike(Protocol):
    """What the hub needs of :class:`shared.live.LiveChannels`."""

    async def subscribe(self, channel: bytes) -> None: ...

    async def unsubscribe(self, channel: bytes) -> None: ...


class Hub:
    """All tails and subscribers of one gateway process."""

    def __init__(
        self,
        redis: Redis,
        live: LiveChannelsLike,
        *,
        backlog: int,
        heartbeat_s: float,
        replay: int,
        linger_s: float = 5.0,
        presence_interval_s: float = 10.0,
    ) -> None:
        self.redis = redis
        self.live = live
        self.backlog = backlog
        self.heartbeat_s = heartbeat_s
        self.replay = replay  # latest events each tail keeps in memory (TOKENRELAY_LIVE_REPLAY)
        # A tail nobody watches is kept this long, so clients that reconnect find it warm.
        self.linger_s = linger_s
        self.presence_interval_s = presence_interval_s
        self.reads = 0  # XRANGE/XREVRANGE calls this hub made: the fan-out's whole read cost
        self.fell_behind = 0  # times a directly written client could not keep up
        self._tails: dict[str, _Tail] = {}
        self._subscribers: set[Subscriber] = set()
        # Subscribers per message (attached or catching up), and since when a message has none.
        self._watchers: dict[str, int] = {}
        self._unwatched_since: dict[str, float] = {}
        # Cancel-on-disconnect messages watched here: subscriber count and presence lifetime.
        self._presence: dict[str, tuple[int, int]] = {}
        self._presence_renewed = 0.0
        # Tails with events to hand on once the announcements read together are all in.
        self._flushing: list[_Tail] = []
        self._closing = False
        #: Set on shutdown: every stream ends (with a retry hint) so its client resumes elsewhere.
        self.draining = False
        self._loop = asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time()

    def subscribe(
        self,
        message_id: str,
        *,
        after: EntryId = ZERO_ID,
        next_n: int | None = 0,
        watch_ms: int | None = None,
        info: MessageInfo | None = None,
    ) -> Subscriber:
        """A subscriber to ``message_id`` receiving every event after ``after``.

        ``next_n`` is the sequence number of the first event expected; None when events are
        known to be missing (a :class:`Gap` is reported before the first one). ``watch_ms``
        (cancel-on-disconnect messages) makes this gateway renew the message's presence key
        while the subscriber lives. ``info`` (the message's meta, when the join read it) lets
        later joins near the live end be answered from memory.
        """
        subscriber = Subscriber(self, message_id, after, next_n, info)
        self._subscribers.add(subscriber)
        self._watchers[message_id] = self._watchers.get(message_id, 0) + 1
        self._unwatched_since.pop(message_id, None)
        if watch_ms is not None:
            count, _ = self._presence.get(message_id, (0, watch_ms))
            self._presence[message_id] = (count + 1, watch_ms)
            self._presence_renewed = 0.0  # renew at the next tick
        return subscriber

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def tail_count(self) -> int:
        return len(self._tails)

    def on_message(self, channel: bytes, payload: bytes) -> None:
        """LiveChannels callback: one announcement."""
        # channel is b"tr:{<message id>}:live"
        message_id = channel[channel.index(b"{") + 1 : channel.rindex(b"}")].decode()
        tail = self._tails.get(message_id)
        if tail is not None:
            tail.announce(Event.from_announcement(payload))

    def _to_flush(self, tail: _Tail) -> None:
        """Flush ``tail`` soon: after every announcement already received is read.

        The subscribed connection's reader takes all the replies a socket read brought without
        yielding, so this runs once per read, however many announcements it held.
        """
        if not self._flushing:
            self._loop.call_soon(self._flush)
        self._flushing.append(tail)

    def _flush(self) -> None:
        tails, self._flushing = self._flushing, []
        for tail in tails:
            try:
                tail.flush()
            except Exception:
                # The other tails of this read are still to be flushed (and none is scheduled
                # again until it is).
                _log.exception("handing on the live events of %s failed", tail.message_id)

    def on_resubscribed(self) -> None:
        """LiveChannels callback: the connection was re-established; announcements may be lost."""
        for tail in self._tails.values():
            tail.resync()

    def warm_tail(self, message_id: str) -> _Tail | None:
        """The message's tail if it is live and sound (its memory can answer for Redis)."""
        tail = self._tails.get(message_id)
        return tail if tail is not None and tail.sound else None

    def _tail(self, message_id: str, info: MessageInfo | None) -> _Tail:
        tail = self._tails.get(message_id)
        if tail is None or tail.failed or tail.broken:
            if tail is not None:
                tail._reap()  # its start failed (the waiting subscriber got the error): anew
            tail = self._tails[message_id] = _Tail(self, message_id)
        if tail.info is None:
            tail.info = info
        return tail

    def _forget(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        message_id = subscriber.message_id
        left = self._watchers[message_id] - 1
        if left:
            self._watchers[message_id] = left
        else:
            del self._watchers[message_id]
            if message_id in self._tails:
                self._unwatched_since[message_id] = self.now()
        presence = self._presence.get(message_id)
        if presence is not None:
            if presence[0] > 1:
                self._presence[message_id] = (presence[0] - 1, presence[1])
            else:
                del self._presence[message_id]  # its key lapses by itself after watch_ms

    async def run_housekeeping(self) -> None:
        """Heartbeats, checks of quiet tails, presence and removal of unwatched tails; run until
        cancelled. A failing round is logged and the next one runs."""
        tick = min(self.heartbeat_s, self.presence_interval_s) / 4
        while not self._closing:  # not only cancellation: one can be lost (see LiveChannels)
            await asyncio.sleep(tick)
            try:
                await self._housekeeping_round()
            except RedisError as exc:
                _log.warning("housekeeping round failed: %s", exc)
            except Exception:
                _log.exception("housekeeping round failed")

    async def _housekeeping_round(self) -> None:
        now = self.now()
        for subscriber in self._subscribers:
            if now - subscriber.last_active >= self.heartbeat_s:
                subscriber._heartbeat_due = True
                subscriber._wake()
        for tail in list(self._tails.values()):
            if tail.ready and tail.subscribers and now - tail.last_heard >= self.heartbeat_s:
                tail.last_heard = now
                tail.resync(verify=True)
        await self._renew_presence(now)
        await self._drop_idle_tails(now)

    async def _renew_presence(self, now: float) -> None:
        if not self._presence:
            return
        # Renew well within the shortest lifetime in use (gateways may differ in settings).
        shortest_s = min(watch_ms for _, watch_ms in self._presence.values()) / 1000
        if now - self._presence_renewed < min(self.presence_interval_s, shortest_s / 3):
            return
        self._presence_renewed = now
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id, (_, watch_ms) in self._presence.items():
                pipe.set(keys.message_watched(message_id), b"1", px=watch_ms)
            await pipe.execute()

    async def _drop_idle_tails(self, now: float) -> None:
        expired = [m for m, since in self._unwatched_since.items() if now - since >= self.linger_s]
        for message_id in expired:
            # Awaits below let subscribers come and go: decide on the current state.
            if message_id in self._watchers or self._unwatched_since.pop(message_id, None) is None:
                continue
            tail = self._tails.pop(message_id, None)
            if tail is None:
                continue
            # Unsubscribe first: its write is queued before any SUBSCRIBE of a new tail for the
            # same message, so the new subscription is not undone.
            await self.live.unsubscribe(tail.channel)
            tail._reap()
            await tail.aclose()

    def drain(self) -> None:
        """End every stream now, each telling its client to come back (to another gateway)."""
        self.draining = True
        for subscriber in list(self._subscribers):
            subscriber._wake()

    async def aclose(self) -> None:
        """End every subscriber and tail."""
        self._closing = True
        for subscriber in list(self._subscribers):
            subscriber.close()
        tails, self._tails = list(self._tails.values()), {}
        for tail in tails:
            await tail.aclose()
