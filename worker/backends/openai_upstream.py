"""Relays generation from any OpenAI-compatible server (vLLM, Ollama, llama.cpp, OpenAI, ...).

The worker asks the upstream for a stream (with usage) and passes every piece on unchanged:
content-only deltas as text (merged by the coalescing window), anything else (role, tool calls,
refusal, logprobs, finish reason) as the upstream's choice object, and the usage chunk. Every
upstream failure ends the message with a clear error and leaves the worker healthy: connection
refused, timeouts, 4xx/5xx answers, a malformed chunk, or a stream cut off before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from httpx_sse import ServerSentEvent, SSEError, aconnect_sse

from shared.errors import ModelError
from worker.backends.base import Choice, GenerationRequest, Piece, Usage


class UpstreamError(ModelError):
    """The upstream model server failed, refused, or broke the stream."""

    error_type = "upstream_error"


class OpenAIUpstream:
    """A backend streaming from ``{base_url}/chat/completions``."""

    def __init__(
        self, *, base_url: str, api_key: str | None, model: str | None, timeout_s: float
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout
        )
        self._model = model
        self._timeout_s = timeout_s

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            **request.params,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.messages is None:
            # A plain prompt (/chat/stream): one user message, with its (defaulted) limit.
            body["messages"] = [{"role": "user", "content": request.prompt}]
            body["max_tokens"] = request.max_tokens
        else:
            body["messages"] = request.messages  # limits travel in params, as the client set them
        model = request.model or self._model
        if model:
            body["model"] = model
        return body

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        """Stream the upstream's answer; raise :class:`UpstreamError` on any failure."""
        try:
            async with aconnect_sse(
                self._client, "POST", "chat/completions", json=self._body(request)
            ) as source:
                response = source.response
                if response.status_code != 200:
                    await response.aread()
                    message, code = _error_of(response.content)
                    raise UpstreamError(
                        f"upstream answered {response.status_code}: {message}",
                        status=response.status_code,
                        code=code,
                    )
                async for piece in self._relay(source.aiter_sse()):
                    yield piece
        except SSEError as exc:  # e.g. a content type other than text/event-stream
            raise UpstreamError(f"upstream did not answer with an event stream: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamError(f"upstream timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable or broke the connection: {exc!r}") from exc

    async def _relay(self, events: AsyncIterator[ServerSentEvent]) -> AsyncIterator[Piece]:
        usage: Usage | None = None
        started = False
        while True:
            # A deadline on data, not bytes: an upstream that only sends keep-alive comments
            # would otherwise hold the request open for ever.
            try:
                async with asyncio.timeout(self._timeout_s):
                    sse = await anext(events, None)
            except TimeoutError:
                raise UpstreamError(
                    f"upstream sent no data for {self._timeout_s:g} s (timed out)"
                ) from None
            if sse is None:
                raise UpstreamError("upstream stream ended before [DONE]")
            if sse.data.strip() == "[DONE]":
                break
            for piece in _pieces(sse.data, started):
                if isinstance(piece, Usage):
                    usage = piece  # some servers repeat running totals: relay the last, once
                else:
                    started = True
                    yield piece
        if usage is not None:
            yield usage


def _pieces(data: str, started: bool) -> list[Piece]:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"upstream sent a malformed chunk: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise UpstreamError(f"upstream sent a chunk that is not an object: {data[:200]!r}")
    if chunk.get("error"):
        message, code = _error_of(data.encode())
        raise UpstreamError(f"upstream error: {message}", code=code)
    pieces: list[Piece] = []
    for choice in chunk.get("choices") or []:
        if choice.get("index", 0) != 0:
            continue  # n=1 is all we ask for
        fields = {k: v for k, v in choice.items() if k != "index"}
        # Text-only deltas are merged by the coalescing window; to tell them, keys sent as null
        # carry nothing and a role repeated on every chunk says nothing new. Anything else is
        # relayed exactly as it came.
        delta = fields.get("delta") or {}
        meaningful = {
            k for k, v in delta.items() if v is not None and not (k == "role" and started)
        }
        text_only = meaningful <= {"content"} and fields.get("finish_reason") is None
        if text_only and not fields.get("logprobs"):
            if delta.get("content"):
                pieces.append(delta["content"])
        else:
            pieces.append(Choice(fields))
    if chunk.get("usage"):
        pieces.append(Usage(chunk["usage"]))
    return pieces


def _error_of(body: bytes) -> tuple[str, str | None]:
    """The message and code of an OpenAI-shaped error body, or the start of whatever it was."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return body[:300].decode(errors="replace"), None
    if isinstance(error, dict):
        code = error.get("code")
        return str(error.get("message") or error), code if isinstance(code, str) else None
    return str(error), None
