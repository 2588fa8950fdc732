"""What the endpoints share: following a message as an event stream (the stream GETs), the
responses that carry streams and errors, JSON request bodies, a whole answer collected."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import delivery, redis_reads
from gateway.access import Reader
from gateway.counters import Counters
from gateway.errors import ApiError, Draining, MessageGone, NotAnEvent, RetryLater
from gateway.frames import Renderer
from gateway.http_wire import SSE_HEADERS, SSE_MEDIA_TYPE, stream_headers
from gateway.idempotency import check_key, fingerprint
from gateway.message_tokens import READ, READ_CANCEL
from gateway.positions import Gap, MessageInfo, Rewound, StartPoint
from gateway.requests import resume_cursor
from gateway.state import GatewayState
from gateway.subscriber import Subscriber
from shared import metrics, quotas
from shared.api_keys import ApiKey
from shared.events import ZERO_ID, EntryId, Event, Kind
from shared.messages import Job, is_message_id, new_message_id, request_cancel, submit
from shared.settings import Settings

_log = logging.getLogger(__name__)
_SUBMITS = metrics.REDIS_SECONDS.labels("submit")
_END = {"type": "http.response.body", "body": b"", "more_body": False}


@dataclass(frozen=True, slots=True)
class StreamGet:
    """``GET <prefix><message id><suffix>``: a message from the client's cursor on, as an event
    stream that ``renderer`` renders (with a ``retry:`` hint first when ``retry_hint``).

    The application's endpoint (:meth:`endpoint`) and the server adapter's answer from memory
    (gateway.server) are both made from this, and send the same bytes.
    """

    prefix: str
    suffix: str
    renderer: Callable[[str, MessageInfo, int | None], Renderer]
    retry_hint: bool

    @property
    def path(self) -> str:
        return f"{self.prefix}{{message_id}}{self.suffix}"

    @property
    def openai(self) -> bool:
        """Whether errors take OpenAI's names (the ``/v1`` routes)."""
        return is_openai_path(self.prefix)

    def message_id(self, path: str) -> str | None:
        """The message id of ``path`` when this route takes it."""
        end = len(path) - len(self.suffix)
        if end <= len(self.prefix) or not (
            path.startswith(self.prefix) and path.endswith(self.suffix)
        ):
            return None
        message_id = path[len(self.prefix) : end]
        return message_id if is_message_id(message_id) else None

    def render(self, message_id: str, info: MessageInfo, settings: Settings) -> Renderer:
        return self.renderer(message_id, info, settings.retry_ms if self.retry_hint else None)

    async def endpoint(self, request: Request) -> Response:
        """Replay the message from the start or after the client's cursor, then follow it."""
        state = GatewayState.of(request)
        message_id = path_message_id(request)
        reader = await reader_of(request, message_id, READ, openai=self.openai)
        cursor = resume_cursor(
            request.headers.get("last-event-id"), request.query_params.get("last_event_id")
        )
        counters = state.hub.counters
        try:
            if cursor is None and self.openai and "after_chunk" in request.query_params:
                # The message is the reader's (another tenant's is missing) before its events
                # are counted: how many chunks it has is not for another tenant to learn.
                await state.hub.locate(message_id, None, tenant=reader.tenant)
                cursor = await _after_chunks(request, message_id)
            start = await state.hub.locate(message_id, cursor, tenant=reader.tenant)
        except MessageGone as exc:
            counters.resumes_refused += cursor is not None
            raise ApiError(404, f"message {message_id} does not exist or has expired") from exc
        except NotAnEvent as exc:
            counters.resumes_refused += 1
            raise ApiError(400, str(exc)) from exc
        except Draining:
            # Stopping while this join waited: the client comes back, to another gateway.
            return RetryLaterResponse(state.settings.retry_ms, "this gateway is shutting down")
        except (RedisConnectionError, RedisTimeoutError) as exc:
            _log.warning("resume of %s deferred: %s", message_id, exc)
            raise RetryLater(str(exc)) from exc
        if cursor is not None:
            _count_resume(counters, start)
        if start is None:
            return Response(status_code=204)  # the cursor is the final event: nothing more
        subscriber = state.hub.subscribe(message_id, start)
        render = self.render(message_id, start.info, state.settings)
        return EventStreamResponse(subscriber, render, state)


async def _after_chunks(request: Request, message_id: str) -> EntryId | None:
    """``?after_chunk=N`` on the OpenAI route: after the first N chunks, for clients that
    count chunks but cannot see SSE ids (the openai packages keep them to themselves). Every
    stored event is one chunk in that format, so the N-th chunk is the event numbered N - 1."""
    raw = request.query_params["after_chunk"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise ApiError(400, f"'after_chunk' must be a count of chunks, not {raw[:32]!r}")
    count = int(raw)
    if count == 0:
        return None
    state = GatewayState.of(request)
    entry = await redis_reads.entry_of_event(state.hub.reads, message_id, count - 1)
    if entry is None:
        raise ApiError(
            400,
            f"message {message_id} has no chunk {count} to resume after (not yet written, or "
            "no longer retained): resume with Last-Event-ID",
        )
    return entry


def _count_resume(counters: Counters, start: StartPoint | None) -> None:
    if start is None:
        counters.resumed_finished += 1
    elif start.rewound:
        counters.resumed_rewound += 1
    elif start.next_n is None:
        counters.resumed_truncated += 1
    elif start.from_memory:
        counters.resumed_from_memory += 1
    else:
        counters.resumed_from_redis += 1


async def reader_of(request: Request, message_id: str, scope: str, *, openai: bool) -> Reader:
    """Who asks to read (``scope`` READ) or cancel (READ_CANCEL) ``message_id``: its key (the
    Authorization header) or the message's token (``?token=``, else that header)."""
    return await GatewayState.of(request).access.reader(
        message_id,
        request.headers.get("authorization"),
        request.query_params.get("token"),
        scope,
        openai=openai,
    )


async def cancel_for(request: Request, message_id: str, *, openai: bool) -> tuple[str, Reader]:
    """Ask for ``message_id``'s cancellation on behalf of the caller (who must be allowed to):
    ``ok``, ``missing`` (or another tenant's) or ``finished``, and who asked."""
    state = GatewayState.of(request)
    settings = state.settings
    reader = await reader_of(request, message_id, READ_CANCEL, openai=openai)
    outcome = await request_cancel(
        state.redis,
        message_id,
        ttl_ms=settings.stream_ttl_s * 1000,
        maxlen=settings.stream_maxlen,
        tenant=reader.tenant,
    )
    return outcome, reader


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is one of the OpenAI-compatible routes (errors take OpenAI's names)."""
    return path.startswith("/v1/")


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


def path_message_id(request: Request) -> str:
    """The path's message id; 404 unless it has a message id's shape (it is used in keys)."""
    message_id: str = request.path_params["message_id"]
    if not is_message_id(message_id):
        raise ApiError(404, f"message {message_id} does not exist")
    return message_id


class EventStreamResponse(Response):
    """Streams a subscriber until the terminal event, a disconnect, or a failure: through the
    socket the server offers when it offers one, else through ASGI ``send`` (gateway.delivery).
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(
        self,
        subscriber: Subscriber,
        render: Renderer,
        state: GatewayState,
        headers: dict[str, str] | None = None,
    ) -> None:
        # No Response.__init__: it would render a body and announce "content-length: 0"; and
        # the constant headers are encoded once (a gateway keeps one response per client).
        self.status_code = 200
        self.background = None
        heartbeat_ms = round(state.settings.heartbeat_s * 1000)
        self.raw_headers = stream_headers(subscriber.message_id, heartbeat_ms)
        for name, value in (headers or {}).items():
            if name != "x-message-id":  # already there
                self.raw_headers.append((name.encode(), value.encode()))
        self._subscriber = subscriber
        self._render = render
        self._counters = state.hub.counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscriber, render = self._subscriber, self._render
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        if scope["method"] == "HEAD":  # the head is all there is to send
            subscriber.close()
            await send(start)
            await send(_END)
            return
        socket = delivery.socket_of(scope)
        if socket is None:
            self._counters.asgi_streams += 1
            await send(start)
            last_words = await delivery.stream_to_asgi(subscriber, render, send, receive)
        else:
            self._counters.direct_streams += 1
            socket.hold()  # the head uvicorn writes leaves with the first events
            try:
                await send(start)
            except BaseException:
                subscriber.close()
                socket.write(b"")
                raise
            last_words = await delivery.stream_to_socket(subscriber, render, socket)
        await send({"type": "http.response.body", "body": last_words, "more_body": False})


class RetryLaterResponse(Response):
    """200 + ``retry:`` + close: the one way to make a browser EventSource come back later.

    Any other status (503 included) makes EventSource give up for good.
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(self, retry_ms: int, reason: str) -> None:
        body = b"retry: %d\n: %s\n" % (retry_ms, reason.encode())
        super().__init__(content=body, headers=SSE_HEADERS, media_type=self.media_type)


def error_response(error: ApiError) -> Response:
    """``error`` as its status and JSON body."""
    headers = dict(error.headers)
    if error.retry_after_s is not None:
        headers["retry-after"] = str(error.retry_after_s)
    return Response(
        error.body(), status_code=error.status, media_type="application/json", headers=headers
    )


def refuse_a_foreign_body(request: Request) -> None:
    """415 for a POST that needs no body but sends one not declared JSON: a form or
    ``text/plain`` POST is what a foreign web page can send without a preflight."""
    declared = request.headers.get("content-length")
    sends = "transfer-encoding" in request.headers or (declared not in (None, "0"))
    if sends:
        _media_type_is_json(request)


def _media_type_is_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(
            415,
            f"the request body must be JSON (Content-Type: application/json), not "
            f"{content_type or 'undeclared'!r}",
            param="Content-Type",
        )


async def read_json_object(request: Request, *, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object: 415 unless declared JSON (a form or ``text/plain`` POST is
    what a foreign web page can send without a preflight), 413 past ``max_bytes``, 400 if not
    JSON, 422 if not an object."""
    _media_type_is_json(request)
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and int(declared) > max_bytes
    ):
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes}")
    body = bytearray()
    # A body sent slowly holds a connection as a head sent slowly would: the same bound.
    timeout_s = GatewayState.of(request).settings.header_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            async for piece in request.stream():
                body += piece
                if len(body) > max_bytes:
                    raise ApiError(413, f"request body exceeds the limit of {max_bytes} bytes")
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout_s:g} s",
            headers={"connection": "close"},
        ) from None
    except ClientDisconnect:
        # Nobody reads the answer: said as what it is, not as a failure of the application.
        _log.info("the client left before its request body arrived")
        raise ApiError(400, "the client left before its request body arrived") from None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            400, f"request body is not valid JSON: {exc}", error_type="invalid_json"
        ) from None
    if not isinstance(value, dict):
        raise ApiError(422, "request body must be a JSON object")
    return value


async def collect(request: Request, subscriber: Subscriber) -> list[Event]:
    """Every event of a message up to its terminal one (for non-streaming answers).

    The client may leave while it waits: that releases the subscriber too.
    """
    events: list[Event] = []
    watcher = asyncio.ensure_future(delivery.close_on_disconnect(request.receive, subscriber))
    try:
        while (items := await subscriber.next_batch()) is not None:
            for item in items:
                if isinstance(item, Gap):
                    raise ApiError(500, "part of the answer was trimmed (TOKENRELAY_STREAM_MAXLEN)")
                if isinstance(item, Rewound) or item.kind is Kind.RESET:
                    events.clear()  # the answer comes again from its start
                    continue
                events.append(item)
    except MessageGone as exc:
        raise ApiError(404, str(exc)) from exc
    except Draining as exc:
        raise ApiError(
            503, "this gateway is shutting down; retry", error_type="unavailable"
        ) from exc
    finally:
        subscriber.close()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if not events or not events[-1].kind.terminal:
        raise ApiError(
            503, "the client left or the answer was interrupted; retry", error_type="unavailable"
        )
    return events
