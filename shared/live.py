"""One subscribed Redis connection per process, shared by every channel it follows.

Gateways follow live messages with it; workers follow cancellation requests.

Pub/sub delivers each announcement at most once, and only while the connection lives. Callers
therefore never trust it alone: after a reconnect, once every channel is subscribed again,
``on_resubscribed`` fires and the hub re-reads each live message's stream from where it was.
A silent dead peer is caught by a PING whenever the connection has been quiet for
``ping_interval_s``; no reply within another interval counts as a broken connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from redis.asyncio import Connection
from redis.exceptions import RedisError

_log = logging.getLogger(__name__)
_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class LiveChannels:
    """Keeps a set of channels subscribed on one connection and hands their messages on."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        on_message: Callable[[bytes, bytes], None],
        on_resubscribed: Callable[[], None],
        *,
        ping_interval_s: float,
    ) -> None:
        self._connect = connect
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._ping_interval_s = ping_interval_s
        # Wanted channels, each with the future of its pending SUBSCRIBE confirmation (or None).
        self._channels: dict[bytes, asyncio.Future[None] | None] = {}
        self._conn: Connection | None = None
        self._unconfirmed: set[bytes] = set()
        self._closing = False
        self._last_heard = 0.0
        self.reconnects = 0

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe to ``channel``; return once Redis confirmed it (retried across reconnects)."""
        future = self._channels.get(channel)
        if future is None:
            if channel in self._channels:
                return  # already confirmed
            future = asyncio.get_running_loop().create_future()
            self._channels[channel] = future
            await self._send("SUBSCRIBE", channel)
        await asyncio.shield(future)

    def follow(self, channel: bytes) -> None:
        """Subscribe to ``channel`` from the next (re)connection on, without waiting for it.

        For channels known before :meth:`run` starts; :meth:`subscribe` is for the rest.
        """
        self._channels.setdefault(channel, None)

    async def unsubscribe(self, channel: bytes) -> None:
        """Stop receiving ``channel``."""
        future = self._channels.pop(channel, None)
        if future is not None and not future.done():
            future.cancel()
        await self._send("UNSUBSCRIBE", channel)

    async def _send(self, *args: str | bytes) -> None:
        conn = self._conn
        # Only write on the connection the reader owns: redis-py would silently reconnect a
        # dropped one, and the reader would never resubscribe its channels.
        if conn is None or not conn.is_connected:
            return  # the reader reconnects and subscribes every wanted channel
        try:
            await conn.send_command(*args)
        except RedisError as exc:
            _log.debug("pub/sub write failed (%s); the reader will reconnect", exc)

    async def aclose(self) -> None:
        """Stop for good: :meth:`run` returns soon after (await its task).

        Cancelling alone is not enough on Python 3.11, where redis-py's timeouts
        (asyncio.wait_for, asyncio.timeout) can lose a cancellation that coincides with them,
        after which the loop would run on. Closing the connection ends a read on a real Redis;
        cancel the task as well, for the embedded fakeredis does not wake a read on close.
        """
        self._closing = True
        conn = self._conn
        if conn is not None:
            await conn.disconnect(nowait=True)

    async def run(self) -> None:
        """Read until :meth:`close` (or cancellation), reconnecting with backoff."""
        failures = 0
        while not self._closing:
            conn = self._connect()
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                # Publish the connection before taking the snapshot: a subscribe() from now on
                # sends its own SUBSCRIBE, one from before is in the snapshot. None is lost.
                self._conn = conn
                if self._closing:  # closed while connecting: aclose() found no connection
                    return
                channels = list(self._channels)
                resubscribing = self.reconnects > 0 or failures > 0
                self._unconfirmed = set(channels) if resubscribing else set()
                if channels:
                    await conn.send_command("SUBSCRIBE", *channels)
                if resubscribing and not channels:
                    self._on_resubscribed()
                failures = 0
                await self._read(conn)
            except (RedisError, OSError) as exc:
                if self._closing:
                    return
                delay = _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]
                failures += 1
                self.reconnects += 1
                _log.warning(
                    "live channel connection lost (%s); reconnecting in %.2f s", exc, delay
                )
                await asyncio.sleep(delay)
            finally:
                self._conn = None
                await conn.disconnect(nowait=True)

    async def _read(self, conn: Connection) -> None:
        # The read itself has no timeout: on Python 3.11 a cancellation that coincides with a
        # read timeout can be taken for the timeout and lost, and the task would never end.
        # Liveness is the keep-alive task's job instead.
        loop = asyncio.get_running_loop()
        self._last_heard = loop.time()
        keepalive = asyncio.create_task(self._keepalive(conn))
        try:
            while True:
                reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
                self._last_heard = loop.time()
                kind = reply[0]
                if kind == b"message":
                    self._deliver(reply[1], reply[2])
                elif kind == b"subscribe":
                    self._confirmed(reply[1])
        finally:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)

    async def _keepalive(self, conn: Connection) -> None:
        """PING a quiet connection; close one that stays silent, which ends the read."""
        loop = asyncio.get_running_loop()
        interval = self._ping_interval_s
        while True:
            await asyncio.sleep(interval / 2)
            quiet = loop.time() - self._last_heard
            if quiet >= 2 * interval:
                _log.warning("live channel connection silent for %.1f s; closing it", quiet)
                await conn.disconnect(nowait=True)
                return
            if quiet >= interval:
                await conn.send_command("PING")

    def _deliver(self, channel: bytes, payload: bytes) -> None:
        try:
            self._on_message(channel, payload)
        except Exception:
            # One message we cannot handle (say, a kind from a newer worker during a rolling
            # deploy) must not end delivery for every other channel.
            _log.exception("dropping a message on %r: %r", channel, payload[:200])

    def _confirmed(self, channel: bytes) -> None:
        future = self._channels.get(channel)
        if future is not None and not future.done():
            future.set_result(None)
        if channel in self._channels:
            self._channels[channel] = None
        if self._unconfirmed:
            self._unconfirmed.discard(channel)
            if not self._unconfirmed:
                self._on_resubscribed()
