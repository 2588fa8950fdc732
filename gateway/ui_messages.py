"""The AI SDK's UI message stream (what the ``ai`` package's ``useChat`` reads): the request a
``DefaultChatTransport`` posts, and the chunks of an answer.

A stream is ``data: <chunk>`` frames (``start``, ``start-step``, ``text-start``, ``text-delta``,
``text-end``, ``finish-step``, ``finish``, ``error``, ``abort``) ending with ``data: [DONE]``.
The SDK resumes a chat by replaying its active answer from ``start``, so a stream always begins
at the message's start. Text deltas carry the stored event's id as their SSE ``id:``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import ApiError
from gateway.frames import Renderer
from gateway.positions import Gap, MessageInfo
from gateway.requests import check_depth
from shared.events import Event, Kind
from shared.settings import Settings

#: The header by which the SDK recognizes the protocol.
HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
_CHAT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ROLES = ("user", "assistant", "system")
_FINISH_REASONS = {"stop", "length", "content-filter", "tool-calls", "error", "other"}


def check_chat_id(chat_id: object) -> str:
    """A chat id as the SDK sends it (its own ids, or the application's), or 400."""
    if not isinstance(chat_id, str) or not _CHAT_ID.fullmatch(chat_id):
        raise ApiError(400, "'id' (the chat id) must be 1-128 of A-Z a-z 0-9 _ -", param="id")
    return chat_id


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """A validated ``useChat`` request: the chat, and its messages as a model is sent them."""

    chat_id: str
    messages: list[dict[str, Any]]


def parse_chat_turn(body: dict[str, Any], settings: Settings) -> ChatTurn:
    """``{id, messages: [{role, parts: [{type: "text", text}, ...]}], trigger, messageId}``:
    the text parts of each message (other parts, such as files or tool calls, are not sent to
    the model); 400 naming what is wrong."""
    check_depth(body)
    chat_id = check_chat_id(body.get("id"))
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    messages = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in _ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(_ROLES)}", param=where)
        messages.append({"role": role, "content": _text_of(message.get("parts"), where)})
    characters = sum(len(m["content"]) for m in messages)
    if not characters:
        raise ApiError(
            400,
            "the messages hold no text (only text parts are sent to the model)",
            param="messages",
        )
    if characters > settings.max_prompt_chars:
        raise ApiError(
            413,
            f"the messages hold {characters} characters; at most {settings.max_prompt_chars} fit",
        )
    trigger = body.get("trigger", "submit-message")
    if trigger not in ("submit-message", "regenerate-message"):
        raise ApiError(400, f"unknown 'trigger' {trigger!r}", param="trigger")
    return ChatTurn(chat_id, messages)


def _text_of(parts: Any, where: str) -> str:
    if not isinstance(parts, list):
        raise ApiError(400, f"'{where}.parts' must be an array", param=f"{where}.parts")
    texts = []
    for number, part in enumerate(parts):
        place = f"{where}.parts[{number}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ApiError(400, f"'{place}' must be an object with a 'type'", param=place)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"'{place}.text' must be a string", param=f"{place}.text")
            texts.append(part["text"])
    return "".join(texts)


class UIMessageRenderer(Renderer):
    """An answer as UI message stream chunks."""

    key = "ui"
    heartbeat = b": ping\n"  # nothing any parser dispatches

    def __init__(self, message_id: str, info: MessageInfo) -> None:
        del info
        super().__init__(message_id, retry_ms=None)
        self._text_id = orjson.dumps(f"text-{message_id}")
        self._finish_reason = "stop"

    @staticmethod
    def _chunk(body: bytes, entry: bytes | None = None) -> bytes:
        head = b"id: " + entry + b"\n" if entry is not None else b""
        return head + b"data: " + body + b"\n\n"

    @property
    def prelude(self) -> bytes:
        start = orjson.dumps({"type": "start", "messageId": self.message_id})
        return (
            self._chunk(start)
            + self._chunk(b'{"type":"start-step"}')
            + self._chunk(b'{"type":"text-start","id":' + self._text_id + b"}")
        )

    def render(self, event: Event) -> bytes:
        kind = event.kind
        if kind is Kind.CHUNK:
            return self._delta(event.data, event.raw_id)
        if kind is Kind.CHOICE:
            choice = orjson.loads(event.data)
            reason = choice.get("finish_reason")
            if reason is not None:
                self._finish_reason = _finish_reason(reason)
            content = event.content()
            return self._delta(orjson.dumps(content), event.raw_id) if content else b""
        if kind is Kind.DONE:
            finish = orjson.dumps({"type": "finish", "finishReason": self._finish_reason})
            return self._end() + self._chunk(finish) + self._chunk(b"[DONE]", event.raw_id)
        if kind is Kind.ERROR:
            error = orjson.loads(event.data)
            text = f"{error.get('type')}: {error.get('message')}"
            return self._error(text) + self._chunk(b"[DONE]", event.raw_id)
        if kind is Kind.CANCELLED:
            reason = orjson.loads(event.data or b"{}").get("reason", "requested")
            abort = orjson.dumps({"type": "abort", "reason": reason})
            return self._end() + self._chunk(abort) + self._chunk(b"[DONE]", event.raw_id)
        if kind is Kind.RESET:
            return self._error(
                "the answer was restarted on another worker; what came before is void: "
                "reload the chat to read it again"
            )
        return b""  # usage

    def _delta(self, text_json: bytes, entry: bytes) -> bytes:
        body = b'{"type":"text-delta","id":' + self._text_id + b',"delta":' + text_json + b"}"
        return self._chunk(body, entry)

    def _end(self) -> bytes:
        return self._chunk(b'{"type":"text-end","id":' + self._text_id + b"}") + self._chunk(
            b'{"type":"finish-step"}'
        )

    def _error(self, text: str) -> bytes:
        return self._chunk(orjson.dumps({"type": "error", "errorText": text}))

    def interrupted(self, reason: str) -> bytes:
        return self._error(f"stream interrupted ({reason}); resume the chat")

    def draining(self) -> bytes:
        return self.interrupted("server shutting down")

    def lost(self) -> bytes:
        return self._error("the answer no longer exists; ask again")

    def rewound(self) -> bytes:
        return self._error("storage failed over and lost part of this answer; resume the chat")

    def gap(self, gap: Gap) -> bytes:
        del gap
        return self._error("part of this answer is no longer retained")


def _finish_reason(reason: str) -> str:
    """OpenAI's finish reasons in the SDK's words."""
    mapped = reason.replace("_", "-")
    if mapped == "content-filter" or mapped in _FINISH_REASONS:
        return mapped
    return "tool-calls" if reason == "function_call" else "other"
