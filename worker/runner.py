"""The worker's job loop: every partition of the jobs queue feeds up to N concurrent generations.

One reader per partition (worker.jobs) takes a job when a generation slot is free; slots are
handed out in turn, so every partition is served. A job's generation takes the message over
(fencing any earlier attempt out), generates it, and acknowledges the job once the message has
a terminal event. Jobs whose worker was lost are reclaimed after a lease: the new attempt
writes ``reset`` if anything had been streamed and generates again from the start; a job
delivered more than ``job_max_attempts`` times goes to its partition's dead letters and its
message ends with an error.

Cancellation reaches a running generation two ways: the append script refuses the next event of
a message flagged for cancellation, and a cancel request is published on this worker's own
shard channel (gateways find the worker from the message's owner token), so that a model that
is silent (a long prefill, a stalled upstream) is stopped at once, not at its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

import orjson
from redis.asyncio import Connection
from redis.exceptions import RedisError

from shared import keys, metrics, quotas
from shared.backoff import retry_delay_s
from shared.events import Kind
from shared.live import NodeMap, ShardedChannels
from shared.messages import Job
from shared.redis_client import RedisClient
from shared.settings import Settings
from worker.backends.base import GenerationRequest, ModelBackend
from worker.generation import (
    LEASE_LOST,
    WORKER_STOPPING,
    LeaseLost,
    append_shutdown_error,
    generate,
)
from worker.jobs import Entry, JobQueue, Partition
from worker.script_batch import ScriptBatch
from worker.stream_writer import StreamWriter, WriteRefused

_log = logging.getLogger(__name__)
# What a read of jobs can fail with and later succeed: Redis unreachable or failing over
# (ClusterDownError, TryAgainError...), and redis-py's async cluster client tearing down a
# connection another command is using during a failover (an AttributeError inside it).
_READ_FAILURES = (RedisError, OSError, AttributeError)


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Sleep ``timeout_s``, or less if ``event`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


def consumer_name() -> str:
    """A consumer name unique to this process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _Slots:
    """The generations a worker may run at once: :meth:`take` one, :meth:`give` it back."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._given = asyncio.Event()

    async def free(self) -> None:
        """Wait until a slot is free (without taking it)."""
        while self.count <= 0:
            self._given.clear()
            await self._given.wait()

    async def take(self) -> None:
        await self.free()
        self.count -= 1

    def give(self) -> None:
        self.count += 1
        self._given.set()


class Worker:
    """Takes jobs from every partition and generates them; :meth:`run` until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        appends: ScriptBatch,
        backend: ModelBackend,
        *,
        consumer: str,
        nodes: NodeMap,
        connect: Callable[[str], Connection],
        embedded: bool = False,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._appends = appends
        self._backend = backend
        self._consumer = consumer
        self._queue = JobQueue(settings, redis, consumer=consumer, embedded=embedded)
        self._slots = _Slots(settings.worker_concurrency)
        self._reads_failing = False  # jobs could not be read lately (see _read_partition)
        self._tasks: set[asyncio.Task[None]] = set()
        # Job entries being processed here, so the reclaimer never takes one of its own.
        self._jobs: set[bytes] = set()
        # Running generations by message id, each with the future that cancels it.
        self._running: dict[str, asyncio.Future[str]] = {}
        self._cancels = ShardedChannels(
            nodes, connect, self._on_cancel, self._on_resubscribed, ping_interval_s=5.0
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Generate jobs until ``stop`` is set, then let running generations finish (bounded)."""
        _log.info(
            "worker %s taking jobs from %d partitions (concurrency %d)",
            self._consumer,
            len(self._queue.partitions),
            self._settings.worker_concurrency,
        )
        self._cancels.follow(keys.worker_channel(self._consumer).encode())
        listener = asyncio.create_task(self._cancels.run())
        halted = asyncio.Event()  # set when the worker stops, or a reader failed unexpectedly
        readers = [
            asyncio.create_task(self._read_partition(partition, stop, halted))
            for partition in self._queue.partitions
        ]
        reclaimer = asyncio.create_task(self._reclaim_until(stop, halted))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                [stopping, asyncio.ensure_future(halted.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            halted.set()
            stopping.cancel()
            for reader in readers:
                reader.cancel()  # a blocked read's connection is dropped; Redis forgets it
            results = await asyncio.gather(*readers, reclaimer, stopping, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    _log.error("worker task failed", exc_info=result)
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

    async def _read_partition(
        self, partition: Partition, stop: asyncio.Event, halted: asyncio.Event
    ) -> None:
        """Take the jobs of one partition, one at a time, while a generation slot is free.

        Every partition's reader waits for a job at once, so a job is taken the moment it is
        queued; none reads while every slot is taken, so a full worker leaves new jobs to
        the others.
        """
        failures = 0
        try:
            while not stop.is_set():
                await self._slots.free()
                try:
                    entries = await self._queue.read(partition, 1)
                except _READ_FAILURES as exc:
                    delay = retry_delay_s(failures)
                    failures += 1
                    # Every partition's reader sees the same outage: one warning for it.
                    _log.log(
                        logging.DEBUG if self._reads_failing else logging.WARNING,
                        "reading jobs of partition %d failed (%s: %s); retrying",
                        partition.index,
                        type(exc).__name__,
                        exc,
                    )
                    self._reads_failing = True
                    await _wait(stop, delay)
                    continue
                if self._reads_failing:
                    self._reads_failing = False
                    _log.info("reading jobs again")
                failures = 0
                for entry_id, fields in entries:
                    await self._slots.take()
                    self._start(self._process(partition, entry_id, fields))
        except Exception:
            halted.set()  # the worker stops rather than serve some partitions only
            raise

    def _start(self, work: Any) -> None:
        """Run ``work`` in a generation slot already taken; it gives the slot back when done."""
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._slots.give()
        self._tasks.discard(task)
        self._report(task)

    async def _process(
        self,
        partition: Partition,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        *,
        takeover: bool = False,
    ) -> None:
        try:
            job = Job.from_fields(fields)
        except (KeyError, ValueError, TypeError):
            # Its fields' names only: a job carries the prompt.
            _log.error("dropping malformed job %s (fields %s)", entry_id, sorted(fields))
            await self._queue.ack(partition, entry_id)
            return
        writer = self._writer(job, entry_id)
        # Follow cancellation before claiming: a request made in between is not missed.
        cancelled = self._running[job.message_id] = asyncio.get_running_loop().create_future()
        self._jobs.add(entry_id)
        outcome = "unfinished"  # as the metrics count it (see shared.metrics.MESSAGES)
        metrics.GENERATIONS.inc()
        try:
            claim = await writer.claim(takeover=takeover)
            if claim == "cancelled":  # cancelled while it waited in the queue
                await writer.append(Kind.CANCELLED, orjson.dumps({"reason": "requested"}))
                metrics.CANCELLATIONS.labels("requested").inc()
            elif claim != "ok":
                outcome = "skipped"
                _log.info("job %s: message %s is %s; skipped", entry_id, job.message_id, claim)
            else:
                await self._generate_claimed(partition, entry_id, job, writer, cancelled, takeover)
        except WriteRefused as exc:
            if exc.reason == "fenced":
                # Another worker took the job over (this one was presumed lost): it is theirs
                # to acknowledge now.
                outcome = "taken_over"
                _log.warning("message %s was taken over by another worker", job.message_id)
                return
            raise
        except LeaseLost:
            # Another worker's reclaim took the job (a stall outlasted the lease): it generates
            # the message again, or, had its reclaim's reply been lost, a later reclaim does.
            outcome = "taken_over"
            _log.warning("message %s: job %s is another worker's now", job.message_id, entry_id)
            return
        finally:
            metrics.GENERATIONS.dec()
            if writer.ended_with is not None:
                outcome = writer.ended_with.value
            metrics.MESSAGES.labels(outcome).inc()
            self._jobs.discard(entry_id)
            if self._running.get(job.message_id) is cancelled:
                del self._running[job.message_id]
            cancelled.cancel()
        await self._finish(partition, entry_id, job)

    async def _finish(self, partition: Partition, entry_id: bytes, job: Job) -> None:
        """The message is over: it no longer counts against its key, and its job is done.
        If Redis fails here, the job stays pending: a reclaim finds its message finished and
        does both then (its quota entry also expires on its own)."""
        try:
            if job.key_id:
                await quotas.release(self._redis, job.key_id, job.message_id)
            await self._queue.ack(partition, entry_id)
        except RedisError as exc:
            _log.warning(
                "job %s is done but acknowledging it failed (%s: %s); a reclaim will",
                entry_id,
                type(exc).__name__,
                exc,
            )

    async def _generate_claimed(
        self,
        partition: Partition,
        entry_id: bytes,
        job: Job,
        writer: StreamWriter,
        cancelled: asyncio.Future[str],
        takeover: bool,
    ) -> None:
        """Generate a message this attempt claimed, renewing the job's lease meanwhile."""
        if takeover:
            metrics.TAKEOVERS.inc()
            if writer.events_before:
                _log.warning("message %s: its worker was lost; generating it again", job.message_id)
                await writer.append(Kind.RESET, orjson.dumps({"reason": "worker_lost"}))
        renewing = asyncio.create_task(self._renew_lease(partition, entry_id, cancelled))
        try:
            await self._generate(job, writer, cancelled)
        finally:
            renewing.cancel()
            # Its only ending besides cancellation is the return after a lost lease.
            with contextlib.suppress(asyncio.CancelledError):
                await renewing

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

    async def _renew_lease(
        self, partition: Partition, entry_id: bytes, cancelled: asyncio.Future[str]
    ) -> None:
        """Keep the job's idle time low while generating, so no one takes it over; stop the
        generation at once if it was taken over all the same."""
        period = self._settings.job_lease_s / 3
        while True:
            await asyncio.sleep(period)
            try:
                if not await self._queue.renew(partition, entry_id):
                    # Stop at once and write nothing more: the message is not ended here.
                    if not cancelled.done():
                        cancelled.set_result(LEASE_LOST)
                    return
            except RedisError as exc:
                _log.warning("renewing the lease of job %s failed: %s", entry_id, exc)

    async def _reclaim_until(self, stop: asyncio.Event, halted: asyncio.Event) -> None:
        """Take over the jobs of lost workers until ``stop`` or ``halted``."""
        lease_ms = int(self._settings.job_lease_s * 1000)
        period = max(0.1, self._settings.job_lease_s / 2)
        # Gone: idle for two leases, and far longer than a live worker's blocked reads.
        gone_ms = max(2 * lease_ms, 10 * self._settings.job_block_ms)
        while not stop.is_set() and not halted.is_set():
            try:
                # Renewed four times within its expiry: only a worker gone (or cut off from
                # Redis) for a whole gone_ms stops declaring itself alive.
                await self._queue.declare_alive(gone_ms)
            except RedisError as exc:
                _log.warning("declaring this worker alive failed: %s", exc)
            # At once on start: jobs of a worker that died before this one started wait no
            # longer than their lease.
            for partition in self._queue.partitions:
                if stop.is_set() or halted.is_set():
                    return
                try:
                    await self._reclaim(partition, lease_ms)
                    for name in await self._queue.forget_gone_consumers(partition, gone_ms):
                        _log.info("removed gone worker %s from %s", name, partition.stream)
                except RedisError as exc:
                    _log.warning("reclaiming stale jobs of %s failed: %s", partition.stream, exc)
            await _wait(halted, period)

    async def _reclaim(self, partition: Partition, lease_ms: int) -> None:
        free = self._slots.count
        if free <= 0:
            return
        for entry_id, fields, deliveries in await self._queue.reclaim(partition, lease_ms, free):
            if entry_id in self._jobs:
                continue  # one this process is generating
            await self._slots.take()
            if deliveries > self._settings.job_max_attempts:
                self._start(self._dead_letter(partition, (entry_id, fields), deliveries))
            else:
                _log.warning(
                    "job %s lost its worker; taking it over (delivery %d)", entry_id, deliveries
                )
                self._start(self._process(partition, entry_id, fields, takeover=True))

    async def _dead_letter(self, partition: Partition, entry: Entry, deliveries: int) -> None:
        """Park a job that keeps losing its workers, and end its message with an error."""
        entry_id, fields = entry
        _log.error(
            "job %s lost its worker %d times; moving it to %s", entry_id, deliveries, partition.dead
        )
        await self._queue.bury(partition, entry_id, fields, deliveries)
        metrics.DEAD_LETTERS.inc()
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
            if job.key_id:
                await quotas.release(self._redis, job.key_id, job.message_id)
        await self._queue.ack(partition, entry_id)

    def _writer(self, job: Job, entry_id: bytes) -> StreamWriter:
        # One token per attempt, even on the same worker: a worker that takes over a job of its
        # own (its renewals failed for a whole lease) still fences its earlier attempt out.
        # Gateways read the worker's consumer name from it to tell it of a cancellation.
        return StreamWriter(
            self._redis,
            self._appends,
            job.message_id,
            owner=f"{self._consumer}/{entry_id.decode()}/{secrets.token_hex(4)}",
            queued_s=int(entry_id.split(b"-")[0]) / 1000,  # the entry id: when it was queued
            ttl_ms=self._settings.stream_ttl_s * 1000,
            maxlen=self._settings.stream_maxlen,
            # Through a failover or a slot migration; past a lease, another worker takes over.
            retry_for_s=self._settings.job_lease_s,
        )

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
        if stuck:
            _log.error("%d generations did not stop when cancelled; leaving them", len(stuck))
