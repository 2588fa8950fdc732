"""What ``REDIS_URL`` names: one Redis, a Redis Cluster (seed nodes), or a primary that
Sentinel manages.

::

    redis://[user:password@]host:port/db             one Redis (rediss:// with TLS)
    redis+cluster://[user:password@]h1:p1,h2:p2/     a cluster, from any of its nodes
    redis+sentinel://[user:password@]h1:p1,h2:p2/NAME/db
                                                     the primary NAME of these sentinels

The cluster and sentinel forms take TLS as ``rediss+cluster://`` and ``rediss+sentinel://``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote, urlsplit

from shared.errors import ConfigError

_DEFAULT_PORTS = {"standalone": 6379, "cluster": 6379, "sentinel": 26379}


class Topology(StrEnum):
    STANDALONE = "standalone"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``REDIS_URL``."""

    topology: Topology
    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    #: The primary's name, for Sentinel.
    service: str | None = None
    #: The URL as given (for redis-py's own parser, standalone only).
    url: str = ""

    @property
    def description(self) -> str:
        """Where the data lives, for logs (no credentials)."""
        nodes = ",".join(f"{host}:{port}" for host, port in self.nodes)
        if self.topology is Topology.CLUSTER:
            return f"Redis Cluster via {nodes}"
        if self.topology is Topology.SENTINEL:
            return f"the primary {self.service!r} of the sentinels {nodes} (db {self.db})"
        return f"Redis at {nodes} (db {self.db})"


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``url``; raise :class:`ConfigError` saying what is wrong with it."""
    parts = urlsplit(url)
    scheme, _, flavour = parts.scheme.partition("+")
    if scheme not in ("redis", "rediss") or flavour not in ("", "cluster", "sentinel"):
        raise ConfigError(
            f"REDIS_URL={_shown(url)!r}: the scheme must be redis://, rediss://, "
            "redis+cluster://, redis+sentinel:// (or their rediss+ forms)"
        )
    topology = Topology(flavour or "standalone")
    location = parts.netloc.rpartition("@")[2]
    if not location:
        raise ConfigError(f"REDIS_URL={_shown(url)!r} names no host")
    nodes = tuple(_node(item, topology, url) for item in location.split(","))
    if topology is Topology.STANDALONE and len(nodes) > 1:
        raise ConfigError(
            f"REDIS_URL={_shown(url)!r} names several hosts: use redis+cluster:// for a cluster "
            "or redis+sentinel:// for Sentinel"
        )
    path = [piece for piece in parts.path.split("/") if piece]
    service = None
    if topology is Topology.SENTINEL:
        if not path:
            raise ConfigError(
                f"REDIS_URL={_shown(url)!r}: name the primary, as in "
                "redis+sentinel://host:26379,host:26380/mymaster/0"
            )
        service, path = path[0], path[1:]
    db = _db(path, topology, url)
    return RedisTarget(
        topology=topology,
        nodes=nodes,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=scheme == "rediss",
        service=service,
        url=url,
    )


def _node(item: str, topology: Topology, url: str) -> tuple[str, int]:
    host, colon, port = item.rpartition(":") if "]" not in item.rpartition(":")[2] else ("", "", "")
    if not colon:
        host, port = item, str(_DEFAULT_PORTS[topology])
    host = host.strip("[]")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"REDIS_URL={_shown(url)!r}: {item!r} is not host:port")
    return host, int(port)


def _db(path: list[str], topology: Topology, url: str) -> int:
    if not path:
        return 0
    if len(path) > 1 or not (path[0].isascii() and path[0].isdigit()):
        raise ConfigError(f"REDIS_URL={_shown(url)!r}: the path must be a database number")
    if topology is Topology.CLUSTER and path[0] != "0":
        raise ConfigError(f"REDIS_URL={_shown(url)!r}: a cluster has database 0 only")
    return int(path[0])


def _shown(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
