"""Fan-out inside one gateway process: a tail per followed message, a subscriber per client,
and their housekeeping (see docs/gateway.md)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import redis_reads
from gateway.counters import Counters
from gateway.errors import Draining, MessageGone
from gateway.positions import MessageInfo, StartPoint
from gateway.subscriber import Subscriber
from gateway.tail import NOT_IN_MEMORY, LiveChannels, NotInMemory, Tail
from shared import keys
from shared.events import ZERO_ID, EntryId, Event
from shared.messages import REWOUND
from shared.redis_client import RedisClient

_log = logging.getLogger(__name__)


class Hub:
    """All tails and subscribers of one gateway process."""

    def __init__(
        self,
        redis: RedisClient,
        live: LiveChannels,
        reads: RedisClient | None = None,
        *,
        backlog: int,
        heartbeat_s: float,
        replay: int,
        ttl_ms: int,
        replay_bytes: int = 131_072,
        linger_s: float = 5.0,
        presence_interval_s: float = 10.0,
        announcements_are_hints: bool = False,
        max_reads: int = 64,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.redis = redis  # for writes (presence, rewind marks)
        # How long a join waits for a tail's start: long enough to wait out a failover, not
        # forever (a shard that lost its primary and every replica never answers).
        self.start_timeout_s = start_timeout_s
        #: For reads of streams and meta: ``redis``, or a client of replicas (durable mode).
        self.reads = redis if reads is None else reads
        self.live = live
        self.backlog = backlog
        self.heartbeat_s = heartbeat_s
        self.replay = replay  # latest events each tail keeps in memory (TOKENRELAY_LIVE_REPLAY)
        self.replay_bytes = replay_bytes  # and their bytes at most (TOKENRELAY_LIVE_REPLAY_BYTES)
        self.ttl_ms = ttl_ms  # how long a message lives after its last event
        # A tail nobody watches is kept this long, so clients that reconnect find it warm.
        self.linger_s = linger_s
        self.presence_interval_s = presence_interval_s
        # Durable mode: events are read where ``reads`` reads, never taken from announcements.
        self.announcements_are_hints = announcements_are_hints
        # Stream reads in flight at once, for every tail and join of the process.
        self._reads_gate = asyncio.Semaphore(max_reads)
        self.counters = Counters()
        #: Set on shutdown: every stream ends (with a retry hint) so its client resumes elsewhere.
        self.draining = False
        #: Done once draining starts: a join still waiting for its tail gives up then.
        self._drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails: dict[str, Tail] = {}
        self._subscribers: set[Subscriber] = set()
        self._presence_renewed = 0.0
        # Tails with events to hand on once the announcements read together are all in.
        self._flushing: list[Tail] = []
        self._closing = False
        self._loop = asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def tail_count(self) -> int:
        return len(self._tails)

    # Joining

    def locate_now(
        self, message_id: str, cursor: EntryId | None
    ) -> StartPoint | NotInMemory | None:
        """Where a reader at ``cursor`` starts, if a warm tail's memory tells (no await);
        :data:`NOT_IN_MEMORY` otherwise. None: the cursor is the final event."""
        tail = self._tails.get(message_id)
        return NOT_IN_MEMORY if tail is None else tail.locate(cursor)

    async def locate(
        self, message_id: str, cursor: EntryId | None, *, tenant: str | None = None
    ) -> StartPoint | None:
        """Where a reader at ``cursor`` (None: the start) starts; None when it is the final
        event. Starts the message's tail if it has none here, whose first read answers every
        join near the live end.

        Raises MessageGone (no such message, or with ``tenant`` one of another tenant),
        NotAnEvent (the cursor is not one of its events), Draining (this gateway began to
        stop meanwhile: its client is to come back elsewhere) and RedisError.
        """
        if self.draining:
            raise Draining("this gateway is shutting down")
        tail = self._tail(message_id, None)
        # A join waiting for the tail's start watches it: it is not dropped as idle meanwhile
        # (a start can take long: a subscription waiting out a failover).
        tail.watchers += 1
        tail.unwatched_since = None
        try:
            if tail.when_started.done():
                info = await tail.started()
            else:
                starting = asyncio.ensure_future(tail.started())
                waits: set[asyncio.Future[Any]] = {starting, self._drained}
                await asyncio.wait(
                    waits, timeout=self.start_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not starting.done():
                    starting.cancel()
                    await asyncio.gather(starting, return_exceptions=True)
                    if self.draining:
                        raise Draining("this gateway is shutting down")
                    raise RedisTimeoutError(
                        f"message {message_id}: Redis did not answer within "
                        f"{self.start_timeout_s:g} s"
                    )
                info = starting.result()
        finally:
            self._unwatch(message_id)
        if tenant is not None and info.tenant != tenant:
            # Exactly as a missing message: another tenant learns nothing of it.
            raise MessageGone(f"message {message_id} does not exist or has expired")
        start = tail.locate(cursor)
        if not isinstance(start, NotInMemory):
            return start
        self.counters.reads += 1
        async with self._reads_gate:
            if cursor is None or cursor == ZERO_ID:  # memory cannot say if Redis still has it
                info, _ = await redis_reads.read_head(self.reads, message_id, 1)
                return StartPoint(ZERO_ID, 0, info)
            return await redis_reads.locate(self.reads, message_id, cursor, info)

    def subscribe(self, message_id: str, start: StartPoint, *, created: bool = False) -> Subscriber:
        """A subscriber of ``message_id`` receiving every event after ``start``. ``created``:
        the message was just created here (its meta is ``start.info``)."""
        tail = self._tail(message_id, start.info if created else None)
        tail.watchers += 1
        tail.unwatched_since = None
        subscriber = Subscriber(
            tail,
            start,
            backlog=self.backlog,
            counters=self.counters,
            clock=self.now,
            on_close=self._forget,
        )
        self._subscribers.add(subscriber)
        if start.info.watch_ms is not None:
            self._presence_renewed = 0.0  # renew at the next tick
        return subscriber

    def warm_tail(self, message_id: str) -> Tail | None:
        """The message's tail if it is live and sound (its memory can answer for Redis)."""
        tail = self._tails.get(message_id)
        return tail if tail is not None and tail.sound else None

    def _tail(self, message_id: str, info: MessageInfo | None) -> Tail:
        tail = self._tails.get(message_id)
        if tail is None or tail.failed or tail.broken:
            watchers = 0 if tail is None else tail.watchers
            # A failed start was reported to whoever waited for it: start anew. The channel
            # stays subscribed (the new tail subscribes it again) until the tail is dropped.
            tail = self._tails[message_id] = Tail(
                message_id,
                redis=self.reads,
                live=self.live,
                replay=self.replay,
                replay_bytes=self.replay_bytes,
                ttl_ms=self.ttl_ms,
                counters=self.counters,
                clock=self.now,
                schedule_flush=self._to_flush,
                mark_rewound=self._mark_rewound,
                info=info,
                hints_only=self.announcements_are_hints,
                reads_gate=self._reads_gate,
            )
            tail.watchers = watchers
        elif tail.info is None and info is not None:
            tail.info = info
        return tail

    def _forget(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        self._unwatch(subscriber.message_id)

    def _unwatch(self, message_id: str) -> None:
        tail = self._tails.get(message_id)
        if tail is not None:
            tail.watchers -= 1
            if tail.watchers <= 0:
                tail.watchers = 0
                tail.unwatched_since = self.now()

    # The live channel

    def on_message(self, channel: bytes, payload: bytes) -> None:
        """LiveChannels callback: one announcement."""
        message_id = keys.message_id_of_channel(channel)
        tail = self._tails.get(message_id)
        if tail is not None:
            tail.announce(Event.from_announcement(payload))

    def on_resubscribed(self) -> None:
        """LiveChannels callback: the connection was re-established (perhaps to a new primary);
        announcements may be lost, and so may events (see Tail.resync)."""
        for tail in self._tails.values():
            tail.resync(check_last=True)

    async def _mark_rewound(self, message_id: str) -> None:
        await self.redis.hset(keys.message_meta(message_id), REWOUND, b"1")

    def _to_flush(self, tail: Tail) -> None:
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

    # Housekeeping

    async def run_housekeeping(self) -> None:
        """Heartbeats, checks of quiet tails, presence and removal of unwatched tails; run until
        closed. A failing round is logged and the next one runs."""
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
            subscriber.heartbeat_due(now, self.heartbeat_s)
        for tail in list(self._tails.values()):
            if tail.ready and tail.attached and now - tail.last_heard >= self.heartbeat_s:
                tail.last_heard = now
                tail.resync(verify=True)
        await self._renew_presence(now)
        await self._drop_idle_tails(now)

    async def _renew_presence(self, now: float) -> None:
        """Keep the presence key of every watched cancel-on-disconnect message alive."""
        watched = [
            (tail.message_id, tail.info.watch_ms)
            for tail in self._tails.values()
            if tail.watchers and tail.info is not None and tail.info.watch_ms is not None
        ]
        if not watched:
            return
        # Renew well within the shortest lifetime in use (gateways may differ in settings).
        shortest_s = min(watch_ms for _, watch_ms in watched) / 1000
        if now - self._presence_renewed < min(self.presence_interval_s, shortest_s / 3):
            return
        self._presence_renewed = now
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id, watch_ms in watched:
                pipe.set(keys.message_watched(message_id), b"1", px=watch_ms)
            await pipe.execute()

    async def _drop_idle_tails(self, now: float) -> None:
        idle = [
            tail
            for tail in self._tails.values()
            if not tail.watchers
            and tail.unwatched_since is not None
            and now - tail.unwatched_since >= self.linger_s
        ]
        for tail in idle:
            # Awaits below let subscribers come and go: decide on the current state.
            if self._tails.get(tail.message_id) is not tail or tail.watchers:
                continue
            del self._tails[tail.message_id]
            # Unsubscribe at once, before any await: its write is queued before the SUBSCRIBE
            # of a new tail for the same message, so the new subscription is not undone.
            await self.live.unsubscribe(tail.channel)
            await tail.aclose()

    # Shutdown

    def drain(self) -> None:
        """End every stream now, each telling its client to come back (to another gateway)."""
        self.draining = True
        if not self._drained.done():
            self._drained.set_result(None)
        for subscriber in list(self._subscribers):
            subscriber.drain()

    async def aclose(self) -> None:
        """End every subscriber and tail."""
        self._closing = True
        for subscriber in list(self._subscribers):
            subscriber.close()
        tails, self._tails = list(self._tails.values()), {}
        for tail in tails:
            await tail.aclose()
