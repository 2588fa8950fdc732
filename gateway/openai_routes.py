"""OpenAI-compatible chat completions, resumable: ``POST /v1/chat/completions``.

Requests and answers follow OpenAI's chat-completions API (streamed ``chat.completion.chunk``
frames, or one ``chat.completion``; errors as ``{"error": {message, type, param, code}}`` with
OpenAI's status codes). Unlike OpenAI, every frame carries an SSE ``id:`` and the response an
``X-Message-Id``, so ``GET /v1/chat/completions/{id}/stream`` with ``Last-Event-ID`` resumes
(see gateway.routes).
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.bodies import read_json_object
from gateway.errors import ApiError
from gateway.frames import DETERMINISTIC_FAILURES, OpenAIRenderer, completion_id, failure_of
from gateway.generations import begin, limited
from gateway.positions import MessageInfo
from gateway.requests import INVALID, parse_completion_request
from gateway.responses import EventStreamResponse, collect
from gateway.state import GatewayState
from shared.events import Event, Kind
from shared.messages import Job, prompt_of
from shared.settings import Settings


async def post_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``: start a generation, stream it or answer it whole."""
    state = GatewayState.of(request)
    key = await state.access.key_of(request.headers.get("authorization"), openai=True)
    settings = limited(state.settings, key)
    body = await read_openai_body(request, settings)
    completion = parse_completion_request(body, settings)
    begun = await begin(
        request,
        key,
        body,
        lambda message_id: chat_job(message_id, completion.messages, completion),
        stream=completion.stream,
        include_usage=completion.include_usage,
        cancel_on_disconnect=completion.cancel_on_disconnect,
        openai=True,
    )
    message_id, subscriber, info, headers = (
        begun.message_id,
        begun.subscriber,
        begun.info,
        begun.headers,
    )
    if subscriber is None or info is None:
        return Response(status_code=204, headers=headers)
    if completion.stream:
        render = OpenAIRenderer(message_id, info)
        return EventStreamResponse(subscriber, render, state, headers)
    events = await collect(request, subscriber)
    return completion_response(message_id, info, events, headers)


def chat_job(message_id: str, messages: list[dict[str, Any]], asked: ChatLike) -> Job:
    """The job of a request made of chat messages (chat completions, the Responses API)."""
    return Job(
        message_id=message_id,
        prompt=prompt_of(messages),
        max_tokens=asked.max_tokens,
        messages=messages,
        model=asked.model,
        params=asked.params,
    )


class ChatLike(Protocol):
    """What a validated request of chat messages says of its generation."""

    @property
    def max_tokens(self) -> int: ...
    @property
    def model(self) -> str: ...
    @property
    def params(self) -> dict[str, Any]: ...


async def read_openai_body(request: Request, settings: Settings) -> dict[str, Any]:
    """The body of a POST to an OpenAI route. What OpenAI answers otherwise is answered as it
    does: a body that is not a JSON object is its 400, one too large ``context_length_exceeded``;
    any other refusal (415, a 408 for a body sent too slowly) keeps its status, and is named in
    OpenAI's terms as every error of these routes is (gateway.app)."""
    try:
        return await read_json_object(request, max_bytes=settings.max_prompt_chars * 6 + 262_144)
    except ApiError as exc:
        if exc.status == 413:
            raise ApiError(
                400,
                exc.message,
                error_type=INVALID,
                param="messages",
                code="context_length_exceeded",
            ) from exc
        if exc.status in (400, 422):
            # Named as the table of errors names it (invalid_json, invalid_request).
            raise ApiError(400, exc.message, error_type=INVALID, code=exc.error_type) from exc
        raise


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
                "type": INVALID,
                "param": None,
                "code": error.get("code"),
            }
            return JSONResponse({"error": refusal}, status_code=status, headers=headers)
        # The official clients retry a 502 (each retry a new generation) unless told not to.
        retry = "false" if error.get("type") in DETERMINISTIC_FAILURES else "true"
        return JSONResponse(
            {"error": failure_of(error)},
            status_code=502,
            headers={**headers, "x-should-retry": retry},
        )
    if last.kind is Kind.CANCELLED:
        reason = orjson.loads(last.data or b"{}").get("reason", "requested")
        cancelled = {
            "message": f"the generation was cancelled ({reason})",
            "type": "cancelled",
            "param": None,
            "code": "cancelled",
        }
        return JSONResponse(
            {"error": cancelled},
            status_code=409,
            headers={**headers, "x-should-retry": "false"},
        )
    choice: dict[str, Any] = {
        "index": 0,
        "message": message.as_message(),
        "logprobs": message.as_logprobs(),
        "finish_reason": message.finish_reason,
    }
    completion = {
        "id": completion_id(message_id),
        "object": "chat.completion",
        "created": info.created_s,
        "model": info.model,
        "choices": [choice],
        "usage": message.usage,
    }
    if "x-message-token" in headers:  # to follow or cancel the message without the key
        completion["token"] = headers["x-message-token"]
        completion["read_token"] = headers["x-message-read-token"]
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
