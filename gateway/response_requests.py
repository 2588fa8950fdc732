"""``POST /v1/responses`` bodies, validated as OpenAI validates them and read as a chat: the
messages a model is sent, what the response object reports back, and what this gateway does not
support, refused by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import ApiError
from gateway.requests import MAX_MODEL_CHARS, check_depth, invalid, typed
from shared.settings import Settings

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
