"""One Lua script called by many tasks of a process, sent to Redis a batch at a time.

Every generation of a worker appends its events with the same script. Each call on its own
costs Redis a read and a write on a connection besides running the script: with 100 streams
appending at once, ``python -m bench.appends`` measured 42-52 us of Redis CPU per append with
one call each, and 18-24 us batched. So calls wait in a queue, and one sender task
sends whatever has queued as one pipeline (no transaction), then the next batch once that
reply is in. A lone call goes at once; under load, calls that arrive while a batch is out
share the next round trip instead of each taking one.

Nothing changes for the caller: each call gets its own reply or its own error. A call whose
caller was cancelled before its batch left is not sent. A pipeline that redis-py retries (a
connection error) sends its calls again, which the script must tolerate (the append script
skips a call id it has already applied); two calls of one writer are never in one batch,
because a writer awaits each append before the next. The price: one round trip out at a
time, so a stalled one (Redis unreachable, until redis-py's retries give up) holds every
caller of the process, where it used to hold only its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from redis.exceptions import NoScriptError, ResponseError

from shared import metrics
from shared.redis_client import RedisClient

_log = logging.getLogger(__name__)


class ScriptCall(Protocol):
    """Runs a script with keys and arguments: a :class:`ScriptBatch`, or redis-py's own script
    object (one round trip per call)."""

    def __call__(self, keys: Sequence[str], args: Sequence[str | bytes]) -> Awaitable[Any]: ...


@dataclass(slots=True)
class _Call:
    keys: Sequence[str]
    args: Sequence[str | bytes]
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ScriptBatch:
    """Calls of ``script``, batched; use ``async with`` around the tasks that call it."""

    def __init__(
        self,
        redis: RedisClient,
        script: str,
        *,
        close_within_s: float | None = None,
        operation: str = "script",
    ) -> None:
        self._redis = redis
        self._round_trips = metrics.REDIS_SECONDS.labels(operation)  # their latency
        self._script = script
        # How long leaving the block may wait for calls still out (None: as long as they take).
        self._close_within_s = close_within_s
        self._sha: str | None = None
        self._queued: list[_Call] = []
        self._out: list[_Call] = []  # the batch whose reply is awaited
        self._wake = asyncio.Event()
        self._closing = False
        self._sender: asyncio.Task[None] | None = None
        #: Calls sent, and round trips they took (what batching saved is the difference).
        self.calls = 0
        self.round_trips = 0

    async def __aenter__(self) -> ScriptBatch:
        self._sender = asyncio.create_task(self._send_until_closed(), name="script-batch")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        self._wake.set()
        sender = self._sender
        if sender is None:
            return  # never entered
        try:
            await asyncio.wait_for(asyncio.shield(sender), self._close_within_s)
        except TimeoutError:
            # Redis does not answer (redis-py may retry for a long while): the calls still
            # out fail with "stopped" rather than hold the process's exit.
            waiting = len(self._out) + len(self._queued)
            _log.warning("script batch closed with %d calls unanswered", waiting)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def __call__(self, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        """Run the script with ``keys`` and ``args``; its reply, or the error Redis gave."""
        if self._sender is None or self._sender.done():
            raise RuntimeError("the script batch is not running (use it inside 'async with')")
        call = _Call(keys, args)
        self._queued.append(call)
        self._wake.set()
        return await call.future

    async def _send_until_closed(self) -> None:
        try:
            while True:
                if not self._queued:
                    # Closing ends the task only once nothing waits: a generation the worker
                    # stopped may still append its last event after the close began.
                    if self._closing:
                        return
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                batch, self._queued = self._queued, []
                batch = [call for call in batch if not call.future.done()]  # callers gone
                if batch:
                    self._out = batch
                    await self._send(batch)
                    self._out = []
        finally:
            # Calls still waiting here: this task was cancelled or failed (the error goes on).
            for call in [*self._out, *self._queued]:
                if not call.future.done():
                    call.future.set_exception(RuntimeError("the script batch was stopped"))

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies = await self._run(batch)
        except Exception as exc:  # each caller raises what the round trip raised
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        for call, reply in zip(batch, replies, strict=True):
            if call.future.done():
                continue  # its caller was cancelled while the batch was out
            if isinstance(reply, Exception):
                call.future.set_exception(reply)
            else:
                call.future.set_result(reply)

    async def _run(self, batch: list[_Call]) -> list[Any]:
        if self._sha is None:
            self._sha = await self._redis.script_load(self._script)
        replies = await self._round_trip(batch)
        retry = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if retry:
            # Redis lost its scripts (a restart, SCRIPT FLUSH, a failover): those calls never
            # ran, so they are sent again once the script is loaded (even a call whose caller
            # has gone meanwhile: it was sent once). If that fails, only they fail: the others
            # of the batch were applied.
            try:
                self._sha = await self._redis.script_load(self._script)
                again = await self._round_trip([batch[i] for i in retry])
            except Exception as exc:
                again = [exc] * len(retry)
            for i, reply in zip(retry, again, strict=True):
                replies[i] = reply
        return replies

    async def _round_trip(self, batch: list[_Call]) -> list[Any]:
        with self._round_trips.time():
            return await self._send_batch(batch)

    async def _send_batch(self, batch: list[_Call]) -> list[Any]:
        sha = self._sha
        if sha is None:
            sha = self._sha = await self._redis.script_load(self._script)
        replies: list[Any]
        if len(batch) == 1:  # a lone call: a pipeline's own work would be all cost
            call = batch[0]
            try:
                replies = [await self._redis.evalsha(sha, len(call.keys), *call.keys, *call.args)]
            except ResponseError as exc:  # an error reply is this call's own result
                replies = [exc]
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for call in batch:
                    pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
                replies = await pipe.execute(raise_on_error=False)
        self.calls += len(batch)
        self.round_trips += 1
        return replies
