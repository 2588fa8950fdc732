"""The chaos harness's own checks: it calls a gap, a duplicate, an undocumented ending and a
hung client failures, and a flaky network cuts connections."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal

from bench import chaos
from bench.chaos import Tally, _CuttingProxy, classify
from tokenrelay.client import StreamCancelled, StreamFailed

EXPECTED = "one two three four"


def test_the_whole_text_is_complete_even_after_resets() -> None:
    assert classify(EXPECTED, EXPECTED, None, 0) == ("complete", "")
    assert classify(EXPECTED, EXPECTED, None, 2)[0] == "complete"


def test_a_gap_or_a_duplicate_is_a_failure() -> None:
    assert classify(EXPECTED, "one three four", None, 0)[0] == "wrong_text"
    assert classify(EXPECTED, "one two two three four", None, 0)[0] == "wrong_text"


def test_documented_endings_pass_and_others_fail() -> None:
    lost = StreamFailed("the message no longer exists", "message_lost")
    assert classify(EXPECTED, "one", lost, 0) == ("documented", "message_lost")
    gone = StreamFailed("404: message does not exist or has expired", "http_error")
    assert classify(EXPECTED, "", gone, 0) == ("documented", "message_lost")
    assert classify(EXPECTED, "", StreamFailed("boom", "internal_error"), 0)[0] == "undocumented"
    assert classify(EXPECTED, "", StreamFailed("500: oops", "http_error"), 0)[0] == "undocumented"
    assert classify(EXPECTED, "", StreamCancelled("cancelled"), 0)[0] == "undocumented"
    assert classify(EXPECTED, "one", TimeoutError(), 0)[0] == "hung"


async def test_the_proxy_cuts_connections_after_some_bytes() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"x" * 100_000)
            await writer.drain()
            await reader.read()
        except ConnectionError:
            pass  # cut: what this test is about
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    tally = Tally()
    async with _CuttingProxy(target, random.Random(7), tally) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        received = b""
        with contextlib.suppress(ConnectionError):
            while piece := await reader.read(65536):
                received += piece
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    server.close()
    await server.wait_closed()
    assert 2_000 <= len(received) <= 40_000
    assert tally.cuts == 1


async def test_a_fault_skips_a_process_that_is_already_gone() -> None:
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    alive = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        chaos._signal({"gone": gone, "alive": alive}, signal.SIGKILL, random.Random(1))
        assert await asyncio.wait_for(alive.wait(), 10) == -signal.SIGKILL
        chaos._signal({"gone": gone}, signal.SIGKILL, random.Random(1))  # nothing to signal
    finally:
        if alive.returncode is None:
            alive.kill()
            await alive.wait()
