"""The worker's job loop: a consumer group on the jobs stream feeds up to N concurrent generations.

A job is acknowledged (and deleted, so the jobs stream stays small) only once its message has a
terminal event, or when it can never be generated (malformed, expired, already taken).

Cancellation reaches a running generation two ways: the append script refuses the next event of
a message flagged for cancellation, and the worker follows the cancel channel so that a model
that is silent (a long prefill, a stalled upstream) is stopped at once, not at its next token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any, cast

import orjson
from redis.asyncio import Connection, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys
from shared.events import Kind
from shared.live import LiveChannels
from shared.messages import Job
from shared.settings import Settings
from worker.backends.base import GenerationRequest, ModelBackend
from worker.generation import generate
from worker.stream_writer import StreamWriter, WriteRefused

_log = logging.getLogger(__name__)
_RETRY_S = (0.1, 0.2, 0.5, 1.0, 2.0)
# The embedded fakeredis answers XREADGROUP ... BLOCK wrongly (see _read_jobs); there a worker
# waits on a plain XREAD of new entries for at most this long between non-blocking group reads.
_EMBEDDED_WAIT_MS = 100


def consumer_name() -> str:
    """A consumer name unique to this process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """Takes jobs from the consumer group and generates them; :meth:`run` until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        backend: ModelBackend,
        *,
        consumer: str,
        connect: Callable[[], Connection],
        embedded: bool = False,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._backend = backend
        self._consumer = consumer
        self._embedded = embedded
        self._tasks: set[asyncio.Task[None]] = set()
        # Running generations by message id, each with the future that cancels it.
        self._running: dict[str, asyncio.Future[str]] = {}
        self._cancels = LiveChannels(
            connect, self._on_cancel, self._on_resubscribed, ping_interval_s=5.0
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Generate jobs until ``stop`` is set, then let running generations finish (bounded)."""
        _log.info(
            "worker %s taking jobs (concurrency %d)",
            self._consumer,
            self._settings.worker_concurrency,
        )
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        failures = 0
        self._cancels.follow(keys.CANCEL_CHANNEL.encode())
        listener = asyncio.create_task(self._cancels.run())
        try:
            while not stop.is_set():
                self._reap()
                free = self._settings.worker_concurrency - len(self._tasks)
                if free <= 0:
                    await asyncio.wait(
                        {stopping, *self._tasks}, return_when=asyncio.FIRST_COMPLETED
                    )
                    continue
                try:
                    entries = await self._read_until_stop(free, stopping)
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    delay = _RETRY_S[min(failures, len(_RETRY_S) - 1)]
                    failures += 1
                    _log.warning("reading jobs failed (%s); retrying in %.1f s", exc, delay)
                    await asyncio.wait({stopping}, timeout=delay)
                    continue
                failures = 0
                for entry_id, fields in entries:
                    task = asyncio.create_task(self._process(entry_id, fields))
                    self._tasks.add(task)
        finally:
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
            await self._drain()
            # Both: closing ends a read on a real Redis even if a cancellation is lost; the
            # cancellation ends a read on the embedded fakeredis, which closing does not wake.
            await self._cancels.aclose()
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    def _on_cancel(self, _channel: bytes, payload: bytes) -> None:
        cancelled = self._running.get(payload.decode(errors="replace"))
        if cancelled is not None and not cancelled.done():
            cancelled.set_result("requested")

    def _on_resubscribed(self) -> None:
        # Requests announced while the connection was down are still flagged on the message:
        # the next append of each running generation sees them.
        _log.info("cancel channel subscribed again")

    async def _read_until_stop(
        self, count: int, stopping: asyncio.Future[Any]
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        read = asyncio.ensure_future(self._read_jobs(count))
        await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not read.done():
            read.cancel()  # the blocked connection is dropped; the server forgets the read
            await asyncio.gather(read, return_exceptions=True)
            return []
        return read.result()

    async def _read_jobs(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        group, stream = keys.JOBS_GROUP, keys.JOBS_STREAM
        block = None if self._embedded else self._settings.job_block_ms
        try:
            reply = await self._redis.xreadgroup(
                group, self._consumer, {stream: ">"}, count=count, block=block
            )
        except ResponseError:
            # NOGROUP (its wording differs between Redis and fakeredis): first start, or Redis
            # lost its data. Anything else is a real error.
            if not await self._ensure_group():
                raise
            return []
        if not reply and self._embedded:
            # fakeredis 2.40 returns at once from a blocking XREADGROUP, so wait for a new entry
            # with plain XREAD; one added between the two reads waits at most this timeout.
            await self._redis.xread({stream: "$"}, block=_EMBEDDED_WAIT_MS)
            return []
        streams = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply)
        return [entry for _, batch in streams for entry in batch]

    async def _ensure_group(self) -> bool:
        """Create the consumer group (and the stream); False when it already existed."""
        try:
            await self._redis.xgroup_create(
                keys.JOBS_STREAM, keys.JOBS_GROUP, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        _log.info("created consumer group %s on %s", keys.JOBS_GROUP, keys.JOBS_STREAM)
        return True

    async def _process(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            job = Job.from_fields(fields)
        except (KeyError, ValueError, TypeError):
            _log.error("dropping malformed job %s: %r", entry_id, fields)
            await self._ack(entry_id)
            return
        settings = self._settings
        writer = StreamWriter(
            self._redis,
            job.message_id,
            owner=f"{self._consumer}/{entry_id.decode()}",
            ttl_ms=settings.stream_ttl_s * 1000,
            maxlen=settings.stream_maxlen,
        )
        # Follow cancellation before claiming: a request made in between is not missed.
        cancelled = self._running[job.message_id] = asyncio.get_running_loop().create_future()
        try:
            claim = await writer.claim()
            if claim == "cancelled":  # cancelled while it waited in the queue
                await writer.append(Kind.CANCELLED, orjson.dumps({"reason": "requested"}))
            elif claim != "ok":
                _log.info("job %s: message %s is %s; skipped", entry_id, job.message_id, claim)
            else:
                await self._generate(job, writer, cancelled)
        finally:
            del self._running[job.message_id]
            cancelled.cancel()
        await self._ack(entry_id)

    async def _generate(
        self, job: Job, writer: StreamWriter, cancelled: asyncio.Future[str]
    ) -> None:
        request = GenerationRequest(
            prompt=job.prompt,
            max_tokens=job.max_tokens,
            messages=job.messages,
            model=job.model,
            params=job.params,
        )
        try:
            await generate(
                self._backend,
                request,
                writer,
                coalesce_s=self._settings.coalesce_ms / 1000,
                cancelled=cancelled,
            )
        except WriteRefused as exc:
            _log.warning("message %s: %s; generation stopped", job.message_id, exc)
        except asyncio.CancelledError:
            # Stopped past the shutdown grace: end the message rather than leave its readers
            # waiting for an end that never comes.
            interrupted = {
                "type": "worker_shutdown",
                "message": "the worker stopped mid-answer; ask again",
            }
            await asyncio.shield(writer.append(Kind.ERROR, orjson.dumps(interrupted)))
            raise

    async def _ack(self, entry_id: bytes) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(keys.JOBS_STREAM, keys.JOBS_GROUP, entry_id)
            pipe.xdel(keys.JOBS_STREAM, entry_id)
            await pipe.execute()

    def _reap(self) -> None:
        for task in [t for t in self._tasks if t.done()]:
            self._tasks.discard(task)
            self._report(task)

    @staticmethod
    def _report(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # The job stays pending (unacknowledged) for another attempt; say why it failed.
            _log.error("generation task failed", exc_info=exc)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        _log.info(
            "waiting up to %.0f s for %d generations",
            self._settings.shutdown_grace_s,
            len(self._tasks),
        )
        _, pending = await asyncio.wait(self._tasks, timeout=self._settings.shutdown_grace_s)
        for task in pending:
            task.cancel()
        # A cancellation can be lost inside redis-py on Python 3.11: wait, but not for ever.
        _, stuck = await asyncio.wait(self._tasks, timeout=10)
        for task in self._tasks - stuck:
            self._report(task)
        if stuck:
            _log.error("%d generations did not stop when cancelled; leaving them", len(stuck))
        self._tasks.clear()
