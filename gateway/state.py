"""What the gateway's lifespan creates and its handlers use."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from starlette.requests import Request

from gateway.hub import Hub
from shared.settings import Settings


@dataclass(frozen=True, slots=True)
class GatewayState:
    """The settings and clients of one gateway process."""

    settings: Settings
    redis: Redis
    hub: Hub

    @staticmethod
    def of(request: Request) -> GatewayState:
        state: GatewayState = request.app.state.gateway
        return state
