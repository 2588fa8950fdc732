"""The worker's job loop: a consumer group on the jobs stream feeds up to N concurrent generations.

A job is acknowledged (and deleted, so the jobs stream stays small) only once its message has a
terminal event, or when it can never be generated (malformed, expired, already taken).

Leases: while a worker generates, it renews its job's lease (resets the job's idle time in the
consumer group) every third of ``job_lease_s``. Every worker also reclaims jobs idle longer than
that (XAUTOCLAIM): their worker is gone. The new attempt takes the message over, which fences
the old one out (its appends are refused), writes ``reset`` if the stream had events, and
generates again from the start. A job delivered more than ``job_max_attempts`` times (it keeps
losing its workers) goes to the dead-letter stream and its message ends with an error.

Cancellation reaches a running generation two ways: the append script refuses the next event of
a message flagged for cancellation, and the worker follows the cancel channel so that a model
that is silent (a long prefill, a stalled upstream) is stopped at once, not at its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any, cast

import orjson
from redis.asyncio import Connection, Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys
from shared.events import Kind
from shared.live import LiveChannels
from shared.messages import Job
from shared.settings import Settings
from worker.backends.base import GenerationRequest, ModelBackend
from worker.generation import WORKER_STOPPING, append_shutdown_error, generate
from worker.script_batch import ScriptBatch
from worker.stream_writer import StreamWriter, WriteRefused

_log = logging.getLogger(__name__)
_RETRY_S = (0.1, 0.2, 0.5, 1.0, 2.0)
# The embedded fakeredis answers XREADGROUP ... BLOCK wrongly (see _read_jobs); there a worker
# waits on a plain XREAD of new entries for at most this long between non-blocking group reads.
_EMBEDDED_WAIT_MS = 100


# Renew a job's lease only while it is still ours: a plain XCLAIM would take back a job that
# was already taken over from us. JUSTID leaves the delivery count alone.
_RENEW = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if pending[1] and pending[1][2] == ARGV[3] then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
  return 1
end
return 0
"""


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Sleep ``timeout_s``, or less if ``event`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


def consumer_name() -> str:
    """A consumer name unique to this process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """Takes jobs from the consumer group and generates them; :meth:`run` until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        appends: ScriptBatch,
        backend: ModelBackend,
        *,
        consumer: str,
        connect: Callable[[], Connection],
        embedded: bool = False,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._appends = appends
        self._backend = backend
        self._consumer = consumer
        self._embedded = embedded
        self._tasks: set[asyncio.Task[None]] = set()
        self._group_ensured = False
        self._reclaim_cursor: bytes | str = "0-0"
        # Job entries being processed here, so the reclaimer never takes one of its own.
        self._jobs: set[bytes] = set()
        # Running generations by message id, each with the future that cancels it.
        self._running: dict[str, asyncio.Future[str]] = {}
        self._renew: AsyncScript = redis.register_script(_RENEW)
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
        # Stops with the worker, and also when this loop ends on an unexpected error.
        halted = asyncio.Event()
        reclaimer = asyncio.create_task(self._reclaim_until(stop, halted))
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
            halted.set()
            await asyncio.gather(reclaimer, return_exceptions=True)
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
            # NOGROUP (worded differently by Redis and fakeredis): the first start, or Redis
            # lost its data; another worker may be creating the group right now. The same
            # error right after the group was made sure of is a real one.
            if self._group_ensured:
                raise
            await self._ensure_group()
            self._group_ensured = True
            return []
        except (RedisConnectionError, RedisTimeoutError):
            self._group_ensured = False  # Redis may come back without its data
            raise
        self._group_ensured = False
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

    async def _process(
        self, entry_id: bytes, fields: dict[bytes, bytes], *, takeover: bool = False
    ) -> None:
        try:
            job = Job.from_fields(fields)
        except (KeyError, ValueError, TypeError):
            _log.error("dropping malformed job %s: %r", entry_id, fields)
            await self._ack(entry_id)
            return
        writer = self._writer(job, entry_id)
        # Follow cancellation before claiming: a request made in between is not missed.
        cancelled = self._running[job.message_id] = asyncio.get_running_loop().create_future()
        self._jobs.add(entry_id)
        try:
            claim = await writer.claim(takeover=takeover)
            if claim == "cancelled":  # cancelled while it waited in the queue
                await writer.append(Kind.CANCELLED, orjson.dumps({"reason": "requested"}))
            elif claim != "ok":
                _log.info("job %s: message %s is %s; skipped", entry_id, job.message_id, claim)
            else:
                if takeover and writer.events_before:
                    _log.warning(
                        "message %s: its worker was lost; generating it again", job.message_id
                    )
                    await writer.append(Kind.RESET, orjson.dumps({"reason": "worker_lost"}))
                renewing = asyncio.create_task(self._renew_lease(entry_id, cancelled))
                try:
                    await self._generate(job, writer, cancelled)
                finally:
                    renewing.cancel()
                    await asyncio.gather(renewing, return_exceptions=True)
        except WriteRefused as exc:
            if exc.reason == "fenced":
                # Another worker took the job over (this one was presumed lost): it is theirs
                # to acknowledge now.
                _log.warning("message %s was taken over by another worker", job.message_id)
                return
            raise
        finally:
            self._jobs.discard(entry_id)
            if self._running.get(job.message_id) is cancelled:
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
            if exc.reason == "fenced":
                raise
            _log.warning("message %s: %s; generation stopped", job.message_id, exc)
        except asyncio.CancelledError:
            # Stopped past the shutdown grace: end the message rather than leave its readers
            # waiting for an end that never comes.
            await asyncio.shield(append_shutdown_error(writer))
            raise

    async def _renew_lease(self, entry_id: bytes, cancelled: asyncio.Future[str]) -> None:
        """Keep the job's idle time low while generating, so no one takes it over; stop the
        generation at once if it was taken over all the same."""
        period = self._settings.job_lease_s / 3
        args: list[str | bytes] = [keys.JOBS_GROUP, entry_id, self._consumer]
        while True:
            await asyncio.sleep(period)
            try:
                if not await self._renew(keys=[keys.JOBS_STREAM], args=args):
                    _log.warning("job %s is no longer ours; another worker took it over", entry_id)
                    if not cancelled.done():
                        cancelled.set_result("lease_lost")  # its writes are fenced anyway
                    return
            except RedisError as exc:
                _log.warning("renewing the lease of job %s failed: %s", entry_id, exc)

    async def _reclaim_until(self, stop: asyncio.Event, halted: asyncio.Event) -> None:
        """Take over the jobs of lost workers until ``stop`` or ``halted``."""
        lease_ms = int(self._settings.job_lease_s * 1000)
        period = max(0.1, self._settings.job_lease_s / 2)
        while not stop.is_set() and not halted.is_set():
            await _wait(halted, period)
            free = self._settings.worker_concurrency - len(self._tasks)
            if stop.is_set() or halted.is_set() or free <= 0:
                continue
            try:
                await self._reclaim(lease_ms, free)
            except RedisError as exc:
                _log.warning("reclaiming stale jobs failed: %s", exc)

    async def _reclaim(self, lease_ms: int, count: int) -> None:
        group, stream = keys.JOBS_GROUP, keys.JOBS_STREAM
        # Resume the scan where the last round stopped: XAUTOCLAIM looks at a bounded slice of
        # the pending entries per call, and stale ones may lie past the first slice.
        reply = await self._redis.xautoclaim(
            stream, group, self._consumer, lease_ms, self._reclaim_cursor, count=count
        )
        self._reclaim_cursor = reply[0]
        for entry_id, fields in cast(list[tuple[bytes, dict[bytes, bytes] | None]], reply[1]):
            if fields is None or entry_id in self._jobs:
                continue  # deleted meanwhile, or one this process is generating
            pending = await self._redis.xpending_range(stream, group, entry_id, entry_id, 1)
            deliveries = int(pending[0]["times_delivered"]) if pending else 1
            if deliveries > self._settings.job_max_attempts:
                task = asyncio.create_task(self._dead_letter(entry_id, fields, deliveries))
            else:
                _log.warning(
                    "job %s lost its worker; taking it over (delivery %d)", entry_id, deliveries
                )
                task = asyncio.create_task(self._process(entry_id, fields, takeover=True))
            self._tasks.add(task)

    async def _dead_letter(
        self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int
    ) -> None:
        """Park a job that keeps losing its workers, and end its message with an error."""
        _log.error(
            "job %s lost its worker %d times; moving it to %s",
            entry_id,
            deliveries,
            keys.JOBS_DEAD_STREAM,
        )
        dead = {**fields, b"job_id": entry_id, b"deliveries": str(deliveries).encode()}
        await self._redis.xadd(keys.JOBS_DEAD_STREAM, dead, maxlen=10_000)  # type: ignore[arg-type]
        try:
            job = Job.from_fields(fields)
        except (KeyError, ValueError, TypeError):
            job = None
        if job is not None:
            writer = self._writer(job, entry_id)
            if await writer.claim(takeover=True) in ("ok", "cancelled"):
                message = (
                    f"generation failed {deliveries} times (its workers were lost); not retried"
                )
                error = {"type": "job_failed", "message": message}
                await writer.append(Kind.ERROR, orjson.dumps(error))
        await self._ack(entry_id)

    def _writer(self, job: Job, entry_id: bytes) -> StreamWriter:
        # One token per attempt, even on the same worker: a worker that takes over a job of its
        # own (its renewals failed for a whole lease) still fences its earlier attempt out.
        return StreamWriter(
            self._redis,
            self._appends,
            job.message_id,
            owner=f"{self._consumer}/{entry_id.decode()}/{secrets.token_hex(4)}",
            ttl_ms=self._settings.stream_ttl_s * 1000,
            maxlen=self._settings.stream_maxlen,
        )

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
        grace = self._settings.shutdown_grace_s
        _log.info("waiting up to %.0f s for %d generations", grace, len(self._tasks))
        _, pending = await asyncio.wait(self._tasks, timeout=grace)
        if pending:
            # Ask first: each generation stops at once and ends its message with an error.
            for cancelled in self._running.values():
                if not cancelled.done():
                    cancelled.set_result(WORKER_STOPPING)
            _, pending = await asyncio.wait(pending, timeout=5)
        for task in pending:
            task.cancel()  # then insist (a cancellation alone can be lost in redis-py on 3.11)
        stuck: set[asyncio.Task[None]] = set()
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=10)
        for task in self._tasks - stuck:
            self._report(task)
        if stuck:
            _log.error("%d generations did not stop when cancelled; leaving them", len(stuck))
        self._tasks.clear()
