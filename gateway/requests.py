"""Validation of request bodies (both APIs), resume cursors and ``Accept``: pure functions on
parsed values, each failure an :class:`ApiError` naming the problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import UnionType
from typing import Any

from gateway.errors import ApiError
from shared.events import EntryId
from shared.messages import prompt_of
from shared.settings import Settings

_CHAT_FIELDS = {"prompt", "stream", "max_tokens", "cancel_on_disconnect"}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated ``POST /chat/stream`` body."""

    prompt: str
    stream: bool
    max_tokens: int
    cancel_on_disconnect: bool = False


def parse_chat_request(body: dict[str, Any], settings: Settings) -> ChatRequest:
    """Validate a chat request: 422 for a bad or unknown field, 413 for a too-long prompt."""
    unknown = sorted(set(body) - _CHAT_FIELDS)
    if unknown:
        raise ApiError(422, f"unknown field(s): {', '.join(unknown)}")
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(422, "field 'prompt' is required")
    if not isinstance(prompt, str):
        raise ApiError(422, "field 'prompt' must be a string")
    if not prompt.strip():
        raise ApiError(422, "field 'prompt' must not be empty")
    if len(prompt) > settings.max_prompt_chars:
        raise ApiError(
            413,
            f"prompt of {len(prompt)} characters exceeds the limit of {settings.max_prompt_chars}",
        )
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise ApiError(422, "field 'stream' must be true or false")
    max_tokens = body.get("max_tokens", settings.default_max_tokens)
    # bool is an int in Python; JSON true is not a token count.
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise ApiError(422, "field 'max_tokens' must be an integer")
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        raise ApiError(422, f"field 'max_tokens' must be between 1 and {settings.max_tokens_limit}")
    cancel_on_disconnect = body.get("cancel_on_disconnect", False)
    if not isinstance(cancel_on_disconnect, bool):
        raise ApiError(422, "field 'cancel_on_disconnect' must be true or false")
    return ChatRequest(prompt, stream, max_tokens, cancel_on_disconnect)


def resume_cursor(header: str | None, parameter: str | None) -> EntryId | None:
    """The client's position: the ``Last-Event-ID`` header, else the ``last_event_id`` parameter.

    The header wins: a browser EventSource opened with ``?last_event_id=`` keeps that URL on
    every automatic reconnect, while its header carries the newer position.
    """
    raw, source = header, "Last-Event-ID header"
    if raw is None:
        raw, source = parameter, "last_event_id parameter"
    if raw is None or raw.strip() == "":
        return None  # an empty id is what EventSource sends after a reset: start over
    try:
        return EntryId.parse(raw.strip())
    except ValueError:
        shown = raw if len(raw) <= 64 else raw[:64] + "..."
        raise ApiError(400, f"{source} {shown!r} is not an event id (<ms>-<seq>)") from None


def accepts(header: str | None, media_type: str) -> bool:
    """Whether an Accept header admits ``media_type`` (no header admits everything)."""
    if not header:
        return True
    major = media_type.split("/")[0]
    for part in header.split(","):
        candidate = part.split(";")[0].strip().lower()
        if candidate in (media_type, f"{major}/*", "*/*"):
            return True
    return False


# The OpenAI chat-completions request.

INVALID = "invalid_request_error"
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# Request fields we interpret; everything else is passed through to the model unchanged.
_OWN_FIELDS = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "n",
}
_EXTENSIONS = {"cancel_on_disconnect"}  # ours, never sent upstream
#: Longest model name accepted (the answer's every chunk repeats it; real ones are short).
MAX_MODEL_CHARS = 256
#: Deepest nesting of objects and arrays a request may have.
MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A validated chat-completions request."""

    messages: list[dict[str, Any]]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int
    params: dict[str, Any] = field(default_factory=dict)
    cancel_on_disconnect: bool = False


def invalid(message: str, param: str | None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, error_type=INVALID, param=param, code=code)


def typed(body: dict[str, Any], name: str, kind: type | UnionType, label: str) -> Any:
    value = body.get(name)
    if value is not None and (
        not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool)
    ):
        raise invalid(f"Invalid type for '{name}': expected {label}.", name, "invalid_type")
    return value


def parse_completion_request(body: dict[str, Any], settings: Settings) -> CompletionRequest:
    """Validate as OpenAI does: 400 ``invalid_request_error`` naming the parameter."""
    try:
        check_depth(body)
    except ApiError as exc:
        raise invalid(exc.message, None) from exc
    messages = _messages(body)
    prompt = prompt_of(messages)
    if len(prompt) > settings.max_prompt_chars:
        raise invalid(
            f"The messages hold {len(prompt)} characters; at most {settings.max_prompt_chars} fit.",
            "messages",
            "context_length_exceeded",
        )
    options = typed(body, "stream_options", dict, "an object") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid(
            "Invalid type for 'stream_options.include_usage'.",
            "stream_options.include_usage",
            "invalid_type",
        )
    if typed(body, "n", int, "an integer") not in (None, 1):
        raise invalid("Only n=1 is supported.", "n")
    _check_sampling(body)
    max_tokens = _max_tokens(body, settings)
    params = {k: v for k, v in body.items() if k not in _OWN_FIELDS and k not in _EXTENSIONS}
    for limit in ("max_tokens", "max_completion_tokens"):
        if body.get(limit) is not None:
            # The upstream gets the field it was sent, and none when the client set no limit
            # (reasoning models refuse max_tokens; a default would cut answers short).
            params[limit] = max_tokens
    model = typed(body, "model", str, "a string") or settings.default_model
    if len(model) > MAX_MODEL_CHARS:
        # Every chunk of the answer repeats it.
        raise invalid(f"'model' is longer than {MAX_MODEL_CHARS} characters.", "model")
    return CompletionRequest(
        messages=messages,
        model=model,
        stream=bool(typed(body, "stream", bool, "a boolean")),
        include_usage=include_usage,
        max_tokens=max_tokens,
        params=params,
        cancel_on_disconnect=bool(typed(body, "cancel_on_disconnect", bool, "a boolean")),
    )


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise invalid(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array.", "messages")
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in _ROLES:
            raise invalid(f"Invalid value for 'messages[{index}].role'.", f"messages[{index}].role")
        content = message.get("content")
        param = f"messages[{index}].content"
        if not isinstance(content, str | list | None):
            raise invalid(f"Invalid type for '{param}'.", param, "invalid_type")
        if isinstance(content, list):
            _content_parts(content, param)
    return messages


def _content_parts(parts: list[Any], param: str) -> None:
    """Content parts as OpenAI takes them: objects with a string ``type``; a text part's
    ``text`` a string (other parts go to the model as they are)."""
    for index, part in enumerate(parts):
        where = f"{param}[{index}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(
                f"Invalid value for '{where}': expected an object with a 'type'.",
                where,
                "invalid_type",
            )
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise invalid(
                f"Invalid type for '{where}.text': expected a string.",
                f"{where}.text",
                "invalid_type",
            )


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """400 when ``value`` nests objects or arrays deeper than ``limit`` (a message is stored,
    queued and rendered as JSON, whose encoders stop far below what a parser accepts)."""
    level: list[Any] = [value]
    for _ in range(limit + 1):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return
    raise ApiError(400, f"the request nests objects or arrays deeper than {limit} levels")


def _max_tokens(body: dict[str, Any], settings: Settings) -> int:
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    value = typed(body, param, int, "an integer")
    if value is None:
        return settings.default_max_tokens
    if not 1 <= value <= settings.max_tokens_limit:
        raise invalid(f"'{param}' must be between 1 and {settings.max_tokens_limit}.", param)
    return int(value)


def _check_sampling(body: dict[str, Any]) -> None:
    for name, high in (("temperature", 2), ("top_p", 1)):
        value = typed(body, name, int | float, "a number")
        if value is not None and not 0 <= value <= high:
            raise invalid(f"'{name}' must be between 0 and {high}.", name, "decimal_out_of_range")
    stop = body.get("stop")
    many = isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)
    if stop is not None and not (isinstance(stop, str) or many):
        raise invalid("'stop' must be a string or up to 4 strings.", "stop")
    typed(body, "user", str, "a string")
