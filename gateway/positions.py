"""Where a reader stands in a message: its start point, a gap of trimmed history, what the
message's meta says."""

from __future__ import annotations

from dataclasses import dataclass

from shared.events import EntryId, Event


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """What a renderer and the fan-out need to know of a message (its meta never changes)."""

    model: str
    created_s: int
    include_usage: bool
    watch_ms: int | None
    #: Whose message it is (the tenant of the key that created it; empty when created with
    #: access control off).
    tenant: str = ""
    #: What the request asked that its API reports back (JSON; see shared.messages.ASKED).
    asked: bytes = b""


@dataclass(frozen=True, slots=True)
class StartPoint:
    """Read every event after ``after``; ``next_n`` is the expected first sequence number
    (None when the cursor points into trimmed history, so a gap is reported first).
    ``rewound``: the reader's position was lost with events Redis lost; it starts again, after
    being told to discard what it had."""

    after: EntryId
    next_n: int | None
    info: MessageInfo
    rewound: bool = False
    #: Located in a tail's memory, without reading Redis.
    from_memory: bool = False


@dataclass(frozen=True, slots=True)
class Gap:
    """Events between ``after`` (None: the start) and ``resumes_at`` are no longer retained."""

    after: EntryId | None
    resumes_at: EntryId


@dataclass(frozen=True, slots=True)
class Rewound:
    """Redis lost events this reader may have been sent (it failed over to a replica that
    lacked them): discard what came before; the message follows again from its start."""


#: What a subscriber hands on: events, gaps where history was trimmed, and rewinds.
Item = Event | Gap | Rewound
