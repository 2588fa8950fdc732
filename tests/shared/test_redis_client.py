"""The connector's clients: how their connections introduce themselves to Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis
import uvloop
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.redis_client import RedisConnector
from shared.settings import Settings


async def test_connections_share_one_driver_info(
    settings: Settings,
) -> None:
    connector = RedisConnector(settings)
    try:
        client = connector.client()
        if not isinstance(client, Redis):
            raise TypeError(client)
        pool = client.connection_pool
        first, second = pool.make_connection(), pool.make_connection()  # type: ignore[no-untyped-call]
        dedicated = connector.channel_connection("redis", "tokenrelay-test")
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


def test_a_write_on_a_closed_transport_is_a_connection_error_under_uvloop(
    settings: Settings,
) -> None:
    """uvloop raises RuntimeError where asyncio raises OSError (which redis-py turns into a
    ConnectionError): the gateway answered 500 for it when Redis restarted under a POST."""

    async def write_after_close() -> None:
        connector = RedisConnector(settings)
        try:
            connection = connector.channel_connection("redis", "tokenrelay-test")
            await connection.connect()  # type: ignore[no-untyped-call]
            connection._writer.transport.close()  # type: ignore[union-attr]  # Redis went away
            await asyncio.sleep(0)  # the close takes effect
            with pytest.raises(RedisConnectionError, match="closed under a write"):
                await connection.send_command("PING")
            await connection.disconnect()
        finally:
            await connector.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(write_after_close())
