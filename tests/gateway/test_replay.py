"""A tail's memory (gateway.replay): bounded by count and bytes, and what it can tell."""

from __future__ import annotations

import time

from gateway.replay import Replay
from shared.events import ZERO_ID, EntryId, Event, Kind


def _event(n: int, data: bytes = b'"x"', *, ms: int = 1_000, kind: Kind = Kind.CHUNK) -> Event:
    entry = EntryId(ms, n)
    return Event(entry, str(entry).encode(), n, kind, data)


def test_it_keeps_the_newest_events_and_covers_what_follows_the_last_dropped() -> None:
    replay = Replay(3, 1_000_000, ttl_ms=60_000)
    events = [_event(n) for n in range(5)]
    for event in events:
        replay.add(event)
    assert replay.events_after(ZERO_ID) == events[2:]
    assert replay.floor == events[1].id  # the last one dropped
    assert replay.covers(events[1].id, events[4].id)
    assert not replay.covers(events[0].id, events[4].id)
    assert replay.events_after(events[3].id) == events[4:]
    assert replay.held_bytes == 3 * len(b'"x"')


def test_its_bytes_are_bounded_but_the_newest_event_is_always_kept() -> None:
    replay = Replay(100, 10, ttl_ms=60_000)
    small, big = _event(0, b"12345"), _event(1, b"1234567")
    replay.add(small)
    replay.add(big)
    assert replay.events_after(ZERO_ID) == [big]
    assert replay.floor == small.id
    huge = _event(2, b"x" * 50)
    replay.add(huge)
    assert replay.events_after(ZERO_ID) == [huge]
    assert replay.held_bytes == 50


def test_it_finds_the_event_at_a_cursor_only_when_it_holds_that_event() -> None:
    replay = Replay(10, 1_000_000, ttl_ms=60_000)
    for n in (3, 4, 5):
        replay.add(_event(n))
    found = replay.at(EntryId(1_000, 4))
    assert found is not None
    assert found.n == 4
    assert replay.at(EntryId(1_000, 2)) is None  # older than memory
    assert replay.at(EntryId(999, 9)) is None  # not an id of the message


def test_memory_that_holds_no_events_covers_only_the_last() -> None:
    replay = Replay(0, 1_000_000, ttl_ms=60_000)
    replay.add(_event(0))
    replay.add(_event(1))
    assert replay.events_after(ZERO_ID) == []
    assert replay.capacity == 0
    assert replay.floor == EntryId(1_000, 1)
    replay.started(EntryId(1_000, 1))
    assert replay.covers(EntryId(1_000, 1), EntryId(1_000, 1))
    assert not replay.covers(EntryId(1_000, 0), EntryId(1_000, 1))


def test_a_start_not_held_from_the_beginning_covers_from_its_oldest_event() -> None:
    replay = Replay(10, 1_000_000, ttl_ms=60_000)
    for n in (7, 8):
        replay.add(_event(n))
    replay.started(EntryId(1_000, 8))
    assert replay.floor == EntryId(1_000, 7)
    fresh = Replay(10, 1_000_000, ttl_ms=60_000)
    fresh.add(_event(0))
    fresh.started(EntryId(1_000, 0))
    assert fresh.floor == ZERO_ID  # the message from its start


def test_a_finished_message_is_expiring_near_its_ttl() -> None:
    now_ms = int(time.time() * 1000)
    ttl_ms = 60_000
    replay = Replay(10, 1_000_000, ttl_ms=ttl_ms)
    replay.add(_event(0, ms=now_ms - 50_000))
    assert not replay.expiring()  # not finished
    replay.add(_event(1, b"{}", ms=now_ms - 50_000, kind=Kind.DONE))
    assert not replay.expiring()  # 10 s left, more than the skew allowed
    late = Replay(10, 1_000_000, ttl_ms=ttl_ms)
    late.add(_event(0, b"{}", ms=now_ms - 56_000, kind=Kind.DONE))
    assert late.expiring()  # within the 5 s allowed for clock skew
    late.clear()
    assert not late.expiring()
    assert late.held_bytes == 0
    assert late.floor == ZERO_ID
