"""SSE framing of message events in the two formats: the seed ``/chat/stream`` format (the
README's "Events") and OpenAI's ``chat.completion.chunk`` stream. Every frame of a stored event
carries ``id:`` (its Redis entry id); synthetic frames (``truncated``, errors of the stream
itself) carry none, because they are no resume position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from gateway.positions import Gap, Item, MessageInfo, Rewound
from shared.events import Event, Kind


class Renderer:
    """Turns items of one message into the bytes of an event stream (``b""`` for none)."""

    #: Renderers with the same key render any event to the same bytes: a live batch is
    #: rendered once per key and written to every client of that key.
    key = "base"
    #: A comment that keeps an idle stream (and every proxy on its path) alive. No blank line
    #: after it: a blank line ends an event, and some parsers (httpx-sse) surface an empty one
    #: where a browser dispatches nothing.
    heartbeat = b": ping\n"

    def __init__(self, message_id: str, *, retry_ms: int | None) -> None:
        self.message_id = message_id
        #: The ``retry:`` hint this stream starts with, if any.
        self.retry_ms = retry_ms
        # A copy: orjson's own result keeps a 1 KB buffer, and this is kept per client.
        self._id_json = bytes(memoryview(orjson.dumps(message_id)))

    def __call__(self, items: Sequence[Item]) -> bytes:
        return b"".join([self._frame(item) for item in items])

    def _frame(self, item: Item) -> bytes:
        if isinstance(item, Gap):
            return self.gap(item)
        if isinstance(item, Rewound):
            return self.rewound()
        return self.render(item)

    @property
    def prelude(self) -> bytes:
        """What the stream starts with: the ``retry:`` hint, when it has one."""
        # A retry field takes effect as it is read: no blank line (see heartbeat).
        return b"" if self.retry_ms is None else b"retry: %d\n" % self.retry_ms

    def render(self, event: Event) -> bytes:
        raise NotImplementedError

    def interrupted(self, reason: str) -> bytes:
        """What to send when the stream ends before its terminal event (Redis failed, the
        message vanished). Nothing, here: an EventSource then reconnects and resumes."""
        del reason
        return b""

    def lost(self) -> bytes:
        """The message vanished (expired, or Redis lost its data) while the client read it:
        an error event (without ``id:``, it is no resume position) rather than a silent end."""
        body = {
            "id": self.message_id,
            "error": {"type": "message_lost", "message": "the message no longer exists; ask again"},
        }
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"

    def draining(self) -> bytes:
        """What to send when this gateway shuts down: come back later (the load balancer sends
        the reconnect to another gateway)."""
        return b"retry: %d\n: this gateway is shutting down; reconnect\n" % (self.retry_ms or 0)

    def rewound(self) -> bytes:
        """A reset without ``id:`` (no resume position): discard what came before, the message
        follows again from its start."""
        body = {"id": self.message_id, "reason": "events_lost"}
        return b"event: reset\ndata: " + orjson.dumps(body) + b"\n\n"

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
            error = b'event: error\ndata: {"id":' + self._id_json + b',"error":' + event.data
            return head + error + b"}\n\n"
        if kind is Kind.CANCELLED or kind is Kind.RESET:
            reason = orjson.loads(event.data or b"{}").get("reason")
            body = {"id": self.message_id, "reason": reason}
            kind_line = b"event: " + kind.value.encode() + b"\n"
            return head + kind_line + b"data: " + orjson.dumps(body) + b"\n\n"
        return b""  # usage


def seed_renderer(message_id: str, info: MessageInfo, retry_ms: int | None) -> Renderer:
    del info  # the seed format names nothing of the meta
    return SeedRenderer(message_id, retry_ms=retry_ms)


class OpenAIRenderer(Renderer):
    """OpenAI's ``chat.completion.chunk`` stream, with an ``id:`` on every frame."""

    def __init__(self, message_id: str, info: MessageInfo) -> None:
        # OpenAI-format clients (the openai package among them) take a frame without data for
        # a malformed event, so these streams get no standalone retry hint.
        super().__init__(message_id, retry_ms=None)
        self.key = "openai+usage" if info.include_usage else "openai"
        self.include_usage = info.include_usage
        head = orjson.dumps(
            {
                "id": completion_id(message_id),
                "object": "chat.completion.chunk",
                "created": info.created_s,
                "model": info.model,
            }
        )[:-1]
        self._open = head + b',"choices":['
        self._close = b'],"usage":null}' if info.include_usage else b"]}"
        self._usage_open = head + b',"choices":[],"usage":'

    def interrupted(self, reason: str) -> bytes:
        """SDK clients do not reconnect by themselves, and take a stream that just ends for a
        whole answer: say it was cut, so they raise (and may resume with Last-Event-ID)."""
        return self._error_frame(
            f"stream interrupted ({reason}); resume with Last-Event-ID", "stream_interrupted"
        )

    def draining(self) -> bytes:
        return self.interrupted("gateway shutting down")

    def lost(self) -> bytes:
        return self._error_frame("the message no longer exists; ask again", "message_lost")

    def rewound(self) -> bytes:
        return self._error_frame(
            "storage failed over and lost part of this answer; discard what you have and read "
            "the stream again from its start",
            "generation_restarted",
        )

    def gap(self, gap: Gap) -> bytes:
        # No chunk shape fits "part of the answer is gone": SDKs would take a frame without
        # choices for a chunk and fail on it. An error is what it is for them.
        after = "the start" if gap.after is None else str(gap.after)
        return self._error_frame(
            f"events after {after} up to {gap.resumes_at} are no longer retained",
            "history_truncated",
        )

    @staticmethod
    def _error_frame(message: str, code: str, error_type: str = "server_error") -> bytes:
        body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def render(self, event: Event) -> bytes:
        head = b"id: " + event.raw_id + b"\ndata: "
        kind = event.kind
        if kind is Kind.CHUNK:
            role = b'"role":"assistant",' if event.n == 0 else b""
            delta = b'{"index":0,"delta":{' + role + b'"content":' + event.data
            choice = delta + b'},"logprobs":null,"finish_reason":null}'
            return head + self._open + choice + self._close + b"\n\n"
        if kind is Kind.CHOICE:
            return head + self._open + orjson.dumps(self._choice(event)) + self._close + b"\n\n"
        if kind is Kind.USAGE:
            return head + self._usage_open + event.data + b"}\n\n" if self.include_usage else b""
        if kind is Kind.DONE:
            return head + b"[DONE]\n\n"
        if kind is Kind.ERROR:
            return head + orjson.dumps({"error": failure_of(orjson.loads(event.data))}) + b"\n\n"
        if kind is Kind.RESET:
            # SDKs cannot un-read chunks: tell them, and where the answer starts again.
            message = (
                "the generation was restarted on another worker; discard what you have and "
                f"read the stream again after Last-Event-ID {event.raw_id.decode()}"
            )
            return head[: -len(b"data: ")] + self._error_frame(message, "generation_restarted")
        # Cancelled: the usage so far (asked for, it comes before [DONE] whatever the ending),
        # then an error, which every OpenAI client raises on: no finish_reason that a client
        # could take for a complete answer. Only [DONE] carries the id: the block is one event.
        cancelled = orjson.loads(event.data or b"{}")
        frames = b""
        if self.include_usage:  # none generated when it was cancelled before it started
            usage = cancelled.get("usage") or _NO_USAGE
            frames += b"data: " + self._usage_open + orjson.dumps(usage) + b"}\n\n"
        frames += self._error_frame(
            f"the generation was cancelled ({cancelled.get('reason', 'requested')}); the "
            "text so far is all there is",
            "cancelled",
            error_type="cancelled",
        )
        return frames + head + b"[DONE]\n\n"

    @staticmethod
    def _choice(event: Event) -> dict[str, Any]:
        fields: dict[str, Any] = orjson.loads(event.data)
        choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": None, **fields}
        if event.n == 0 and "role" not in choice["delta"]:
            choice["delta"] = {"role": "assistant", **choice["delta"]}
        return choice


def openai_renderer(message_id: str, info: MessageInfo, retry_ms: int | None) -> Renderer:
    del retry_ms  # see OpenAIRenderer
    return OpenAIRenderer(message_id, info)


_NO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
#: Failures that happen again if the same request is made again: clients are told not to retry.
DETERMINISTIC_FAILURES = frozenset({"model_error", "job_failed"})


def failure_of(error: dict[str, Any]) -> dict[str, Any]:
    """A failed generation's event data in OpenAI's error shape, streamed or not: type
    ``server_error``, the failure's kind as ``code`` (``model_error``, ``upstream_error``,
    ``job_failed``, ``worker_shutdown``, ...)."""
    return {
        "message": error.get("message"),
        "type": "server_error",
        "param": None,
        "code": error.get("type"),
    }


def completion_id(message_id: str) -> str:
    """The OpenAI ``id`` of a message's completion."""
    return f"chatcmpl-{message_id}"
