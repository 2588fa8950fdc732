"""The connector's clients: how their connections introduce themselves to Redis."""

from __future__ import annotations

import redis

from shared.redis_client import RedisConnector
from shared.settings import Settings


async def test_connections_share_one_driver_info(
    settings: Settings,
) -> None:
    connector = RedisConnector(settings)
    try:
        client = connector.client()
        pool = client.connection_pool
        first, second = pool.make_connection(), pool.make_connection()  # type: ignore[no-untyped-call]
        dedicated = connector.dedicated_connection("tokenrelay-test")
        # One object for every connection: the package metadata is read once, not per connect.
        assert first.driver_info is second.driver_info is dedicated.driver_info
        assert first.driver_info is not None
        assert (first.driver_info.formatted_name, first.driver_info.lib_version) == (
            "redis-py",
            redis.__version__,
        )  # what CLIENT SETINFO reports (Redis 7.2 and later)
        await dedicated.connect()  # type: ignore[no-untyped-call]
        await dedicated.send_command("CLIENT", "INFO")
        assert b"name=tokenrelay-test" in await dedicated.read_response()
        await dedicated.disconnect()
    finally:
        await connector.aclose()
