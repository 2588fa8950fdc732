"""Runs one generation: pulls tokens from the backend, coalesces them, appends events.

Chunking trades latency for cost: every entry is one Redis write and one send per subscriber.
The first chunk is written the moment it exists (first-token latency is what users feel); after
it, tokens that arrive within ``coalesce_s`` of the first buffered one share one entry, and a
timer flushes the buffer when the window closes, so no token waits longer than the window.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson

from shared.errors import ModelError
from shared.events import Kind
from worker.backends.base import GenerationRequest, ModelBackend
from worker.stream_writer import StreamWriter, WriteRefused

_log = logging.getLogger(__name__)


async def generate(
    backend: ModelBackend, request: GenerationRequest, writer: StreamWriter, *, coalesce_s: float
) -> None:
    """Stream the backend's answer into ``writer``, ending with ``done`` or ``error``.

    A :class:`ModelError` becomes an error event after the tokens written so far. Any other
    exception but :class:`WriteRefused` also ends the message with an ``internal_error`` event,
    then propagates.
    """
    tokens = backend.stream(request)
    try:
        await _copy_tokens(tokens, writer, coalesce_s)
    except ModelError as exc:
        await _append_error(writer, exc.error_type, str(exc))
        return
    except WriteRefused:
        raise  # the message is gone or owned by another attempt: nothing more may be written
    except Exception as exc:
        _log.exception("generation failed")
        await _append_error(writer, "internal_error", f"generation failed: {type(exc).__name__}")
        raise
    finally:
        await _aclose(tokens)
    await writer.append(Kind.DONE, b"")


async def _copy_tokens(tokens: AsyncIterator[str], writer: StreamWriter, coalesce_s: float) -> None:
    chunker = _Chunker(writer, coalesce_s)
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(tokens))
            # Wait for the next token, but only until the coalescing window closes; the read
            # stays in flight across the flush (cancelling it would close the backend's stream).
            done, _ = await asyncio.wait({pending}, timeout=chunker.time_left())
            if not done:
                await chunker.flush()
                continue
            finished, pending = pending, None
            try:
                token = finished.result()
            except StopAsyncIteration:
                break
            await chunker.add(token)
    except ModelError:
        await chunker.flush()  # what the model produced before failing is part of the answer
        raise
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
    await chunker.flush()


class _Chunker:
    """Applies the coalescing rule: first token at once, then one entry per window."""

    def __init__(self, writer: StreamWriter, coalesce_s: float) -> None:
        self._writer = writer
        self._coalesce_s = coalesce_s
        self._loop = asyncio.get_running_loop()
        self._buffer: list[str] = []
        self._deadline = 0.0

    def time_left(self) -> float | None:
        """Seconds until the buffered tokens must be written; None when nothing is buffered."""
        if not self._buffer:
            return None
        return max(0.0, self._deadline - self._loop.time())

    async def add(self, token: str) -> None:
        if self._coalesce_s <= 0 or self._writer.events_written == 0:
            await self._writer.append(Kind.CHUNK, orjson.dumps(token))
            return
        if not self._buffer:
            self._deadline = self._loop.time() + self._coalesce_s
        self._buffer.append(token)
        if self._loop.time() >= self._deadline:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            text = "".join(self._buffer)
            self._buffer.clear()
            await self._writer.append(Kind.CHUNK, orjson.dumps(text))


async def _append_error(writer: StreamWriter, error_type: str, message: str) -> None:
    await writer.append(Kind.ERROR, orjson.dumps({"type": error_type, "message": message}))


async def _aclose(tokens: AsyncIterator[str]) -> None:
    aclose = getattr(tokens, "aclose", None)
    if aclose is not None:
        await aclose()
