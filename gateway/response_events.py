"""OpenAI's Responses API over a message's events: the request (``POST /v1/responses``), the
response object, and its event stream.

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

from gateway.errors import ApiError
from gateway.frames import Renderer
from gateway.positions import Gap, MessageInfo
from gateway.requests import MAX_MODEL_CHARS, check_depth, invalid, typed
from shared.events import EntryId, Event, Kind
from shared.settings import Settings

PRELUDE_EVENTS = 4
_SUPPORTED = {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "stream",
    "background",
    "store",
    "temperature",
    "top_p",
    "metadata",
    "user",
    "text",
    "truncation",
    "parallel_tool_calls",
    "tool_choice",
    "tools",
    "cancel_on_disconnect",
}
_NOT_SUPPORTED = {
    "previous_response_id": "chaining responses",
    "conversation": "conversations",
    "prompt": "prompt templates",
    "reasoning": "reasoning options",
    "include": "include",
}


def response_id(message_id: str) -> str:
    return f"resp_{message_id}"


def message_id_of(response_id_text: str) -> str | None:
    """The message id of a response id (None when it is not one of ours)."""
    return response_id_text[5:] if response_id_text.startswith("resp_") else None


def _item_id(message_id: str) -> str:
    return f"msg_{message_id}"


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A validated ``POST /v1/responses`` body, as a chat: the messages a model is sent."""

    messages: list[dict[str, Any]]
    model: str
    stream: bool
    background: bool
    max_tokens: int
    params: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    instructions: str | None = None
    cancel_on_disconnect: bool = False
    #: ``max_output_tokens`` as asked (None when not given: the server's default applies).
    max_output_tokens: int | None = None

    def echoed(self) -> bytes:
        """What the response object reports back of this request, kept with the message."""
        return orjson.dumps(
            {
                "background": self.background,
                "instructions": self.instructions,
                "max_output_tokens": self.max_output_tokens,
                "metadata": self.metadata,
                "temperature": self.params.get("temperature"),
                "top_p": self.params.get("top_p"),
            }
        )


def parse_responses_request(body: dict[str, Any], settings: Settings) -> ResponsesRequest:
    """Validate as OpenAI does: 400 ``invalid_request_error`` naming the parameter; what this
    gateway does not support (tools, chaining) is named too."""
    try:
        check_depth(body)
    except ApiError as exc:
        raise invalid(exc.message, None) from exc
    _check_supported(body)
    instructions = typed(body, "instructions", str, "a string")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + _input(
        body.get("input")
    )
    characters = sum(len(m["content"]) for m in messages)
    if characters > settings.max_prompt_chars:
        raise invalid(
            f"The input holds {characters} characters; at most {settings.max_prompt_chars} fit.",
            "input",
            "context_length_exceeded",
        )
    max_tokens = typed(body, "max_output_tokens", int, "an integer")
    if max_tokens is None:
        max_tokens = settings.default_max_tokens
    elif not 1 <= max_tokens <= settings.max_tokens_limit:
        raise invalid(
            f"'max_output_tokens' must be between 1 and {settings.max_tokens_limit}.",
            "max_output_tokens",
        )
    params = _sampling(body)
    if body.get("max_output_tokens") is not None:
        params["max_tokens"] = max_tokens
    model = typed(body, "model", str, "a string") or settings.default_model
    if len(model) > MAX_MODEL_CHARS:
        raise invalid(f"'model' is longer than {MAX_MODEL_CHARS} characters.", "model")
    return ResponsesRequest(
        messages=messages,
        model=model,
        stream=bool(typed(body, "stream", bool, "a boolean")),
        background=bool(typed(body, "background", bool, "a boolean")),
        max_tokens=max_tokens,
        params=params,
        metadata=_metadata(body),
        instructions=instructions,
        cancel_on_disconnect=bool(typed(body, "cancel_on_disconnect", bool, "a boolean")),
        max_output_tokens=body.get("max_output_tokens"),
    )


def _check_supported(body: dict[str, Any]) -> None:
    for name, what in _NOT_SUPPORTED.items():
        if body.get(name) is not None:
            raise invalid(f"'{name}' ({what}) is not supported by this server.", name)
    unknown = sorted(set(body) - _SUPPORTED - set(_NOT_SUPPORTED))
    if unknown:
        raise invalid(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    if body.get("tools"):
        raise invalid("'tools' are not supported by this server (text output only).", "tools")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise invalid("'tool_choice' must be 'none' or 'auto' (no tools).", "tool_choice")
    text = body.get("text")
    if text is not None and not (
        isinstance(text, dict)
        and text.get("format", {"type": "text"}) in ({"type": "text"}, None)
        and set(text) <= {"format", "verbosity"}
    ):
        raise invalid("Only plain text output ('text.format.type': 'text') is supported.", "text")
    for name in ("store", "parallel_tool_calls"):
        typed(body, name, bool, "a boolean")
    typed(body, "user", str, "a string")
    if body.get("background") is True and body.get("store") is False:
        raise invalid("Background responses must be stored ('store': true).", "store")


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, high in (("temperature", 2), ("top_p", 1)):
        value = typed(body, name, int | float, "a number")
        if value is not None:
            if not 0 <= value <= high:
                raise invalid(f"'{name}' must be between 0 and {high}.", name)
            params[name] = value
    return params


def _metadata(body: dict[str, Any]) -> dict[str, str]:
    metadata: dict[str, str] = typed(body, "metadata", dict, "an object") or {}
    if len(metadata) > 16 or not all(
        isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
        for k, v in metadata.items()
    ):
        raise invalid("'metadata': at most 16 string pairs (keys 64, values 512).", "metadata")
    return metadata


def _input(value: Any) -> list[dict[str, Any]]:
    """``input`` (a string, or message items) as chat messages with text content."""
    if isinstance(value, str):
        if not value.strip():
            raise invalid("'input' must not be empty.", "input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid(
            "'input' must be a string or a non-empty array of messages.",
            "input",
            "missing_required_parameter" if value is None else "invalid_type",
        )
    messages = []
    for index, item in enumerate(value):
        where = f"input[{index}]"
        role = item.get("role") if isinstance(item, dict) else None
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise invalid(f"'{where}': only message items are supported.", where)
        if role not in ("user", "assistant", "system", "developer"):
            raise invalid(f"Invalid value for '{where}.role'.", f"{where}.role")
        messages.append({"role": role, "content": _text_of(item.get("content"), where)})
    return messages


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"Invalid type for '{where}.content'.", f"{where}.content", "invalid_type")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(
            part.get("text"), str
        ):
            place = f"{where}.content[{index}]"
            raise invalid(f"'{place}': only text parts are supported.", place)
        texts.append(part["text"])
    return "".join(texts)


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
