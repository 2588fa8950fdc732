"""Sharded pub/sub channels followed on one subscribed connection (:class:`LiveChannels`), and
on one such connection per node of a Redis Cluster that owns some of them
(:class:`ShardedChannels`).

Gateways follow live messages with them; workers follow their own cancellation channel. The
channels are shard channels (SSUBSCRIBE, Redis 7): a message published on one stays on the
shard that owns its slot, where a classic PUBLISH is broadcast to every node of a cluster. A
standalone Redis 7 serves them too, so one code path serves both.

Pub/sub delivers each announcement at most once, and only while the connection lives. Callers
therefore never trust it alone: after a reconnect, once every channel is subscribed again,
``on_resubscribed`` fires and the hub re-reads each live message's stream from where it was.
A silent dead peer is caught by a PING whenever the connection has been quiet for
``ping_interval_s``; no reply within another interval counts as a broken connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable

from redis.asyncio import Connection
from redis.exceptions import RedisError, ResponseError

from shared.backoff import retry_delay_s

_log = logging.getLogger(__name__)


class Moved(RedisError):
    """The channel is not (or no longer) served by this connection's node."""


class LiveChannels:
    """Keeps a set of shard channels subscribed on one connection and hands their messages on.

    ``on_moved(channel)`` (optional) is told of a channel its node does not serve: refused with
    MOVED, or unsubscribed by the server when its slot moved away. The channel is dropped here.
    ``on_failure()`` (optional) is told of every failed connection attempt or lost connection.
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        on_message: Callable[[bytes, bytes], None],
        on_resubscribed: Callable[[], None],
        *,
        ping_interval_s: float,
        on_moved: Callable[[bytes], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._connect = connect
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._on_moved = on_moved
        self._on_failure = on_failure
        self._ping_interval_s = ping_interval_s
        # Wanted channels, each with the future of its pending SSUBSCRIBE confirmation (or None).
        self._channels: dict[bytes, asyncio.Future[None] | None] = {}
        # The channels of the SSUBSCRIBEs sent on this connection and not answered yet, in
        # order: an error reply (MOVED) names no channel.
        self._sent: deque[bytes] = deque()
        self._conn: Connection | None = None
        self._unconfirmed: set[bytes] = set()
        self._closing = False
        self._last_heard = 0.0
        self.reconnects = 0

    @property
    def channels(self) -> list[bytes]:
        """The channels followed (or being subscribed) here."""
        return list(self._channels)

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe to ``channel``; return once Redis confirmed it (retried across reconnects).
        Raises :class:`Moved` when this connection's node does not serve it."""
        future = self._channels.get(channel)
        if future is None:
            if channel in self._channels:
                return  # already confirmed
            future = asyncio.get_running_loop().create_future()
            self._channels[channel] = future
            await self._send_subscribe(channel)
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
        await self._send("SUNSUBSCRIBE", channel)

    def drop(self, channel: bytes) -> None:
        """Forget ``channel`` without telling the server (it was moved elsewhere)."""
        future = self._channels.pop(channel, None)
        if future is not None and not future.done():
            future.set_exception(Moved(f"{channel!r} moved"))
            future.exception()  # retrieved: a subscriber may have gone meanwhile

    async def _send_subscribe(self, channel: bytes) -> None:
        if await self._send("SSUBSCRIBE", channel):
            self._sent.append(channel)

    async def _send(self, *args: str | bytes) -> bool:
        conn = self._conn
        # Only write on the connection the reader owns: redis-py would silently reconnect a
        # dropped one, and the reader would never resubscribe its channels.
        if conn is None or not conn.is_connected:
            return False  # the reader reconnects and subscribes every wanted channel
        try:
            await conn.send_command(*args)
        except (RedisError, OSError, RuntimeError, AttributeError) as exc:
            # The connection went away between the check above and the write: uvloop says so
            # with a RuntimeError, and redis-py, once another write has disconnected it, with
            # an AttributeError (its writer is gone).
            _log.debug("pub/sub write failed (%s); the reader will reconnect", exc)
            return False
        return True

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
                # sends its own SSUBSCRIBE, one from before is in the snapshot. None is lost.
                self._conn = conn
                if self._closing:  # closed while connecting: aclose() found no connection
                    return
                channels = list(self._channels)
                resubscribing = self.reconnects > 0 or failures > 0
                self._unconfirmed = set(channels) if resubscribing else set()
                self._sent.clear()
                for channel in channels:  # one each: a cluster refuses several slots at once
                    await self._send_subscribe(channel)
                if resubscribing and not channels:
                    self._on_resubscribed()
                failures = 0
                await self._read(conn)
            except (RedisError, OSError) as exc:
                if self._closing:
                    return
                delay = retry_delay_s(failures)
                failures += 1
                self.reconnects += 1
                _log.warning(
                    "live channel connection lost (%s); reconnecting in %.2f s", exc, delay
                )
                if self._on_failure is not None:
                    self._on_failure()
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
                try:
                    reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
                except ResponseError as exc:  # the answer to an SSUBSCRIBE: MOVED
                    self._refused(exc)
                    continue
                self._last_heard = loop.time()
                kind = reply[0]
                if kind == b"smessage":
                    self._deliver(reply[1], reply[2])
                elif kind == b"ssubscribe":
                    self._confirmed(reply[1])
                elif kind == b"sunsubscribe":
                    self._unsubscribed(reply[1])
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
            # Not its content: a message carries generated text.
            _log.exception("dropping a message of %d bytes on %r", len(payload), channel)

    def _confirmed(self, channel: bytes) -> None:
        if self._sent and self._sent[0] == channel:
            self._sent.popleft()
        future = self._channels.get(channel)
        if future is not None and not future.done():
            future.set_result(None)
        if channel in self._channels:
            self._channels[channel] = None
        self._settle(channel)

    def _refused(self, error: ResponseError) -> None:
        if not self._sent:
            raise error  # no SSUBSCRIBE out: not an answer of ours
        channel = self._sent.popleft()
        if not str(error).startswith(("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")):
            raise error
        self._moved(channel)

    def _unsubscribed(self, channel: bytes) -> None:
        # One we asked for has been forgotten already; one the server ended moved away.
        if channel in self._channels:
            self._moved(channel)

    def _moved(self, channel: bytes) -> None:
        self.drop(channel)
        self._settle(channel)
        if self._on_moved is not None:
            self._on_moved(channel)
        else:
            _log.error("channel %r is not served by this Redis", channel)

    def _settle(self, channel: bytes) -> None:
        if self._unconfirmed:
            self._unconfirmed.discard(channel)
            if not self._unconfirmed:
                self._on_resubscribed()


class NodeMap:
    """Which node serves a channel: one node for one Redis (or a Sentinel-managed primary)."""

    def node_of(self, channel: bytes) -> str:
        del channel
        return "redis"

    async def refresh(self, channel: bytes) -> None:
        """Bring the map up to date for ``channel`` (its slot moved, or its node failed)."""
        del channel


class ShardedChannels:
    """Shard channels followed on one connection per node that serves some of them.

    Which node serves a channel is the :class:`NodeMap`'s to say (for a cluster, redis-py's
    cluster client, which follows MOVED and refreshes its view of the slots). A channel its
    node no longer serves (the slot moved, the node failed over) is subscribed again where the
    map now says, and ``on_resubscribed`` fires once it is: the callers re-read what they may
    have missed.
    """

    def __init__(
        self,
        nodes: NodeMap,
        connect: Callable[[str], Connection],
        on_message: Callable[[bytes, bytes], None],
        on_resubscribed: Callable[[], None],
        *,
        ping_interval_s: float,
    ) -> None:
        self._nodes = nodes
        self._connect = connect
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._ping_interval_s = ping_interval_s
        self._live: dict[str, LiveChannels] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._moving: set[asyncio.Task[None]] = set()
        self._relocating: set[str] = set()  # nodes whose channels are being moved
        self._followed: set[bytes] = set()
        self._closing = False
        self._wake = asyncio.Event()

    @property
    def reconnects(self) -> int:
        return sum(live.reconnects for live in self._live.values())

    def follow(self, channel: bytes) -> None:
        """Subscribe to ``channel`` once :meth:`run` runs, without waiting for it."""
        self._followed.add(channel)
        try:
            node = self._nodes.node_of(channel)
        except Moved:
            # The map does not know the slot yet (a cluster client before its first command)
            # or no node serves it right now: place it in the background, retrying.
            self._spawn(self._place(channel))
            return
        self._on_node(node).follow(channel)

    async def _place(self, channel: bytes) -> None:
        for failures in itertools.count():
            if self._closing or channel not in self._followed:
                return
            try:
                await self.subscribe(channel)
                return
            except (RedisError, OSError) as exc:
                _log.warning("following %r failed, retrying: %s", channel, exc)
            await asyncio.sleep(retry_delay_s(failures))

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe to ``channel``; return once its node confirmed it."""
        self._followed.add(channel)
        for failures in range(20):
            try:
                await self._on_node(self._nodes.node_of(channel)).subscribe(channel)
                return
            except Moved:
                await asyncio.sleep(retry_delay_s(failures))
                await self._nodes.refresh(channel)
        raise Moved(f"no node took {channel!r}")

    async def unsubscribe(self, channel: bytes) -> None:
        self._followed.discard(channel)
        for live in list(self._live.values()):
            if channel in live.channels:
                await live.unsubscribe(channel)

    def _on_node(self, node: str) -> LiveChannels:
        live = self._live.get(node)
        if live is None:
            live = self._live[node] = LiveChannels(
                lambda: self._connect(node),
                self._on_message,
                self._on_resubscribed,
                ping_interval_s=self._ping_interval_s,
                on_moved=self._moved,
                on_failure=lambda: self._failed(node),
            )
            self._wake.set()
        return live

    def _moved(self, channel: bytes) -> None:
        if channel in self._followed and not self._closing:
            self._spawn(self._relocate([channel]))

    def _failed(self, node: str) -> None:
        # The node may be gone for good (failed over): ask where its channels are now.
        live = self._live.get(node)
        if live is None or not live.channels or self._closing or node in self._relocating:
            return
        self._relocating.add(node)
        self._spawn(self._relocate(live.channels, node))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._moving.add(task)
        task.add_done_callback(self._moving.discard)

    async def _refresh(self, channel: bytes) -> bool:
        """Bring the map up to date, retrying through a slot migration or a failover; False
        when closing meanwhile."""
        for failures in itertools.count():
            if self._closing:
                return False
            try:
                await self._nodes.refresh(channel)
                return True
            except (RedisError, OSError) as exc:
                _log.warning("refreshing the cluster's slots failed (%s); retrying", exc)
                await asyncio.sleep(retry_delay_s(failures))
        raise AssertionError("unreachable")

    async def _relocate(self, channels: list[bytes], node: str | None = None) -> None:
        """Subscribe ``channels`` where the (refreshed) map says, if that is not ``node``."""
        try:
            if not await self._refresh(channels[0]):
                return
            moved = False
            for channel in channels:
                try:
                    target = self._nodes.node_of(channel)
                except RedisError:
                    continue  # the slot is not served right now: the next failure retries
                if target == node or channel not in self._followed:
                    continue
                if node is not None and node in self._live:
                    self._live[node].drop(channel)
                moved = True
                try:
                    await self.subscribe(channel)
                except (RedisError, OSError) as exc:
                    _log.warning("following %r on %s failed: %s", channel, target, exc)
                    continue
                _log.info("channel %r now followed on %s", channel, target)
            if node is not None and not self._live[node].channels:
                await self._retire(node)
            if moved or node is None:
                self._on_resubscribed()
        finally:
            if node is not None:
                self._relocating.discard(node)

    async def _retire(self, node: str) -> None:
        """Stop the connection to a node that no longer serves any channel followed here."""
        live = self._live.pop(node)
        await live.aclose()
        task = self._tasks.pop(node, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        """Run every node's connection until :meth:`aclose`."""
        try:
            while not self._closing:
                for node, live in self._live.items():
                    if node not in self._tasks:
                        self._tasks[node] = asyncio.create_task(live.run())
                self._wake.clear()
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    running = [task for task in self._tasks.values() if not task.done()]
                    await asyncio.wait([woken, *running], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                for node, task in list(self._tasks.items()):
                    if task.done() and not self._closing and self._live.get(node) is not None:
                        # A node's connection only ends on close: anything else is a bug,
                        # raised here rather than left to be found at shutdown.
                        task.result()
                        raise RuntimeError(f"the live connection to {node} ended")
        finally:
            await self._stop()

    async def _stop(self) -> None:
        for live in self._live.values():
            await live.aclose()
        tasks = [*self._tasks.values(), *self._moving]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop for good: :meth:`run` returns soon after (await its task)."""
        self._closing = True
        self._wake.set()
        for live in self._live.values():
            await live.aclose()
