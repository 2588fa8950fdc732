"""SSE framing of message events, in the seed ``/chat/stream`` format and the OpenAI format.

Each event's frame is rendered once per format and cached on the event, so every subscriber in
the process shares it. Every frame of a stored event carries ``id:`` (its Redis entry id); the
synthetic ``truncated`` frame carries none, because it is no resume position.

Seed format::

    id: <entry id>
    data: {"id":"<message id>","content":"<chunk text>"}

    id: <entry id>
    data: [DONE]

    id: <entry id>
    event: error
    data: {"id":"<message id>","error":{"type":"...","message":"..."}}

    id: <entry id>
    event: cancelled
    data: {"id":"<message id>","reason":"requested"}

    event: truncated
    data: {"id":"<message id>","last_event_id":"<id or null>","resumes_at":"<entry id>"}

Events without text (a role, a finish reason, usage) are not rendered in the seed format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from gateway.direct import chunk
from gateway.hub import Gap, Item
from shared.events import Event, Kind


class Renderer:
    """Turns a batch of items of one message into bytes (``b""`` when none is visible)."""

    key = "base"
    #: A comment that keeps an idle stream (and every proxy on its path) alive.
    heartbeat = b": ping\n\n"

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        # A copy: orjson's own result keeps a 1 KB buffer, and this is kept per client.
        self._id_json = bytes(memoryview(orjson.dumps(message_id)))

    def __call__(self, items: Sequence[Item]) -> bytes:
        return b"".join([self.frame(item) for item in items])

    def frame(self, item: Item) -> bytes:
        if isinstance(item, Gap):
            return self.gap(item)
        frames = item.frames
        if frames is None:
            frames = item.frames = {}
        frame = frames.get(self.key)
        if frame is None:
            frame = frames[self.key] = self.render(item)
        return frame

    def chunked(self, events: list[Event]) -> bytes:
        """The events' frames as one HTTP/1.1 chunk (``b""`` when none has a frame): what the
        tail writes to every live subscriber's socket."""
        body = self(events)
        return chunk(body) if body else b""

    def render(self, event: Event) -> bytes:
        raise NotImplementedError

    def interrupted(self, reason: str) -> bytes:
        """What to send when the stream ends before its terminal event (Redis failed, the
        message vanished). Nothing, here: an EventSource then reconnects and resumes."""
        return b""

    def lost(self) -> bytes:
        """The message vanished (expired, or Redis lost its data) while the client read it:
        an error event (without ``id:``, it is no resume position) rather than a silent end."""
        body = {
            "id": self.message_id,
            "error": {"type": "message_lost", "message": "the message no longer exists; ask again"},
        }
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"

    def draining(self, retry_ms: int) -> bytes:
        """What to send when this gateway shuts down: come back after ``retry_ms`` (the load
        balancer sends the reconnect to another gateway)."""
        return b"retry: %d\n: this gateway is shutting down; reconnect\n\n" % retry_ms

    def gap(self, gap: Gap) -> bytes:
        body = {
            "id": self.message_id,
            "last_event_id": None if gap.after is None else str(gap.after),
            "resumes_at": str(gap.resumes_at),
        }
        return b"event: truncated\ndata: " + orjson.dumps(body) + b"\n\n"


class SeedRenderer(Renderer):
    """The ``/chat/stream`` format."""

    key = "seed"

    def render(self, event: Event) -> bytes:
        head = b"id: " + event.raw_id + b"\n"
        kind = event.kind
        if kind is Kind.CHUNK:
            return head + b'data: {"id":' + self._id_json + b',"content":' + event.data + b"}\n\n"
        if kind is Kind.CHOICE:
            content = event.content()
            if not content:
                return b""
            body = {"id": self.message_id, "content": content}
            return head + b"data: " + orjson.dumps(body) + b"\n\n"
        if kind is Kind.DONE:
            return head + b"data: [DONE]\n\n"
        if kind is Kind.ERROR:
            return (
                head
                + b'event: error\ndata: {"id":'
                + self._id_json
                + b',"error":'
                + event.data
                + b"}\n\n"
            )
        if kind is Kind.CANCELLED or kind is Kind.RESET:
            body = {"id": self.message_id, **orjson.loads(event.data or b"{}")}
            return (
                head + b"event: " + kind.value.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"
            )
        return b""  # usage


class OpenAIRenderer(Renderer):
    """OpenAI's ``chat.completion.chunk`` stream, with an ``id:`` on every frame."""

    # No blank line after the comment: the openai package's SSE decoder keeps the last event id
    # and would take the blank line for an event with empty data, which it cannot parse.
    heartbeat = b": ping\n"

    def __init__(self, message_id: str, *, model: str, created_s: int, include_usage: bool) -> None:
        super().__init__(message_id)
        self.key = "openai+usage" if include_usage else "openai"
        self.include_usage = include_usage
        head = orjson.dumps(
            {
                "id": completion_id(message_id),
                "object": "chat.completion.chunk",
                "created": created_s,
                "model": model,
            }
        )[:-1]
        self._open = head + b',"choices":['
        self._close = b'],"usage":null}' if include_usage else b"]}"
        self._usage_open = head + b',"choices":[],"usage":'

    def interrupted(self, reason: str) -> bytes:
        """SDK clients do not reconnect by themselves, and take a stream that just ends for a
        whole answer: say it was cut, so they raise (and may resume with Last-Event-ID)."""
        return self._error_frame(
            f"stream interrupted ({reason}); resume with Last-Event-ID", "stream_interrupted"
        )

    def draining(self, retry_ms: int) -> bytes:
        return self.interrupted("gateway shutting down")

    def lost(self) -> bytes:
        return self._error_frame("the message no longer exists; ask again", "message_lost")

    def gap(self, gap: Gap) -> bytes:
        # No chunk shape fits "part of the answer is gone": SDKs would take a frame without
        # choices for a chunk and fail on it. An error is what it is for them.
        after = "the start" if gap.after is None else str(gap.after)
        return self._error_frame(
            f"events after {after} up to {gap.resumes_at} are no longer retained",
            "history_truncated",
        )

    @staticmethod
    def _error_frame(message: str, code: str) -> bytes:
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def render(self, event: Event) -> bytes:
        head = b"id: " + event.raw_id + b"\ndata: "
        kind = event.kind
        if kind is Kind.CHUNK:
            role = b'"role":"assistant",' if event.n == 0 else b""
            choice = (
                b'{"index":0,"delta":{'
                + role
                + b'"content":'
                + event.data
                + b'},"logprobs":null,"finish_reason":null}'
            )
            return head + self._open + choice + self._close + b"\n\n"
        if kind is Kind.CHOICE:
            fields: dict[str, Any] = orjson.loads(event.data)
            choice_obj = {
                "index": 0,
                "delta": {},
                "logprobs": None,
                "finish_reason": None,
                **fields,
            }
            if event.n == 0 and "role" not in choice_obj["delta"]:
                choice_obj["delta"] = {"role": "assistant", **choice_obj["delta"]}
            return head + self._open + orjson.dumps(choice_obj) + self._close + b"\n\n"
        if kind is Kind.USAGE:
            return head + self._usage_open + event.data + b"}\n\n" if self.include_usage else b""
        if kind is Kind.DONE:
            return head + b"[DONE]\n\n"
        if kind is Kind.ERROR:
            error = orjson.loads(event.data)
            body = {
                "error": {
                    "message": error.get("message"),
                    "type": error.get("type"),
                    "param": None,
                    "code": error.get("code"),
                }
            }
            return head + orjson.dumps(body) + b"\n\n"
        if kind is Kind.RESET:
            # SDKs cannot un-read chunks: tell them, and where the answer starts again.
            message = (
                "the generation was restarted on another worker; discard what you have and "
                f"read the stream again after Last-Event-ID {event.raw_id.decode()}"
            )
            return head[: -len(b"data: ")] + self._error_frame(message, "generation_restarted")
        # Cancelled: a last chunk whose finish_reason says so, then [DONE], as a stream ends.
        choice = b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"cancelled"}'
        return head + self._open + choice + self._close + b"\n\n" + head + b"[DONE]\n\n"


def completion_id(message_id: str) -> str:
    """The OpenAI ``id`` of a message's completion."""
    return f"chatcmpl-{message_id}"
