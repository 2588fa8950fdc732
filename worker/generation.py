"""Runs one generation: pulls pieces from the backend, coalesces text, appends events.

Chunking trades latency for cost: every entry is one Redis write and one send per subscriber.
The first chunk is written the moment it exists (first-token latency is what users feel); after
it, text that arrives within ``coalesce_s`` of the first buffered piece shares one entry, and a
timer flushes the buffer when the window closes, so no token waits longer than the window.
Structured pieces (role, tool calls, finish reason, usage) flush the buffer and keep their order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson

from shared import metrics
from shared.errors import ModelError
from shared.events import Kind
from worker.backends.base import Choice, GenerationRequest, ModelBackend, Piece
from worker.stream_writer import CancelRequested, EventsLost, StreamWriter, WriteRefused

_log = logging.getLogger(__name__)

#: The reason a worker that is shutting down gives its generations to stop.
WORKER_STOPPING = "worker_stopping"
#: Not a client's doing either: another worker took the job over (this one's lease lapsed,
#: say through a Redis stall). Nothing more is written: the message is the new owner's.
LEASE_LOST = "lease_lost"


class LeaseLost(Exception):
    """Generation stopped without a word: the job belongs to another worker now."""


async def generate(
    backend: ModelBackend,
    request: GenerationRequest,
    writer: StreamWriter,
    *,
    coalesce_s: float,
    cancelled: asyncio.Future[str] | None = None,
) -> None:
    """Stream the backend's answer into ``writer``; end with ``done``, ``error`` or ``cancelled``.

    Generation stops, and the backend's stream is closed, as soon as ``cancelled`` resolves (to
    the reason) or the append script reports a cancellation. A :class:`ModelError` becomes an
    error event after what was written so far. Any other exception but :class:`WriteRefused`
    also ends the message with an ``internal_error`` event, then propagates.
    """
    pieces = backend.stream(request)
    chunker = _Chunker(writer, coalesce_s)
    try:
        await _copy_pieces(pieces, chunker, writer, cancelled)
    except CancelRequested as exc:
        if exc.reason == LEASE_LOST:
            raise LeaseLost(writer.message_id) from exc
        if exc.reason == WORKER_STOPPING:
            # Not the client's doing: the answer is incomplete, so it ends as an error.
            await append_shutdown_error(writer)
        else:
            # The usage so far, for clients that count it: tokens received from the model;
            # the prompt's as the model reported it, else counted as the mock counts them.
            prompt_tokens = chunker.prompt_tokens or len(request.prompt.split())
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": chunker.tokens,
                "total_tokens": prompt_tokens + chunker.tokens,
            }
            ending = {"reason": exc.reason, "usage": usage}
            await writer.append(Kind.CANCELLED, orjson.dumps(ending))
            metrics.CANCELLATIONS.labels(exc.reason).inc()
        return
    except ModelError as exc:
        metrics.UPSTREAM_ERRORS.labels(exc.error_type).inc()
        await _append_error(writer, exc.error_type, str(exc), status=exc.status, code=exc.code)
        return
    except WriteRefused:
        raise  # the message is gone or owned by another attempt: nothing more may be written
    except EventsLost as exc:
        # More than this attempt keeps to write again: the answer cannot be mended.
        _log.error("generation lost events it cannot write again: %s", exc)
        message = "storage failed over and lost part of this answer; ask again"
        await _append_error(writer, "events_lost", message)
        return
    except Exception as exc:
        _log.exception("generation failed")
        await _append_error(writer, "internal_error", f"generation failed: {type(exc).__name__}")
        raise
    finally:
        await _aclose(pieces)
    await writer.append(Kind.DONE, b"")


async def _copy_pieces(
    pieces: AsyncIterator[Piece],
    chunker: _Chunker,
    writer: StreamWriter,
    cancelled: asyncio.Future[str] | None,
) -> None:
    pending: asyncio.Future[Piece] | None = None
    watch_check_s = writer.watch_ms / 2000 if writer.watch_ms else None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(pieces))
            waits: set[asyncio.Future[Any]] = (
                {pending} if cancelled is None else {pending, cancelled}
            )
            # Wait for the next piece, but only until the coalescing window closes (or the
            # presence of a cancel-on-disconnect message is due for a check); the read stays in
            # flight meanwhile (cancelling it would close the backend's stream).
            timeout = _earliest(chunker.time_left(), watch_check_s)
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if cancelled is not None and cancelled.done():
                if cancelled.result() != LEASE_LOST:  # otherwise nothing more is ours to write
                    await chunker.flush_quietly()
                raise CancelRequested(cancelled.result())
            if not pending.done():
                await chunker.flush()
                if (
                    watch_check_s is not None
                    and not writer.finishing
                    and not await writer.watched()
                ):
                    raise CancelRequested("disconnected")  # a silent model, and nobody left
                continue
            finished, pending = pending, None
            try:
                piece = finished.result()
            except StopAsyncIteration:
                break
            await chunker.add(piece)
    except ModelError:
        await chunker.flush()  # what the model produced before failing is part of the answer
        raise
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
    await chunker.flush()


class _Chunker:
    """Applies the coalescing rule: first text at once, then one entry per window."""

    def __init__(self, writer: StreamWriter, coalesce_s: float) -> None:
        self._writer = writer
        self._coalesce_s = coalesce_s
        self._loop = asyncio.get_running_loop()
        self._buffer: list[str] = []
        self._deadline = 0.0
        #: Text pieces received from the model (its tokens), and the prompt's token count
        #: once the model reports usage.
        self.tokens = 0
        self.prompt_tokens = 0

    def time_left(self) -> float | None:
        """Seconds until the buffered text must be written; None when nothing is buffered."""
        if not self._buffer:
            return None
        return max(0.0, self._deadline - self._loop.time())

    async def add(self, piece: Piece) -> None:
        if not isinstance(piece, str):
            await self.flush()
            kind = Kind.CHOICE if isinstance(piece, Choice) else Kind.USAGE
            if kind is Kind.USAGE:
                self.prompt_tokens = int(piece.fields.get("prompt_tokens") or 0)
            await self._writer.append(kind, orjson.dumps(piece.fields))
            if kind is Kind.CHOICE and piece.fields.get("finish_reason") is not None:
                self._writer.finishing = True  # the answer is complete: cancelling is moot
            return
        if not piece:
            return
        self.tokens += 1
        if self._coalesce_s <= 0 or self._writer.events_written == 0:
            await self._writer.append(Kind.CHUNK, orjson.dumps(piece))
            return
        if not self._buffer:
            self._deadline = self._loop.time() + self._coalesce_s
        self._buffer.append(piece)
        if self._loop.time() >= self._deadline:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            text = "".join(self._buffer)
            self._buffer.clear()
            await self._writer.append(Kind.CHUNK, orjson.dumps(text))

    async def flush_quietly(self) -> None:
        """Flush before stopping on a cancellation (whose own report the append may repeat)."""
        try:
            await self.flush()
        except CancelRequested:
            self._buffer.clear()


async def append_shutdown_error(writer: StreamWriter) -> None:
    """End a message whose worker is stopping before the answer was complete."""
    await _append_error(writer, "worker_shutdown", "the worker stopped mid-answer; ask again")


def _earliest(*timeouts: float | None) -> float | None:
    given = [t for t in timeouts if t is not None]
    return min(given) if given else None


async def _append_error(
    writer: StreamWriter,
    error_type: str,
    message: str,
    *,
    status: int | None = None,
    code: str | None = None,
) -> None:
    error: dict[str, object] = {"type": error_type, "message": message}
    if status is not None:
        error["status"] = status
    if code is not None:
        error["code"] = code
    await writer.append(Kind.ERROR, orjson.dumps(error))


async def _aclose(pieces: AsyncIterator[Piece]) -> None:
    aclose = getattr(pieces, "aclose", None)
    if aclose is not None:
        await aclose()
