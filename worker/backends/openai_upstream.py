"""Relays generation from any OpenAI-compatible server (vLLM, Ollama, llama.cpp, OpenAI, ...).

The worker asks the upstream for a stream (with usage) and passes every piece on unchanged:
content-only deltas as text (merged by the coalescing window), anything else (role, tool calls,
refusal, logprobs, finish reason) as the upstream's choice object, and the usage chunk. Every
upstream failure ends the message with a clear error and leaves the worker healthy: connection
refused, timeouts, 4xx/5xx answers, a malformed chunk, or a stream cut off before ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from httpx_sse import SSEError, aconnect_sse

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

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        messages = request.messages or [{"role": "user", "content": request.prompt}]
        body: dict[str, Any] = {**request.params, "messages": messages, "stream": True}
        body["stream_options"] = {"include_usage": True}
        model = request.model or self._model
        if model:
            body["model"] = model
        if "max_completion_tokens" not in body:
            body["max_tokens"] = request.max_tokens
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
                    raise UpstreamError(
                        f"upstream answered {response.status_code}: {_error_text(response.content)}"
                    )
                done = False
                async for sse in source.aiter_sse():
                    if sse.data.strip() == "[DONE]":
                        done = True
                        break
                    for piece in _pieces(sse.data):
                        yield piece
                if not done:
                    raise UpstreamError("upstream stream ended before [DONE]")
        except SSEError as exc:  # e.g. a content type other than text/event-stream
            raise UpstreamError(f"upstream did not answer with an event stream: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamError(f"upstream timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable or broke the connection: {exc!r}") from exc


def _pieces(data: str) -> list[Piece]:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"upstream sent a malformed chunk: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise UpstreamError(f"upstream sent a chunk that is not an object: {data[:200]!r}")
    if chunk.get("error"):
        raise UpstreamError(f"upstream error: {_error_text(data.encode())}")
    pieces: list[Piece] = []
    for choice in chunk.get("choices") or []:
        if choice.get("index", 0) != 0:
            continue  # n=1 is all we ask for
        fields = {k: v for k, v in choice.items() if k != "index"}
        delta = fields.get("delta") or {}
        text_only = (
            set(delta) <= {"content"}
            and fields.get("finish_reason") is None
            and not fields.get("logprobs")
        )
        if text_only and isinstance(delta.get("content"), str):
            if delta["content"]:
                pieces.append(delta["content"])
        elif delta or fields.get("finish_reason") is not None:
            pieces.append(Choice(fields))
    if chunk.get("usage"):
        pieces.append(Usage(chunk["usage"]))
    return pieces


def _error_text(body: bytes) -> str:
    """The message of an OpenAI-shaped error body, or the start of whatever it was."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return body[:300].decode(errors="replace")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
