"""OpenAI's Responses API, resumable (gateway.response_events has the format):

- ``POST /v1/responses``: create (``stream``, ``background``), answered as a stream, as the
  finished response, or (``background`` without ``stream``) at once as ``queued``;
- ``GET /v1/responses/{id}``: the response object; with ``stream=true`` its events, after
  ``starting_after`` (a sequence number) or ``Last-Event-ID``;
- ``POST /v1/responses/{id}/cancel``: idempotent; the response ends ``cancelled``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import redis_reads
from gateway.bodies import refuse_a_foreign_body
from gateway.errors import ApiError, Draining, MessageGone, NotAnEvent, echoed
from gateway.generations import begin, limited
from gateway.message_tokens import READ
from gateway.openai_routes import chat_job, read_openai_body
from gateway.requests import INVALID, resume_cursor
from gateway.response_events import (
    ResponsesRenderer,
    ResponseState,
    message_id_of,
)
from gateway.response_requests import parse_responses_request
from gateway.responses import EventStreamResponse, cancel_for, collect, reader_of
from gateway.state import GatewayState
from shared.messages import is_message_id

#: What a message's meta status says, while no terminal event tells.
_RUNNING = {b"queued": "queued", b"running": "in_progress"}


async def create_response(request: Request) -> Response:
    """``POST /v1/responses``."""
    state = GatewayState.of(request)
    key = await state.access.key_of(request.headers.get("authorization"), openai=True)
    settings = limited(state.settings, key)
    body = await read_openai_body(request, settings)
    asked = parse_responses_request(body, settings)
    begun = await begin(
        request,
        key,
        body,
        lambda message_id: chat_job(message_id, asked.messages, asked),
        # A repeat follows from the start whatever the client has: the closing events repeat
        # the whole text (what it has is skipped below).
        stream=False,
        include_usage=True,
        cancel_on_disconnect=asked.cancel_on_disconnect,
        openai=True,
        asked=asked.echoed(),
    )
    message_id, subscriber, info, headers = (
        begun.message_id,
        begun.subscriber,
        begun.info,
        begun.headers,
    )
    if subscriber is None or info is None:  # pragma: no cover - no cursor was given
        return Response(status_code=204, headers=headers)
    if asked.stream:
        cursor = resume_cursor(request.headers.get("last-event-id"), None)
        render = ResponsesRenderer(message_id, info, after_entry=cursor if begun.replayed else None)
        return EventStreamResponse(subscriber, render, state, headers)
    answer = ResponseState(message_id, info)
    if asked.background:
        subscriber.close()
        return JSONResponse(answer.as_object("queued"), headers=headers)
    for event in await collect(request, subscriber):
        answer.add(event)
    return JSONResponse(answer.as_object(), headers=headers)


async def retrieve_response(request: Request) -> Response:
    """``GET /v1/responses/{id}``: the object, or with ``stream=true`` its events."""
    state = GatewayState.of(request)
    message_id = _message_id(request)
    reader = await reader_of(request, message_id, READ, openai=True)
    if request.query_params.get("stream", "false").lower() not in ("true", "1"):
        answer = await _current(state, message_id, reader.tenant)
        return JSONResponse(answer)
    starting_after = _starting_after(request)
    cursor = resume_cursor(
        request.headers.get("last-event-id"), request.query_params.get("last_event_id")
    )
    try:
        # From the start, whatever the client has: the closing events repeat the whole text.
        start = await state.hub.locate(message_id, None, tenant=reader.tenant)
    except MessageGone as exc:
        raise _missing(message_id) from exc
    except NotAnEvent as exc:  # pragma: no cover - no cursor is given
        raise ApiError(400, str(exc), error_type=INVALID) from exc
    except Draining as exc:
        raise ApiError(
            503, "this gateway is shutting down; retry", error_type="server_error"
        ) from exc
    if start is None:  # pragma: no cover - only a cursor at the end answers None
        return Response(status_code=204)
    render = ResponsesRenderer(
        message_id, start.info, starting_after=starting_after, after_entry=cursor
    )
    subscriber = state.hub.subscribe(message_id, start)
    return EventStreamResponse(subscriber, render, state)


async def cancel_response(request: Request) -> Response:
    """``POST /v1/responses/{id}/cancel``: the response object, ``cancelled``; asking again
    answers the same."""
    state = GatewayState.of(request)
    message_id = _message_id(request)
    refuse_a_foreign_body(request)
    outcome, reader = await cancel_for(request, message_id, openai=True)
    if outcome == "missing":
        raise _missing(message_id)
    answer = await _current(state, message_id, reader.tenant)
    if outcome == "finished" and answer["status"] != "cancelled":
        raise ApiError(
            409,
            f"Cannot cancel a response that has already ended ({answer['status']}).",
            error_type=INVALID,
            code="response_already_ended",
        )
    answer["status"] = "cancelled"  # asked for: its worker ends it at its next token
    return JSONResponse(answer)


async def _current(state: GatewayState, message_id: str, tenant: str | None) -> dict[str, object]:
    try:
        info, status, cancel, events = await redis_reads.read_whole(
            state.redis, message_id, state.settings.stream_maxlen
        )
    except MessageGone as exc:
        raise _missing(message_id) from exc
    if tenant is not None and info.tenant != tenant:
        raise _missing(message_id)
    answer = ResponseState(message_id, info)
    for event in events:
        answer.add(event)
    running = "cancelled" if cancel else _RUNNING.get(status, "in_progress")
    return answer.as_object(running)


def _message_id(request: Request) -> str:
    text: str = request.path_params["response_id"]
    message_id = message_id_of(text)
    if message_id is None or not is_message_id(message_id):
        raise ApiError(
            404,
            f"No response found with id '{echoed(text)}'.",
            error_type=INVALID,
            code="not_found",
        )
    return message_id


def _missing(message_id: str) -> ApiError:
    return ApiError(
        404, f"No response found with id 'resp_{message_id}'.", error_type=INVALID, code="not_found"
    )


def _starting_after(request: Request) -> int | None:
    raw = request.query_params.get("starting_after")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(
            400,
            "'starting_after' must be an integer.",
            error_type=INVALID,
            param="starting_after",
            code="invalid_type",
        ) from None
    return value
