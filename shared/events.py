"""The event model shared by writers and readers: stream entries, live announcements, entry ids.

A message's stream holds one entry per event with three fields: ``n`` (sequence number from 0,
consecutive; a reader that sees a jump knows it missed something), ``k`` (the kind) and ``d`` (the
data, JSON). The same fields are announced on the message's channel as
``b"<entry id> <n> <kind> <data>"``.

Kinds and their data:

- ``chunk``: answer text, as a JSON string (the common case, and the one that is coalesced);
- ``choice``: an OpenAI-style choice object without ``index`` (``delta`` with role, tool_calls,
  refusal..., ``finish_reason``, ``logprobs``), exactly as the model backend produced it;
- ``usage``: token counts, an OpenAI ``usage`` object;
- ``done``: the end (data empty); ``error``: the end, ``{"type", "message"}``;
  ``cancelled``: the end, generation stopped on request (``{"reason"}``);
- ``reset``: the worker was lost and another generates the answer again from the start, so
  whatever came before this event is to be discarded (``{"reason"}``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import orjson

# Ids reach Redis only after this check; the length cap keeps huge digit strings out.
# ASCII digits only (Python's \d would take any script's digits); bytes as Redis sends them.
_ENTRY_ID = re.compile(r"(\d{1,20})-(\d{1,20})", re.ASCII)
_ENTRY_ID_BYTES = re.compile(rb"(\d{1,20})-(\d{1,20})")
_MAX_PART = 2**64 - 1


class Kind(StrEnum):
    """What an event is. ``DONE``, ``ERROR`` and ``CANCELLED`` are terminal: nothing follows."""

    CHUNK = "chunk"
    CHOICE = "choice"
    USAGE = "usage"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"
    #: Another worker took the generation over and starts it again: discard what came before.
    RESET = "reset"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({Kind.DONE, Kind.ERROR, Kind.CANCELLED})
_KINDS = {k.value.encode(): k for k in Kind}


class EntryId(NamedTuple):
    """A Redis stream entry id, ordered as Redis orders them."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str | bytes) -> EntryId:
        """Parse ``"<ms>-<seq>"``; raise ValueError for anything else."""
        # Every announcement and every resume parses one: no decoding, one match, two ints.
        match = (
            _ENTRY_ID_BYTES.fullmatch(text)
            if isinstance(text, bytes)
            else _ENTRY_ID.fullmatch(text)
        )
        if match is not None:
            ms, seq = int(match[1]), int(match[2])
            if ms <= _MAX_PART and seq <= _MAX_PART:  # Redis ids: two unsigned 64-bit integers
                return cls(ms, seq)
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        raise ValueError(f"not a stream entry id: {text!r}")

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


ZERO_ID = EntryId(0, 0)


@dataclass(slots=True)
class Event:
    """One event of a message, as read from its stream or its live channel."""

    id: EntryId
    raw_id: bytes
    n: int
    kind: Kind
    data: bytes

    @classmethod
    def from_entry(cls, raw_id: bytes, fields: dict[bytes, bytes]) -> Event:
        """Build from an XRANGE/XREAD entry."""
        return cls(
            EntryId.parse(raw_id), raw_id, int(fields[b"n"]), _KINDS[fields[b"k"]], fields[b"d"]
        )

    @classmethod
    def from_announcement(cls, payload: bytes) -> Event:
        """Build from a live-channel payload ``<id> <n> <kind> <data>``."""
        raw_id, n, kind, data = payload.split(b" ", 3)
        return cls(EntryId.parse(raw_id), raw_id, int(n), _KINDS[kind], data)

    def content(self) -> str:
        """The answer text this event carries ("" for events without text)."""
        if self.kind is Kind.CHUNK:
            text: str = orjson.loads(self.data)
            return text
        if self.kind is Kind.CHOICE:
            delta = orjson.loads(self.data).get("delta") or {}
            content = delta.get("content")
            return content if isinstance(content, str) else ""
        return ""
