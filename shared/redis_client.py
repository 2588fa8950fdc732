"""Creates Redis clients and dedicated connections for what ``REDIS_URL`` names: one Redis, a
Redis Cluster or a Sentinel-managed primary, or the embedded fakeredis.

Sizes and timeouts are explicit because redis-py 8's defaults bite this workload: a 5 s socket
timeout fails longer blocking reads, and the async pool raises instead of waiting once 100
connections are out. Replies are pinned to RESP2 so their shapes do not change with the server.
redis-py's own clients do the routing: its cluster client follows MOVED and ASK and refreshes
its view of the slots, its Sentinel pool asks the sentinels for the primary on every connect.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import fakeredis
from redis.asyncio import BlockingConnectionPool, Connection, ConnectionPool, Redis, SSLConnection
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.cluster import LoadBalancingStrategy
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, SlotNotCoveredError

from shared.backoff import POLICY, retry_delay_s
from shared.live import Moved, NodeMap
from shared.redis_url import Topology, parse_redis_url
from shared.settings import Settings

_log = logging.getLogger(__name__)

#: A client of one Redis (or of a Sentinel-managed primary) or of a Redis Cluster.
RedisClient = Redis | RedisCluster

# A reconnect storm queues for connections instead of failing, but not forever.
_POOL_WAIT_S = 10.0
_CLUSTER_CAP_FACTOR = 10


def is_closed_transport(exc: BaseException) -> bool:
    """Whether ``exc`` is uvloop refusing a write to a transport that has closed (a RuntimeError
    where asyncio's own loop raises an OSError, which redis-py turns into a ConnectionError)."""
    return isinstance(exc, RuntimeError) and "handler is closed" in str(exc)


class _ClosedTransportIsConnectionError:
    """Mixed into redis-py's connections: a write on a closed transport is a lost connection
    under uvloop too, so that callers (and redis-py's retries) see a ConnectionError."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except RuntimeError as exc:
            if not is_closed_transport(exc):
                raise
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise RedisConnectionError(f"connection closed under a write ({exc})") from exc


class _Connection(_ClosedTransportIsConnectionError, Connection):
    pass


class _SSLConnection(_ClosedTransportIsConnectionError, SSLConnection):
    pass


class _SentinelConnection(_ClosedTransportIsConnectionError, SentinelManagedConnection):
    pass


class _SentinelSSLConnection(_ClosedTransportIsConnectionError, SentinelManagedSSLConnection):
    pass


async def _connect_read_only(connection: Connection) -> None:
    # A cluster replica serves a shard channel's subscribers (instead of redirecting them to
    # the slot's primary) only on a connection in READONLY mode.
    await connection.on_connect()
    await connection.send_command("READONLY")
    reply = await connection.read_response()
    if reply not in (b"OK", "OK"):
        raise RedisConnectionError(f"READONLY was refused: {reply!r}")


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (the primary is looked up on every connect), waiting for a free
    connection past its size instead of failing."""


class ClusterNodes(NodeMap):
    """Which node of a Redis Cluster serves a channel, as redis-py's cluster client knows: the
    slot's primary, or with ``replica`` one of its replicas."""

    def __init__(self, cluster: RedisCluster, *, replica: bool = False) -> None:
        self._cluster = cluster
        self._replica = replica

    def node_of(self, channel: bytes) -> str:
        try:
            node = self._cluster.get_node_from_key(channel.decode(), replica=self._replica)
        except SlotNotCoveredError as exc:
            raise Moved(f"no node serves the slot of {channel!r} now") from exc
        if node is None:
            raise Moved(f"no node serves the slot of {channel!r} now")
        name: str = node.name
        return name

    async def refresh(self, channel: bytes) -> None:
        if self._replica:
            # The slot's replicas are known only from the cluster's topology, read again here
            # (a replica just added or promoted; none known yet).
            await self._cluster.nodes_manager.initialize()
            return
        # A command on the channel's slot: the client follows MOVED (or, when the node is
        # gone, re-reads the cluster's topology) and knows the slot's owner afterwards.
        await self._cluster.exists(channel)


class RedisConnector:
    """Builds the clients of one process. Create it in a lifespan; :meth:`aclose` it there."""

    def __init__(self, settings: Settings, *, embedded: fakeredis.FakeServer | None = None) -> None:
        self._embedded = embedded
        self._target = parse_redis_url(settings.effective_redis_url)
        self._pools: list[ConnectionPool] = []
        self._clients: list[RedisClient] = []
        self._sentinel: Sentinel | None = None
        self._sentinel_pools: dict[tuple[str, bool], SentinelConnectionPool] = {}
        self._options: dict[str, Any] = {
            "protocol": 2,
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": min(settings.redis_timeout_s, 5.0),
            "retry": Retry(POLICY, 3),
            # Built once: without it, redis-py 8 looks its own version up in the installed
            # package metadata for every new connection (about 1 ms here), which a storm that
            # grows the pool pays again and again.
            "driver_info": DriverInfo(),
        }
        credentials = {"username": self._target.username, "password": self._target.password}
        self._credentials: dict[str, Any] = {k: v for k, v in credentials.items() if v}
        self._max_connections = settings.redis_max_connections

    @property
    def embedded(self) -> bool:
        """True when this process runs on an in-memory fakeredis instead of a Redis server."""
        return self._embedded is not None

    @property
    def topology(self) -> Topology:
        return Topology.STANDALONE if self.embedded else self._target.topology

    @property
    def description(self) -> str:
        """Where the data lives, for start-up logs."""
        if self._embedded is not None:
            return "embedded fakeredis (in memory, this process only)"
        return self._target.description

    def client(self, *, replicas: bool = False) -> RedisClient:
        """A pooled client for ordinary commands (bytes replies). With ``replicas`` (a cluster
        or Sentinel only), one whose reads go to replicas: for a cluster, its writes still go to
        the primaries; for Sentinel, it is a client of a replica, read-only."""
        client: RedisClient
        if self._embedded is not None:
            client = fakeredis.FakeAsyncRedis(server=self._embedded, protocol=2)
        elif self._target.topology is Topology.CLUSTER:
            balancing = LoadBalancingStrategy.ROUND_ROBIN_REPLICAS if replicas else None
            client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self._target.nodes],
                load_balancing_strategy=balancing,
                # Per node. redis-py's cluster client fails a command past its cap instead of
                # queueing it (MaxConnectionsError, answered as Redis unavailable), so the
                # cap is a safety limit, well above what a process uses in a storm.
                max_connections=self._max_connections * _CLUSTER_CAP_FACTOR,
                ssl=self._target.tls,
                **self._credentials,
                **self._options,
            )
        elif self._target.topology is Topology.SENTINEL:
            manager = self._sentinel_manager()
            client = (manager.slave_for if replicas else manager.master_for)(
                self._target.service or "",
                connection_pool_class=_BlockingSentinelPool,
                connection_class=self._sentinel_connection_class,
                max_connections=self._max_connections,
                timeout=_POOL_WAIT_S,
                db=self._target.db,
                **self._credentials,
                **self._options,
            )
        else:
            pool = BlockingConnectionPool.from_url(
                self._target.url,
                max_connections=self._max_connections,
                timeout=_POOL_WAIT_S,
                **self._options,
            )
            # Set here: from_url lets the URL's scheme choose the class, over any argument.
            pool.connection_class = _SSLConnection if self._target.tls else _Connection
            self._pools.append(pool)
            client = Redis(connection_pool=pool)
        self._clients.append(client)
        return client

    async def ready(self) -> None:
        """Wait until every cluster client made so far knows the cluster's slots (retrying,
        with a warning, while no seed node answers). A cluster client otherwise learns them
        on its first commands, and several first commands at once race in redis-py."""
        for client in self._clients:
            if not isinstance(client, RedisCluster):
                continue
            for failures in itertools.count():
                try:
                    await client.initialize()
                    break
                except (RedisError, OSError) as exc:
                    delay = retry_delay_s(failures)
                    _log.warning("Redis Cluster not reachable (%s); retrying in %.1f s", exc, delay)
                    await asyncio.sleep(delay)

    async def follow_topology(self, client: RedisClient, every_s: float) -> None:
        """Re-read a cluster's topology every ``every_s`` until cancelled (nothing to do for
        one Redis). For a client that reads from replicas: redis-py learns of a replica
        added later (the old primary back after a failover, say) only when a command fails,
        and until then sends the reads of its slots to the primary."""
        if not isinstance(client, RedisCluster):
            return
        while True:
            await asyncio.sleep(every_s)
            try:
                await client.nodes_manager.initialize()
            except (RedisError, OSError) as exc:
                _log.warning("re-reading the cluster's topology failed: %s", exc)

    def nodes(self, client: RedisClient, *, replicas: bool = False) -> NodeMap:
        """Which node serves a shard channel (``client``: one of :meth:`client`'s): the slot's
        primary, or with ``replicas`` one of its replicas."""
        if isinstance(client, RedisCluster):
            return ClusterNodes(client, replica=replicas)
        return NodeMap()

    def channel_connection(self, node: str, name: str, *, replica: bool = False) -> Connection:
        """A connection outside every pool to ``node`` (as :meth:`nodes` names it), for a
        subscriber that owns it for its whole life; ``name`` is its CLIENT SETNAME, so operators
        can tell it apart in CLIENT LIST. For Sentinel, each connect finds the primary (or with
        ``replica`` a replica) anew."""
        if self._embedded is not None:
            pool = fakeredis.FakeAsyncRedis(server=self._embedded, protocol=2).connection_pool
        elif self._target.topology is Topology.CLUSTER:
            host, _, port = node.rpartition(":")
            pool = ConnectionPool(
                host=host,
                port=int(port),
                connection_class=_SSLConnection if self._target.tls else _Connection,
                client_name=name,
                redis_connect_func=_connect_read_only if replica else None,
                **self._credentials,
                **self._options,
            )
        elif self._target.topology is Topology.SENTINEL:
            # Kept: a Sentinel-managed connection asks its pool (held weakly) where the primary
            # or a replica is on every connect.
            pool = self._sentinel_pool(name, replica=replica)
        else:
            pool = ConnectionPool.from_url(self._target.url, client_name=name, **self._options)
            pool.connection_class = _SSLConnection if self._target.tls else _Connection
        connection: Connection = pool.make_connection()  # type: ignore[no-untyped-call]
        return connection

    def _sentinel_pool(self, name: str, *, replica: bool) -> SentinelConnectionPool:
        pool = self._sentinel_pools.get((name, replica))
        if pool is None:
            pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
                self._target.service or "",
                self._sentinel_manager(),
                connection_class=self._sentinel_connection_class,
                is_master=not replica,
                client_name=name,
                db=self._target.db,
                **self._credentials,
                **self._options,
            )
            self._sentinel_pools[(name, replica)] = pool
        return pool

    @property
    def _sentinel_connection_class(self) -> type[Connection]:
        return _SentinelSSLConnection if self._target.tls else _SentinelConnection

    def _sentinel_manager(self) -> Sentinel:
        if self._sentinel is None:
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(self._target.nodes),
                sentinel_kwargs={"socket_timeout": self._options["socket_connect_timeout"]},
                ssl=self._target.tls,
                **self._options,
            )
        return self._sentinel

    async def aclose(self) -> None:
        """Close every client and pool this connector made."""
        for client in self._clients:
            await client.aclose()
        for pool in self._pools:
            await pool.aclose()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()
        for sentinel_pool in self._sentinel_pools.values():
            await sentinel_pool.aclose()
        self._clients.clear()
        self._pools.clear()
        self._sentinel_pools.clear()
