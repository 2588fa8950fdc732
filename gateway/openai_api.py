"""OpenAI-compatible chat completions, resumable: ``/v1/chat/completions`` and friends.

Requests and answers follow OpenAI's chat-completions API (streamed ``chat.completion.chunk``
frames, or one ``chat.completion``; errors as ``{"error": {message, type, param, code}}`` with
OpenAI's status codes). Unlike OpenAI, every frame carries an SSE ``id:`` and the response an
``X-Message-Id``, so ``GET /v1/chat/completions/{id}/stream`` with ``Last-Event-ID`` resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import UnionType
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import ApiError
from gateway.render import OpenAIRenderer, completion_id
from gateway.requests import read_json_object
from gateway.resume import MessageInfo
from gateway.routes import cancel_chat, collect, start_point, stream_from
from gateway.sse import EventStreamResponse
from gateway.state import GatewayState
from gateway.warm_routes import WarmRoute
from shared.events import Event, Kind
from shared.messages import Job, new_message_id, prompt_of, submit
from shared.settings import Settings

_INVALID = "invalid_request_error"
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


def _invalid(message: str, param: str | None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, error_type=_INVALID, param=param, code=code)


def _typed(body: dict[str, Any], name: str, kind: type | UnionType, label: str) -> Any:
    value = body.get(name)
    if value is not None and (
        not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool)
    ):
        raise _invalid(f"Invalid type for '{name}': expected {label}.", name, "invalid_type")
    return value


def parse_completion_request(body: dict[str, Any], settings: Settings) -> CompletionRequest:
    """Validate as OpenAI does: 400 ``invalid_request_error`` naming the parameter."""
    messages = _messages(body)
    prompt = prompt_of(messages)
    if len(prompt) > settings.max_prompt_chars:
        raise _invalid(
            f"The messages hold {len(prompt)} characters; at most {settings.max_prompt_chars} fit.",
            "messages",
            "context_length_exceeded",
        )
    options = _typed(body, "stream_options", dict, "an object") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _invalid(
            "Invalid type for 'stream_options.include_usage'.",
            "stream_options.include_usage",
            "invalid_type",
        )
    if _typed(body, "n", int, "an integer") not in (None, 1):
        raise _invalid("Only n=1 is supported.", "n")
    _check_sampling(body)
    max_tokens = _max_tokens(body, settings)
    params = {k: v for k, v in body.items() if k not in _OWN_FIELDS and k not in _EXTENSIONS}
    for limit in ("max_tokens", "max_completion_tokens"):
        if body.get(limit) is not None:
            # The upstream gets the field it was sent, and none when the client set no limit
            # (reasoning models refuse max_tokens; a default would cut answers short).
            params[limit] = max_tokens
    return CompletionRequest(
        messages=messages,
        model=_typed(body, "model", str, "a string") or settings.default_model,
        stream=bool(_typed(body, "stream", bool, "a boolean")),
        include_usage=include_usage,
        max_tokens=max_tokens,
        params=params,
        cancel_on_disconnect=bool(_typed(body, "cancel_on_disconnect", bool, "a boolean")),
    )


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise _invalid(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty array.", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _invalid(
                f"Invalid value for 'messages[{index}].role'.", f"messages[{index}].role"
            )
        if not isinstance(message.get("content"), str | list | None):
            param = f"messages[{index}].content"
            raise _invalid(f"Invalid type for '{param}'.", param, "invalid_type")
    return messages


def _max_tokens(body: dict[str, Any], settings: Settings) -> int:
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    value = _typed(body, param, int, "an integer")
    if value is None:
        return settings.default_max_tokens
    if not 1 <= value <= settings.max_tokens_limit:
        raise _invalid(f"'{param}' must be between 1 and {settings.max_tokens_limit}.", param)
    return int(value)


def _check_sampling(body: dict[str, Any]) -> None:
    for name, high in (("temperature", 2), ("top_p", 1)):
        value = _typed(body, name, int | float, "a number")
        if value is not None and not 0 <= value <= high:
            raise _invalid(f"'{name}' must be between 0 and {high}.", name, "decimal_out_of_range")
    stop = body.get("stop")
    many = isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)
    if stop is not None and not (isinstance(stop, str) or many):
        raise _invalid("'stop' must be a string or up to 4 strings.", "stop")
    _typed(body, "user", str, "a string")


async def post_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``: start a generation, stream it or answer it whole."""
    state = GatewayState.of(request)
    settings = state.settings
    body = await _read_body(request, settings)
    completion = parse_completion_request(body, settings)
    message_id = new_message_id()
    watch_ms = int(settings.cancel_grace_s * 1000) if completion.cancel_on_disconnect else None
    job = Job(
        message_id=message_id,
        prompt=prompt_of(completion.messages),
        max_tokens=completion.max_tokens,
        messages=completion.messages,
        model=completion.model,
        params=completion.params,
    )
    created_ms = await submit(
        state.redis,
        job,
        ttl_ms=settings.stream_ttl_s * 1000,
        model=completion.model,
        include_usage=completion.include_usage,
        watch_ms=watch_ms,
    )
    # The same `created` as a resumed stream renders (from what submit stored).
    info = MessageInfo(completion.model, created_ms // 1000, completion.include_usage, watch_ms)
    subscriber = state.hub.subscribe(message_id, watch_ms=watch_ms)
    headers = {"X-Message-Id": message_id}
    if completion.stream:
        return EventStreamResponse(subscriber, _renderer(message_id, info), retry_ms=None)
    events = await collect(request, subscriber)
    return completion_response(message_id, info, events, headers)


async def get_stream(request: Request) -> Response:
    """``GET /v1/chat/completions/{id}/stream``: resume in the chunk format, usage included."""
    message_id, start = await start_point(request)
    if start is None:
        return Response(status_code=204)
    return stream_from(
        request, message_id, start, _renderer(message_id, start.info), retry_hint=False
    )


async def _read_body(request: Request, settings: Settings) -> dict[str, Any]:
    try:
        return await read_json_object(request, max_bytes=settings.max_prompt_chars * 6 + 262_144)
    except ApiError as exc:
        if exc.status == 413:
            raise _invalid(exc.message, "messages", "context_length_exceeded") from exc
        raise ApiError(400, exc.message, error_type=_INVALID) from exc


def _renderer(message_id: str, info: MessageInfo) -> OpenAIRenderer:
    return OpenAIRenderer(
        message_id, model=info.model, created_s=info.created_s, include_usage=info.include_usage
    )


def completion_response(
    message_id: str, info: MessageInfo, events: list[Event], headers: dict[str, str]
) -> Response:
    """Fold a message's events into one ``chat.completion`` (or OpenAI's error answer)."""
    message = _Assembled()
    for event in events:
        message.add(event)
    last = events[-1]
    if last.kind is Kind.ERROR:
        error = orjson.loads(last.data)
        status = error.get("status")
        if isinstance(status, int) and 400 <= status < 500:
            # The upstream refused the request: the client gets its answer, not a retryable 5xx.
            refusal = {
                "message": error.get("message"),
                "type": _INVALID,
                "param": None,
                "code": error.get("code"),
            }
            return JSONResponse({"error": refusal}, status_code=status, headers=headers)
        failure = {
            "message": error.get("message"),
            "type": "server_error",
            "param": None,
            "code": error.get("type"),
        }
        return JSONResponse({"error": failure}, status_code=502, headers=headers)
    choice: dict[str, Any] = {
        "index": 0,
        "message": message.as_message(),
        "logprobs": message.as_logprobs(),
        "finish_reason": "cancelled" if last.kind is Kind.CANCELLED else message.finish_reason,
    }
    completion = {
        "id": completion_id(message_id),
        "object": "chat.completion",
        "created": info.created_s,
        "model": info.model,
        "choices": [choice],
        "usage": message.usage,
    }
    return JSONResponse(completion, headers=headers)


class _Assembled:
    """A whole assistant message put together from its deltas."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.logprobs: list[Any] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def add(self, event: Event) -> None:
        if event.kind is Kind.CHUNK:
            self.content.append(orjson.loads(event.data))
        elif event.kind is Kind.USAGE:
            self.usage = orjson.loads(event.data)
        elif event.kind is Kind.CHOICE:
            self._add_choice(orjson.loads(event.data))

    def _add_choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        for key, parts in (
            ("content", self.content),
            ("refusal", self.refusal),
            ("reasoning_content", self.reasoning),
        ):
            if isinstance(delta.get(key), str):
                parts.append(delta[key])
        for position, call in enumerate(delta.get("tool_calls") or []):
            self._add_tool_call(call, position)
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            self.logprobs.extend(logprobs["content"])
        self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def _add_tool_call(self, call: dict[str, Any], position: int) -> None:
        # Streamed tool calls arrive in pieces keyed by index (some servers omit it: then the
        # position in the list); arguments are concatenated.
        index = call.get("index", position)
        whole = self.tool_calls.setdefault(index, {"function": {"arguments": ""}})
        for key in ("id", "type"):
            if call.get(key):
                whole[key] = call[key]
        function = call.get("function") or {}
        if function.get("name"):
            whole["function"]["name"] = function["name"]
        whole["function"]["arguments"] += function.get("arguments") or ""

    def as_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) if self.content or not self.tool_calls else None,
            "refusal": "".join(self.refusal) or None,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return message

    def as_logprobs(self) -> dict[str, Any] | None:
        return {"content": self.logprobs} if self.logprobs else None


#: The long-lived GETs, served past the middleware stack (see gateway.stream_routes).
STREAM_ROUTES = [Route("/v1/chat/completions/{message_id}/stream", get_stream, methods=["GET"])]
WARM_ROUTES = [WarmRoute(b"/v1/chat/completions/", b"/stream", _renderer, retry_hint=False)]

ROUTES = [
    Route("/v1/chat/completions", post_completions, methods=["POST"]),
    *STREAM_ROUTES,
    Route("/v1/chat/completions/{message_id}/cancel", cancel_chat, methods=["POST"]),
]
