"""Starting a generation, as every creating route does: the key's limits and quota, the
``Idempotency-Key``, the message written and queued, its subscriber; or the message a repeated
request already created, followed instead."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from gateway.errors import ApiError, Draining, MessageGone, NotAnEvent
from gateway.idempotency import check_key, fingerprint
from gateway.positions import MessageInfo, StartPoint
from gateway.requests import resume_cursor
from gateway.state import GatewayState
from gateway.subscriber import Subscriber
from shared import metrics, quotas
from shared.api_keys import ApiKey
from shared.events import ZERO_ID
from shared.messages import Job, new_message_id, submit
from shared.settings import Settings

_SUBMITS = metrics.REDIS_SECONDS.labels("submit")


def limited(settings: Settings, key: ApiKey | None) -> Settings:
    """``settings`` with the request limits tightened to ``key``'s own (a request beyond them
    is refused as one beyond the gateway's, with the same status and message). A key's tokens
    per minute bound one request too: a larger one could never be admitted, and a 429 would
    have clients retry it forever."""
    if key is None:
        return settings
    limits = key.limits
    max_tokens = min(
        settings.max_tokens_limit,
        limits.max_tokens or settings.max_tokens_limit,
        limits.tokens_per_minute or settings.max_tokens_limit,
    )
    return dataclasses.replace(
        settings,
        max_tokens_limit=max_tokens,
        default_max_tokens=min(settings.default_max_tokens, max_tokens),
        max_prompt_chars=min(
            settings.max_prompt_chars, limits.max_prompt_chars or settings.max_prompt_chars
        ),
    )


@dataclass(frozen=True, slots=True)
class Once:
    """A request's ``Idempotency-Key``, claimed for the message it is about to create."""

    tenant: str
    client_key: str


async def claim_once(
    request: Request, key: ApiKey | None, body: dict[str, Any], message_id: str
) -> tuple[Once | None, str | None]:
    """With an ``Idempotency-Key``: the claim for ``message_id`` (None, None without one),
    or the message an earlier request with that key created (then nothing is claimed)."""
    header = request.headers.get("idempotency-key")
    if header is None:
        return None, None
    state = GatewayState.of(request)
    once = Once(key.tenant if key is not None else "", check_key(header))
    prior = await state.idempotency.claim(
        once.tenant, once.client_key, fingerprint(request.url.path, body), message_id
    )
    return (None, prior) if prior is not None else (once, None)


async def follow_prior(
    request: Request, message_id: str, key: ApiKey | None, *, stream: bool
) -> tuple[Subscriber | None, MessageInfo | None, dict[str, str]]:
    """A repeated request follows the message its first one created, generating nothing:
    from its start, or for a stream after the ``Last-Event-ID`` the client has (no
    subscriber then: it has everything). The headers it answers with."""
    state = GatewayState.of(request)
    headers = {"x-message-id": message_id, "idempotent-replayed": "true"}
    if state.access.required:
        tokens = state.access.tokens_for(message_id)
        headers["x-message-token"] = tokens["token"]
        headers["x-message-read-token"] = tokens["read_token"]
    tenant = key.tenant if key is not None else None
    start = await _locate_prior(request, message_id, tenant, stream=stream)
    if start is None:
        return None, None, headers
    return state.hub.subscribe(message_id, start), start.info, headers


async def _locate_prior(
    request: Request, message_id: str, tenant: str | None, *, stream: bool
) -> StartPoint | None:
    state = GatewayState.of(request)
    cursor = resume_cursor(request.headers.get("last-event-id"), None) if stream else None
    try:
        return await state.hub.locate(message_id, cursor, tenant=tenant)
    except MessageGone as exc:
        raise ApiError(404, f"message {message_id} does not exist or has expired") from exc
    except NotAnEvent as exc:
        raise ApiError(400, str(exc)) from exc
    except Draining as exc:
        raise ApiError(503, "this gateway is shutting down; retry", retry_after_s=1) from exc


@dataclass(frozen=True, slots=True)
class Begun:
    """What a POST follows: the message it created, or with a repeated ``Idempotency-Key``
    the one its first request created (``replayed``). No subscriber (nor info): a repeated
    stream whose client has every event already (a 204)."""

    message_id: str
    subscriber: Subscriber | None
    info: MessageInfo | None
    headers: dict[str, str]
    replayed: bool


async def begin(
    request: Request,
    key: ApiKey | None,
    body: dict[str, Any],
    job_for: Callable[[str], Job],
    *,
    stream: bool,
    include_usage: bool = False,
    cancel_on_disconnect: bool,
    openai: bool,
    asked: bytes = b"",
) -> Begun:
    """Start the generation a validated POST asks for (``job_for`` makes its job for a new
    message id), or follow the earlier request's message when its Idempotency-Key says it is
    a repeat (``stream``: a repeated stream resumes after its Last-Event-ID)."""
    message_id = new_message_id()
    once, prior = await claim_once(request, key, body, message_id)
    if prior is not None:
        subscriber, info, headers = await follow_prior(request, prior, key, stream=stream)
        return Begun(prior, subscriber, info, headers, replayed=True)
    started = await start_generation(
        GatewayState.of(request),
        job_for(message_id),
        key,
        include_usage=include_usage,
        cancel_on_disconnect=cancel_on_disconnect,
        openai=openai,
        once=once,
        asked=asked,
    )
    return Begun(message_id, started.subscriber, started.info, started.headers, replayed=False)


@dataclass(frozen=True, slots=True)
class Started:
    """A generation just created: its meta, a subscriber from its start, and the response
    headers that tell the client about it (its id, its tokens, the key's quota)."""

    info: MessageInfo
    subscriber: Subscriber
    headers: dict[str, str]


async def start_generation(
    state: GatewayState,
    job: Job,
    key: ApiKey | None,
    *,
    include_usage: bool = False,
    cancel_on_disconnect: bool,
    openai: bool,
    once: Once | None = None,
    asked: bytes = b"",
) -> Started:
    """Admit ``job`` (the queue cap, then ``key``'s quota: 503 or 429 before anything is
    written), create its message for ``key``'s tenant and queue it."""
    try:
        return await _start(state, job, key, include_usage, cancel_on_disconnect, openai, asked)
    except BaseException:
        if once is not None:  # nothing was created: a retry with the key is a new request
            await state.idempotency.release(once.tenant, once.client_key, job.message_id)
        raise


async def _start(
    state: GatewayState,
    job: Job,
    key: ApiKey | None,
    include_usage: bool,
    cancel_on_disconnect: bool,
    openai: bool,
    asked: bytes,
) -> Started:
    settings = state.settings
    state.admission.admit(retry_after_s=max(1, round(settings.retry_ms / 1000)))
    headers = {"x-message-id": job.message_id}
    if key is not None:
        admitted = await quotas.admit(
            state.redis,
            key,
            job.message_id,
            job.max_tokens,
            hold_ms=int(settings.quota_hold_s * 1000),
        )
        headers |= _rate_limit_headers(key, admitted)
        if not admitted.ok:
            raise _quota_refusal(key, admitted, headers, openai=openai)
        job = dataclasses.replace(job, tenant=key.tenant, key_id=key.key_id)
    watch_ms = int(settings.cancel_grace_s * 1000) if cancel_on_disconnect else None
    model = job.model or settings.default_model
    try:
        with _SUBMITS.time():
            created_ms = await submit(
                state.redis,
                job,
                ttl_ms=settings.stream_ttl_s * 1000,
                model=model,
                partitions=settings.job_partitions,
                include_usage=include_usage,
                watch_ms=watch_ms,
                asked=asked,
            )
    except BaseException:
        if job.key_id:  # nothing was queued: it must not count against the key
            await quotas.release(state.redis, job.key_id, job.message_id)
        raise
    if state.access.required:
        tokens = state.access.tokens_for(job.message_id)
        headers["x-message-token"] = tokens["token"]
        headers["x-message-read-token"] = tokens["read_token"]
    # The same `created` as a resumed stream renders (from what submit stored).
    info = MessageInfo(model, created_ms // 1000, include_usage, watch_ms, job.tenant, asked)
    start = StartPoint(ZERO_ID, 0, info)
    return Started(info, state.hub.subscribe(job.message_id, start, created=True), headers)


def _rate_limit_headers(key: ApiKey, admitted: quotas.Admitted) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers: "requests" are generations at once, "tokens" the
    ``max_tokens`` admitted per minute."""
    headers = {}
    limits = key.limits
    if limits.max_concurrent:
        headers["x-ratelimit-limit-requests"] = str(limits.max_concurrent)
        headers["x-ratelimit-remaining-requests"] = str(
            max(0, limits.max_concurrent - admitted.active)
        )
    if limits.tokens_per_minute:
        headers["x-ratelimit-limit-tokens"] = str(limits.tokens_per_minute)
        headers["x-ratelimit-remaining-tokens"] = str(
            max(0, limits.tokens_per_minute - admitted.tokens_used)
        )
        headers["x-ratelimit-reset-tokens"] = f"{admitted.window_reset_ms / 1000:.3f}s"
    return headers


def _quota_refusal(
    key: ApiKey, admitted: quotas.Admitted, headers: dict[str, str], *, openai: bool
) -> ApiError:
    metrics.REFUSED_REQUESTS.labels(f"quota_{admitted.outcome}").inc()
    if admitted.outcome == "concurrency":
        message = (
            f"rate limit reached for key {key.key_id}: {admitted.active} generations running, "
            f"the limit is {key.limits.max_concurrent} at once; retry when one ends"
        )
        retry_after = 1
    else:
        message = (
            f"rate limit reached for key {key.key_id} on tokens per minute: limit "
            f"{key.limits.tokens_per_minute}, used {admitted.tokens_used}"
        )
        retry_after = max(1, -(-admitted.window_reset_ms // 1000))
    kind = "requests" if admitted.outcome == "concurrency" else "tokens"
    return ApiError(
        429,
        message,
        error_type=kind if openai else "rate_limit_exceeded",
        code="rate_limit_exceeded",
        retry_after_s=retry_after,
        headers={k: v for k, v in headers.items() if k.startswith("x-ratelimit")},
    )
