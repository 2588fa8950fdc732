"""What a tail keeps in memory of its message: the newest events it delivered, bounded by count
and by bytes of data, so that a reader a little behind the live edge is answered without Redis."""

from __future__ import annotations

import time
from collections import deque

from shared.events import ZERO_ID, EntryId, Event

_CLOCK_SKEW_MS = 5_000


class Replay:
    """The newest events of one message, in order. Every event after :attr:`floor`, up to the
    last one added, is among them."""

    __slots__ = ("_events", "_max_bytes", "_memory_ms", "floor", "held_bytes")

    def __init__(self, count: int, max_bytes: int, ttl_ms: int) -> None:
        self._events: deque[Event] = deque(maxlen=count)
        self._max_bytes = max_bytes
        # A finished message is answered from memory only while Redis surely still has it: it
        # expires ttl_ms after its last event (ids carry Redis's clock; allow for skew).
        self._memory_ms = ttl_ms - min(ttl_ms // 2, _CLOCK_SKEW_MS)
        self.floor = ZERO_ID
        #: Bytes of event data held.
        self.held_bytes = 0

    @property
    def capacity(self) -> int:
        """How many events it holds at most (0: none; memory then covers nothing)."""
        return self._events.maxlen or 0

    def add(self, event: Event) -> None:
        """Keep ``event`` among the newest, dropping the oldest past either bound (what memory
        covers then starts after the last one dropped)."""
        events = self._events
        if not events.maxlen:
            self.floor = event.id
            return
        if len(events) == events.maxlen:
            self._drop_oldest()
        events.append(event)
        self.held_bytes += len(event.data)
        while self.held_bytes > self._max_bytes and len(events) > 1:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        dropped = self._events.popleft()
        self.held_bytes -= len(dropped.data)
        self.floor = dropped.id

    def started(self, last_id: EntryId) -> None:
        """After the first events were added from Redis: memory holds the message from its
        start, or from its oldest event held."""
        events = self._events
        if not events.maxlen:
            self.floor = last_id
        elif self.floor == ZERO_ID and events and events[0].n != 0:
            self.floor = events[0].id  # nothing dropped, but the start is not held

    def clear(self) -> None:
        self._events.clear()
        self.held_bytes = 0
        self.floor = ZERO_ID

    def covers(self, position: EntryId, last_id: EntryId) -> bool:
        """Whether every event after ``position`` up to ``last_id`` is held."""
        return self.floor <= position <= last_id

    def events_after(self, position: EntryId) -> list[Event]:
        """The events held after ``position``, oldest first."""
        events = self._events
        start = len(events)
        while start and events[start - 1].id > position:
            start -= 1
        return [events[i] for i in range(start, len(events))]

    def at(self, cursor: EntryId) -> Event | None:
        """The event held at ``cursor``; None when memory cannot tell (not held, or not an
        event id of the message)."""
        for event in reversed(self._events):
            if event.id <= cursor:
                return event if event.id == cursor else None
        return None

    def expiring(self) -> bool:
        """The message is finished, and about to expire (or expired) in Redis."""
        events = self._events
        if not events or not events[-1].kind.terminal:
            return False
        return time.time() * 1000 >= events[-1].id.ms + self._memory_ms
