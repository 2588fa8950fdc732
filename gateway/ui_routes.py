"""A drop-in backend for the AI SDK's ``useChat`` (``DefaultChatTransport`` with its default
``api: "/api/chat"``), resumable (``useChat({resume: true})``):

- ``POST /api/chat``: the chat's messages in; the answer out as a UI message stream. The chat's
  active answer is remembered in Redis (for ``TOKENRELAY_STREAM_TTL_S``), for the tenant.
- ``GET /api/chat/{chat_id}/stream``: what the SDK asks on mount: ``204`` when the chat has no
  answer in progress, else that answer replayed from its start and followed, from any gateway.
- ``POST /api/chat/{chat_id}/stop``: stops the chat's answer (``stop()`` in the SDK only closes
  the connection; call this beside it): ``202``, or ``204`` when nothing is in progress.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.access import OPEN_TENANT
from gateway.bodies import read_json_object, refuse_a_foreign_body
from gateway.errors import ApiError, Draining, MessageGone
from gateway.generations import limited, start_generation
from gateway.message_tokens import READ, READ_CANCEL
from gateway.responses import EventStreamResponse, RetryLaterResponse, cancel_for, reader_of
from gateway.state import GatewayState
from gateway.ui_messages import HEADERS, UIMessageRenderer, check_chat_id, parse_chat_turn
from shared import keys
from shared.messages import STATUS, Job, new_message_id, prompt_of

_IN_PROGRESS = (b"queued", b"running")


async def post_chat_turn(request: Request) -> Response:
    """``POST /api/chat``."""
    state = GatewayState.of(request)
    key = await state.access.key_of(request.headers.get("authorization"), openai=False)
    settings = limited(state.settings, key)
    body = await read_json_object(request, max_bytes=settings.max_prompt_chars * 6 + 65_536)
    turn = parse_chat_turn(body, settings)
    message_id = new_message_id()
    job = Job(message_id, prompt_of(turn.messages), settings.default_max_tokens, turn.messages)
    started = await start_generation(state, job, key, cancel_on_disconnect=False, openai=False)
    tenant = key.tenant if key is not None else OPEN_TENANT
    await state.redis.set(
        keys.chat_active(tenant, turn.chat_id), message_id, ex=state.settings.stream_ttl_s
    )
    render = UIMessageRenderer(message_id, started.info)
    return EventStreamResponse(started.subscriber, render, state, {**started.headers, **HEADERS})


async def resume_chat(request: Request) -> Response:
    """``GET /api/chat/{chat_id}/stream``."""
    state = GatewayState.of(request)
    message_id, tenant = await _active(request, READ)
    if message_id is None:
        return Response(status_code=204)
    try:
        start = await state.hub.locate(message_id, None, tenant=tenant)
    except MessageGone:
        return Response(status_code=204)
    except Draining:
        return RetryLaterResponse(state.settings.retry_ms, "this gateway is shutting down")
    if start is None:  # pragma: no cover - only a cursor at the end answers None
        return Response(status_code=204)
    subscriber = state.hub.subscribe(message_id, start)
    render = UIMessageRenderer(message_id, start.info)
    headers = {"x-message-id": message_id, **HEADERS}
    return EventStreamResponse(subscriber, render, state, headers)


async def stop_chat(request: Request) -> Response:
    """``POST /api/chat/{chat_id}/stop``."""
    refuse_a_foreign_body(request)
    message_id, _ = await _active(request, READ_CANCEL)
    if message_id is None:
        return Response(status_code=204)
    outcome, _ = await cancel_for(request, message_id, openai=False)
    if outcome != "ok":
        return Response(status_code=204)  # it ended meanwhile
    return Response(status_code=202)


async def _active(request: Request, scope: str) -> tuple[str | None, str | None]:
    """The chat's answer in progress (None when there is none) and the tenant it must belong
    to. A chat is the caller's tenant's: another tenant's chat of the same id is another."""
    state = GatewayState.of(request)
    chat_id = check_chat_id(request.path_params["chat_id"])
    key = None
    if state.access.required:
        # A chat is found by its id within a tenant: only a key says which tenant.
        key = await state.access.key_of(request.headers.get("authorization"), openai=False)
    tenant = key.tenant if key is not None else OPEN_TENANT
    raw = await state.redis.get(keys.chat_active(tenant, chat_id))
    if raw is None:
        return None, None
    message_id = raw.decode() if isinstance(raw, bytes) else str(raw)
    status = await state.redis.hget(keys.message_meta(message_id), STATUS)
    if status not in _IN_PROGRESS:
        return None, None
    reader = await reader_of(request, message_id, scope, openai=False)
    if reader.tenant is not None and reader.tenant != tenant:  # pragma: no cover - same key
        raise ApiError(404, f"no chat {chat_id}")
    return message_id, reader.tenant
