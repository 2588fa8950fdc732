"""Batches: the consecutive events a tail hands to its listeners at once."""

from __future__ import annotations

from shared.events import Event


class Batch:
    """Consecutive events a tail hands to its listeners at once.

    Announcements that arrive together (the gateway was busy while they came) are handed on
    together, so a client that keeps up gets them in one write: under load the cost per event
    falls instead of the queue growing.
    """

    __slots__ = ("events", "terminal")

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.terminal = events[-1].kind.terminal


def consecutive(events: list[Event]) -> list[Batch]:
    """``events`` in batches of consecutive sequence numbers (a jump is trimmed history,
    which each subscriber reports as a gap before the events after it)."""
    if len(events) == 1:
        return [Batch(events)]
    start = 0
    batches = []
    for index in range(1, len(events)):
        if events[index].n != events[index - 1].n + 1:
            batches.append(Batch(events[start:index]))
            start = index
    batches.append(Batch(events[start:] if start else events))
    return batches
