"""What the gateway's lifespan creates and its endpoints use."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from gateway.access import Access
from gateway.admission import Admission
from gateway.hub import Hub
from gateway.idempotency import Idempotency
from gateway.metrics import GatewayMetrics
from shared.redis_client import RedisClient
from shared.settings import Settings

#: The key of the :class:`GatewayState` in the lifespan state (``scope["state"]``), where the
#: server adapter finds it.
STATE = "tokenrelay.gateway"


@dataclass(frozen=True, slots=True)
class GatewayState:
    """The settings and clients of one gateway process."""

    settings: Settings
    redis: RedisClient
    hub: Hub
    admission: Admission
    metrics: GatewayMetrics
    access: Access
    idempotency: Idempotency

    @staticmethod
    def of(request: Request) -> GatewayState:
        state: GatewayState = request.app.state.gateway
        return state
