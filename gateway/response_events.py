"""OpenAI's Responses API over a message's events: the response object and its event stream
(the request: gateway.response_requests).

The stream is made from the same stored events as the other formats. Sequence numbers are a
pure function of the stored events, so any gateway numbers them alike and a client resumes
with ``starting_after`` (or ``Last-Event-ID``): ``response.created``, ``response.in_progress``,
``response.output_item.added`` and ``response.content_part.added`` are 0 to 3; the event
numbered ``n`` in the message is ``4 + n`` (a text delta; other stored events have no
Responses event, so their numbers are skipped); the terminal event ``n`` is the closing block
``4 + n`` to ``7 + n`` (``output_text.done``, ``content_part.done``, ``output_item.done`` and
``response.completed``, ``.failed`` or ``.incomplete``). Text deltas and the last event of the
closing block carry the stored event's entry id as their SSE ``id:``.

A Responses stream always reads its message from the start (its closing events repeat the
whole text); what the client already has is not sent again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.frames import Renderer
from gateway.positions import Gap, MessageInfo
from shared.events import EntryId, Event, Kind

PRELUDE_EVENTS = 4


def response_id(message_id: str) -> str:
    return f"resp_{message_id}"


def message_id_of(response_id_text: str) -> str | None:
    """The message id of a response id (None when it is not one of ours)."""
    return response_id_text[5:] if response_id_text.startswith("resp_") else None


def _item_id(message_id: str) -> str:
    return f"msg_{message_id}"


# The response object and the event stream


@dataclass(slots=True)
class ResponseState:
    """What a message's events say of its response: its text, usage and status so far."""

    message_id: str
    info: MessageInfo
    text: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    #: None while it runs; then completed, failed, cancelled or incomplete.
    ended: str | None = None
    error: dict[str, Any] | None = None
    finish_reason: str | None = None

    def add(self, event: Event) -> None:
        kind = event.kind
        if kind is Kind.CHUNK:
            self.text.append(orjson.loads(event.data))
        elif kind is Kind.CHOICE:
            self.text.append(event.content())
            self.finish_reason = orjson.loads(event.data).get("finish_reason") or self.finish_reason
        elif kind is Kind.USAGE:
            self.usage = orjson.loads(event.data)
        elif kind is Kind.RESET:
            self.text.clear()  # generated again from the start
        elif kind is Kind.DONE:
            # An answer cut by its token limit is "incomplete", as OpenAI reports it.
            self.ended = "incomplete" if self.finish_reason == "length" else "completed"
        elif kind is Kind.ERROR:
            self.ended, self.error = "failed", orjson.loads(event.data)
        elif kind is Kind.CANCELLED:
            self.ended = "cancelled"
            self.usage = orjson.loads(event.data or b"{}").get("usage") or self.usage

    @property
    def asked(self) -> dict[str, Any]:
        """What the request asked that the object reports back (ResponsesRequest.echoed)."""
        return orjson.loads(self.info.asked) if self.info.asked else {}

    def as_object(self, status: str | None = None) -> dict[str, Any]:
        """The response object (``status``: what to report while it has not ended)."""
        status = self.ended or status or "in_progress"
        asked = self.asked
        text = "".join(self.text)
        item_status = {
            "completed": "completed",
            "in_progress": "in_progress",
            "queued": "in_progress",
        }
        output = (
            [
                {
                    "id": _item_id(self.message_id),
                    "type": "message",
                    "role": "assistant",
                    "status": item_status.get(status, "incomplete"),
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ]
            if text or status in ("completed", "incomplete")
            else []
        )
        error = None
        if self.error is not None:
            error = {
                "code": "server_error",
                "message": str(self.error.get("message") or self.error.get("type")),
            }
        usage = None
        if self.usage is not None:
            prompt = int(self.usage.get("prompt_tokens", 0))
            completion = int(self.usage.get("completion_tokens", 0))
            usage = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }
        return {
            "id": response_id(self.message_id),
            "object": "response",
            "created_at": self.info.created_s,
            "status": status,
            "background": bool(asked.get("background")),
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": asked.get("instructions"),
            "max_output_tokens": asked.get("max_output_tokens"),
            "model": self.info.model,
            "output": output,
            "output_text": text,
            "parallel_tool_calls": False,
            "metadata": asked.get("metadata") or {},
            "temperature": asked.get("temperature"),
            "top_p": asked.get("top_p"),
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "usage": usage,
        }


class ResponsesRenderer(Renderer):
    """The Responses API event stream of one client (it keeps the text so far, so it is
    rendered for each client apart: its key is its own)."""

    heartbeat = b": ping\n"  # no blank line: nothing any SSE parser dispatches

    def __init__(
        self,
        message_id: str,
        info: MessageInfo,
        *,
        starting_after: int | None = None,
        after_entry: EntryId | None = None,
    ) -> None:
        super().__init__(message_id, retry_ms=None)
        self.key = f"responses:{id(self)}"
        self.state = ResponseState(message_id, info)
        #: Events the client has: numbered up to this (or up to this entry id).
        self._starting_after = -1 if starting_after is None else starting_after
        self._after_entry = after_entry

    @property
    def prelude(self) -> bytes:
        if self._after_entry is not None:
            return b""
        # Queued only in the background: a response streamed as it is asked runs at once.
        background = bool(self.state.asked.get("background"))
        created = self.state.as_object("queued" if background else "in_progress")
        running = self.state.as_object("in_progress")
        item = {
            "id": _item_id(self.message_id),
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        part = {"type": "output_text", "text": "", "annotations": []}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": created},
            {"type": "response.in_progress", "response": running},
            {"type": "response.output_item.added", "output_index": 0, "item": item},
            {
                "type": "response.content_part.added",
                "item_id": item["id"],
                "output_index": 0,
                "content_index": 0,
                "part": part,
            },
        ]
        return b"".join(self._event(body, number) for number, body in enumerate(events))

    def _event(self, body: dict[str, Any], number: int, entry: bytes | None = None) -> bytes:
        if number <= self._starting_after:
            return b""
        body["sequence_number"] = number
        head = b"id: " + entry + b"\n" if entry is not None else b""
        kind: str = body["type"]
        return head + b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    def _known(self, event: Event) -> bool:
        return self._after_entry is not None and event.id <= self._after_entry

    def render(self, event: Event) -> bytes:
        before = len(self.state.text)
        self.state.add(event)
        if self._known(event):
            return b""
        number = PRELUDE_EVENTS + event.n
        if event.kind in (Kind.CHUNK, Kind.CHOICE) and len(self.state.text) > before:
            delta = self.state.text[-1]
            if not delta:
                return b""
            body = {
                "type": "response.output_text.delta",
                "item_id": _item_id(self.message_id),
                "output_index": 0,
                "content_index": 0,
                "delta": delta,
                "logprobs": [],
            }
            return self._event(body, number, event.raw_id)
        if event.kind is Kind.RESET:
            body = {
                "type": "error",
                "code": "generation_restarted",
                "message": "the generation was restarted on another worker; discard the text so "
                "far: the complete text comes with response.output_text.done",
                "param": None,
            }
            return self._event(body, number, event.raw_id)
        if event.kind.terminal:
            return self._closing(number, event.raw_id)
        return b""

    def _closing(self, number: int, entry: bytes) -> bytes:
        state = self.state
        text = "".join(state.text)
        item_id = _item_id(self.message_id)
        whole = state.as_object()
        item = whole["output"][0] if whole["output"] else None
        last = {
            "completed": "response.completed",
            "incomplete": "response.incomplete",
            "failed": "response.failed",
            "cancelled": "response.incomplete",
        }[state.ended or "failed"]
        part = {"type": "output_text", "text": text, "annotations": []}
        events: list[dict[str, Any]] = [
            {
                "type": "response.output_text.done",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            },
            {
                "type": "response.content_part.done",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "part": part,
            },
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "item": item
                or {
                    "id": item_id,
                    "type": "message",
                    "role": "assistant",
                    "status": "incomplete",
                    "content": [part],
                },
            },
            {"type": last, "response": whole},
        ]
        return b"".join(
            self._event(body, number + k, entry if k == 3 else None)
            for k, body in enumerate(events)
        )

    def interrupted(self, reason: str) -> bytes:
        return self._error(
            f"stream interrupted ({reason}); resume with starting_after", "stream_interrupted"
        )

    def draining(self) -> bytes:
        return self.interrupted("gateway shutting down")

    def lost(self) -> bytes:
        return self._error("the response no longer exists; ask again", "message_lost")

    def rewound(self) -> bytes:
        return self._error(
            "storage failed over and lost part of this response; read it again from the start",
            "generation_restarted",
        )

    def gap(self, gap: Gap) -> bytes:
        del gap
        return self._error("part of this response is no longer retained", "history_truncated")

    @staticmethod
    def _error(message: str, code: str) -> bytes:
        # No sequence number: it is no position in the response.
        body = {"type": "error", "code": code, "message": message, "param": None}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"
