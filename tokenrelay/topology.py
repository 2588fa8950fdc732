"""The deployment topology, described once: what ``tokenrelay stack`` runs as local processes and
what ``docker-compose.yml`` runs as containers (a test holds the two to this description).

::

    clients ──▶ haproxy :8080 ──▶ gateway-1, gateway-2 (stateless) ──▶ Redis ◀── worker-1, worker-2
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LB_PORT = 8080
GATEWAY_PORT = 8000  # each gateway's own port in a container; locally 8001, 8002, ...
REDIS_PORT = 6379  # in containers; the local stack starts its own on LOCAL_REDIS_PORT
LOCAL_REDIS_PORT = 6390


@dataclass(frozen=True, slots=True)
class Topology:
    """How many of each, and where."""

    gateways: int = 2
    workers: int = 2
    lb_port: int = LB_PORT
    redis_port: int = LOCAL_REDIS_PORT
    gateway_base_port: int = GATEWAY_PORT
    #: A Redis Cluster of 3 primaries and 3 replicas (on free ports) instead of one Redis.
    redis_cluster: bool = False

    def gateway_names(self) -> list[str]:
        return [f"gateway-{i}" for i in range(1, self.gateways + 1)]

    def worker_names(self) -> list[str]:
        return [f"worker-{i}" for i in range(1, self.workers + 1)]

    def gateway_ports(self) -> list[int]:
        """Local ports: one per gateway after the base port."""
        return [self.gateway_base_port + i for i in range(1, self.gateways + 1)]


def haproxy_config(
    listen_port: int, backends: Sequence[tuple[str, str, int]], *, bind: str = "*"
) -> str:
    """The load balancer's configuration for SSE: no buffering, idle timeouts well above the
    gateways' heartbeat (TOKENRELAY_HEARTBEAT_S, 15 s), health checks on /healthz, and a failed
    connection attempt redispatched to another gateway.

    The check is /healthz (the process answers), not /readyz (Redis answers): during a Redis
    outage every gateway would be marked down and haproxy would answer 503 itself, which ends a
    browser EventSource for good, while a gateway answers 200 with a retry hint."""
    servers = "\n".join(f"    server {name} {host}:{port} check" for name, host, port in backends)
    # No global maxconn: haproxy derives it from the file-descriptor limit it is given.
    return f"""global
    log stderr format short local0 warning

defaults
    mode http
    option redispatch
    retries 2
    timeout connect 2s
    # Streams are idle between heartbeats (15 s by default); closing them sooner would cut them.
    timeout client 65s
    timeout server 65s
    timeout http-request 10s

frontend tokenrelay
    bind {bind}:{listen_port}
    default_backend gateways

backend gateways
    balance leastconn
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
{servers}
"""
