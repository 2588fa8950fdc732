"""One client's view of a message from a start point on: it catches up (from its tail's
memory or Redis), then attaches to the tail, whose live events it hands to its sink or queues
(see docs/gateway.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from gateway.batches import Batch
from gateway.counters import Counters
from gateway.errors import Draining, MessageGone
from gateway.positions import Gap, Item, Rewound, StartPoint
from gateway.redis_reads import READ_BATCH
from gateway.tail import Tail
from shared.events import ZERO_ID, Event

REWOUND = Rewound()
#: Bytes of event data a subscriber catching up from memory takes at once.
CATCH_UP_BYTES = 65_536


class Sink(Protocol):
    """Where a live subscriber's events go as the tail delivers them (see gateway.delivery)."""

    def offer(self, batch: Batch) -> bool:
        """Send ``batch`` now; False (nothing sent) when the client is not keeping up."""


class Subscriber:
    """:meth:`next_batch` until None, then :meth:`close`."""

    # Slots: a gateway holds one per connection, and thousands of connections.
    __slots__ = (
        "_backlog",
        "_catching_up",
        "_clock",
        "_closed",
        "_counters",
        "_draining",
        "_finished",
        "_gone",
        "_heartbeat_due",
        "_last_id",
        "_next_n",
        "_on_close",
        "_pending",
        "_tail",
        "_waiter",
        "last_active",
        "sink",
    )

    def __init__(
        self,
        tail: Tail,
        start: StartPoint,
        *,
        backlog: int,
        counters: Counters,
        clock: Callable[[], float],
        on_close: Callable[[Subscriber], None],
    ) -> None:
        self._tail = tail
        self._last_id = start.after
        self._next_n = start.next_n
        self._backlog = backlog
        self._counters = counters
        self._clock = clock
        self._on_close = on_close
        self._pending: list[Item] = [REWOUND] if start.rewound else []
        self._catching_up = True
        self._finished = False
        self._closed = False
        self._gone = False
        self._draining = False
        self._heartbeat_due = False
        self._waiter: asyncio.Future[None] | None = None
        self.last_active = clock()
        #: Set by the delivery when it can write live events itself, without a task switch.
        self.sink: Sink | None = None

    @property
    def message_id(self) -> str:
        return self._tail.message_id

    @property
    def live(self) -> bool:
        """Attached to its tail (caught up)."""
        return not self._catching_up

    @property
    def position(self) -> str:
        """The id of the last event taken (``0-0`` before any)."""
        return str(self._last_id)

    async def next_batch(self) -> list[Item] | None:
        """Items ready to send, in order; ``[]`` means "send a heartbeat"; None means the end.

        The end comes after the terminal event, or once :meth:`close` was called. Raises
        :class:`MessageGone` when the message disappeared, :class:`Draining` when the gateway
        shuts down, and RedisError when Redis fails.
        """
        while True:
            if self._pending:
                return self._take_pending()
            if self._gone:
                raise MessageGone(f"message {self.message_id} expired or was deleted")
            if self._draining:
                raise Draining("this gateway is shutting down")
            if self._finished or self._closed:
                return None
            if self._heartbeat_due:
                self._heartbeat_due = False
                self.last_active = self._clock()
                return []
            if self._catching_up:
                await self._catch_up()
            else:
                await self._wait()

    def ready_now(self) -> list[Item]:
        """The items that can be sent without waiting: what is queued, after catching up from
        the tail's memory when it covers the position (which attaches to the tail).
        :meth:`next_batch` goes on from there."""
        if self._catching_up and not (self._closed or self._gone or self._draining):
            self._catch_up_in_memory()
        return self._take_pending() if self._pending else []

    def close(self) -> None:
        """Release everything this subscriber holds; a pending :meth:`next_batch` returns None."""
        if self._closed:
            return
        self._closed = True
        self._tail.detach(self)
        self._on_close(self)
        self._wake()

    def heartbeat_due(self, now: float, interval_s: float) -> None:
        """Send a heartbeat if nothing was sent for ``interval_s``."""
        if now - self.last_active >= interval_s:
            self._heartbeat_due = True
            self._wake()

    def drain(self) -> None:
        """End the stream now (:class:`Draining`): the client is to come back elsewhere."""
        self._draining = True
        self._wake()

    # Listener (the tail calls these)

    def push(self, batch: Batch, now: float) -> None:
        events = batch.events
        last_id = self._last_id
        if events[-1].id <= last_id:
            return  # already read from the stream while catching up
        if events[0].id <= last_id:  # partly read: only the rest is new (rare)
            batch = Batch([event for event in events if event.id > last_id])
            events = batch.events
        sink = self.sink
        # Straight to the client when nothing is queued before it and nothing is missing.
        if sink is not None and not self._pending and self._next_n == events[0].n:
            if sink.offer(batch):
                self._counters.delivered += len(events)
                last = events[-1]
                self._last_id = last.id
                self._next_n = last.n + 1
                self.last_active = now
                if batch.terminal:
                    self._finished = True
                    self._tail.detach(self)
                    self._wake()
                return
            # The client is not keeping up: catch up from the stream once it has drained.
            self._counters.fell_behind += 1
            self.fall_back()
            return
        if len(self._pending) + len(events) > self._backlog:
            # Too slow, or too much at once: stop buffering in memory and read the stream.
            self.fall_back()
            return
        for event in events:
            if not self._enqueue(event):
                break
        self._wake()

    def fall_back(self) -> None:
        """Leave the tail and catch up from the stream (memory or Redis) at the client's pace."""
        self._tail.detach(self)
        self._catching_up = True
        self._wake()

    def rewind(self) -> None:
        if self._finished:
            return  # its client has the whole answer; the stream is over
        self._tail.detach(self)
        self._pending = [REWOUND]
        self._last_id, self._next_n = ZERO_ID, 0
        self._catching_up = True
        self._finished = False
        self._wake()

    def end(self, *, gone: bool) -> None:
        if gone:
            self._gone = True
            self._tail.detach(self)
            self._wake()
        else:
            self.close()

    # Catching up

    def _take_pending(self) -> list[Item]:
        batch, self._pending = self._pending, []
        self._counters.delivered += sum(isinstance(item, Event) for item in batch)
        self._heartbeat_due = False  # what is sent now counts as a sign of life
        self.last_active = self._clock()
        return batch

    def _enqueue(self, event: Event) -> bool:
        """Queue ``event``; False when the events that follow it are not to be queued (the
        end, or a rewind)."""
        if self._next_n is not None and event.n < self._next_n:
            # A number already taken, at a newer id: Redis lost events and they were written
            # again (a failover). Start again from the message's start, saying so.
            self._pending.append(REWOUND)
            self._last_id, self._next_n = ZERO_ID, 0
            self._catching_up = True
            self._tail.detach(self)
            return False
        if self._next_n != event.n:
            self._pending.append(Gap(None if self._last_id == ZERO_ID else self._last_id, event.id))
        self._pending.append(event)
        self._last_id = event.id
        self._next_n = event.n + 1
        if event.kind.terminal:
            self._finished = True
            self._tail.detach(self)
            return False
        return True

    async def _catch_up(self) -> None:
        tail = self._tail
        if not tail.ready:
            await self._tail_started()
            return
        if tail.broken:
            self.close()  # the client reconnects, and gets a tail that works
            return
        if self._catch_up_in_memory():
            return
        events = await tail.read_after(self._last_id)
        for event in events:
            if not self._enqueue(event):
                return
        if len(events) == READ_BATCH or self._closed or self._gone:
            return
        # No await between the read above and this check: the tail cannot move in between.
        if tail.sound and tail.last_id <= self._last_id:
            self._attach()
        elif not events:
            # The tail is ahead, yet Redis has nothing after our position: the stream was
            # deleted or expired under us. Say so rather than asking again in a tight loop.
            if not await tail.exists():
                self.end(gone=True)
            else:
                await asyncio.sleep(0.05)

    async def _tail_started(self) -> None:
        """Wait for the tail to start, but stay responsive to heartbeats and close(); raise
        what made its start fail."""
        started = self._tail.when_started
        await self._wait(started)
        if started.done():
            await self._tail.started()

    def _catch_up_in_memory(self) -> bool:
        """Catch up from the tail's latest events and attach, if they cover this subscriber's
        position; no Redis read and no await, so nothing can arrive in between."""
        tail = self._tail
        if not tail.sound or not tail.covers(self._last_id):
            return False
        budget = CATCH_UP_BYTES
        for event in tail.events_after(self._last_id):
            if budget <= 0:
                # Enough for one write: the rest after it is sent (and, when the client is
                # slow, after its socket drained), still in order: not attached meanwhile.
                return True
            if not self._enqueue(event):
                return True
            budget -= len(event.data)
        self._attach()
        return True

    def _attach(self) -> None:
        self._catching_up = False
        self._tail.attach(self)

    async def _wait(self, also: asyncio.Future[Any] | None = None) -> None:
        """Sleep until pushed, woken (heartbeat, close, end), or ``also`` completes."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            if also is not None:
                await asyncio.wait({waiter, also}, return_when=asyncio.FIRST_COMPLETED)
            else:
                await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
