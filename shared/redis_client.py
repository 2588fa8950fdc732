"""Creates Redis clients and dedicated connections, real or embedded (fakeredis).

Sizes and timeouts are explicit because redis-py 8's defaults bite this workload: a 5 s socket
timeout fails longer blocking reads, and the async pool raises instead of waiting once 100
connections are out. Replies are pinned to RESP2 so their shapes do not change with the server.
"""

from __future__ import annotations

from typing import Any

import fakeredis
from redis.asyncio import BlockingConnectionPool, Connection, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.driver_info import DriverInfo

from shared.settings import Settings

# A reconnect storm queues for connections instead of failing, but not forever.
_POOL_WAIT_S = 10.0


class RedisConnector:
    """Builds the clients of one process. Create it in a lifespan; :meth:`aclose` it there."""

    def __init__(self, settings: Settings, *, embedded: fakeredis.FakeServer | None = None) -> None:
        self._embedded = embedded
        self._pools: list[ConnectionPool] = []
        self._clients: list[Redis] = []
        self._options: dict[str, Any] = {
            "protocol": 2,
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": min(settings.redis_timeout_s, 5.0),
            "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
            # Built once: without it, redis-py 8 looks its own version up in the installed
            # package metadata for every new connection (about 1 ms here), which a storm that
            # grows the pool pays again and again.
            "driver_info": DriverInfo(),
        }
        self._url = settings.effective_redis_url
        self._max_connections = settings.redis_max_connections

    @property
    def embedded(self) -> bool:
        """True when this process runs on an in-memory fakeredis instead of a Redis server."""
        return self._embedded is not None

    @property
    def description(self) -> str:
        """Where the data lives, for start-up logs."""
        return "embedded fakeredis (in memory, this process only)" if self.embedded else self._url

    def client(self) -> Redis:
        """A pooled client for ordinary commands (bytes replies)."""
        if self._embedded is not None:
            client: Redis = fakeredis.FakeAsyncRedis(server=self._embedded, protocol=2)
        else:
            pool = BlockingConnectionPool.from_url(
                self._url,
                max_connections=self._max_connections,
                timeout=_POOL_WAIT_S,
                **self._options,
            )
            self._pools.append(pool)
            client = Redis(connection_pool=pool)
        self._clients.append(client)
        return client

    def dedicated_connection(self, name: str) -> Connection:
        """A connection outside every pool, for a subscriber that owns it for its whole life;
        ``name`` is its CLIENT SETNAME, so operators can tell it apart in CLIENT LIST."""
        if self._embedded is not None:
            pool = fakeredis.FakeAsyncRedis(server=self._embedded, protocol=2).connection_pool
        else:
            pool = ConnectionPool.from_url(self._url, client_name=name, **self._options)
        connection: Connection = pool.make_connection()  # type: ignore[no-untyped-call]
        return connection

    async def aclose(self) -> None:
        """Close every client and pool this connector made."""
        for client in self._clients:
            await client.aclose()
        for pool in self._pools:
            await pool.aclose()
        self._clients.clear()
        self._pools.clear()
