"""The resuming client and ``tokenrelay chat``, against a real gateway, worker and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import AsyncIterator

import httpx
import pytest

from shared.settings import Settings
from tests.support import CuttingProxy, Stack, start_stack
from tokenrelay.client import Chunk, Reset, StreamFailed, TokenrelayClient
from worker.backends.mock import mock_text


async def _text(stream: object) -> str:
    parts: list[str] = []
    async for piece in stream:  # type: ignore[attr-defined]
        if isinstance(piece, Reset):
            parts.clear()
        else:
            parts.append(piece.text)
    return "".join(parts)


async def test_reads_a_whole_answer(stack: Stack) -> None:
    async with TokenrelayClient(stack.url) as client:
        stream = await client.ask("whole", max_tokens=30)
        assert await _text(stream) == mock_text("whole", 30)
    assert stream.reconnects == 0


@pytest.mark.usefixtures("redis")
async def test_resumes_through_cut_connections_without_gap_or_duplicate(settings: Settings) -> None:
    # A short retry hint: the client honours it as its shortest delay.
    paced = dataclasses.replace(settings, mock_token_delay_ms=30.0, retry_ms=50)
    async with (
        start_stack(paced) as stack,
        CuttingProxy(_port(stack)) as proxy,
        TokenrelayClient(f"http://127.0.0.1:{proxy.port}", initial_backoff_s=0.05) as client,
    ):
        stream = await client.ask("cut me", max_tokens=80)
        parts: list[str] = []
        async for piece in stream:
            assert isinstance(piece, Chunk)
            parts.append(piece.text)
            if len(parts) in (10, 30, 50):
                proxy.cut()
    assert "".join(parts) == mock_text("cut me", 80)
    # Each cut that finds the answer not yet fully received costs one resume (a resume may
    # also fetch the rest at once, so that a later cut finds nothing to break).
    assert 1 <= stream.reconnects <= 3
    assert proxy.connections == 2 + stream.reconnects  # the POST, the first GET, the resumes


@pytest.mark.usefixtures("redis")
async def test_silence_longer_than_the_allowance_counts_as_a_dead_connection(
    settings: Settings,
) -> None:
    # Heartbeats are far apart and the model pauses 0.8 s between tokens: a client allowing
    # 0.3 s of silence gives up on each quiet connection and resumes on a new one.
    pausing = dataclasses.replace(
        settings, mock_token_delay_ms=800.0, heartbeat_s=30.0, retry_ms=20
    )
    async with (
        start_stack(pausing) as stack,
        TokenrelayClient(
            stack.url, silence_allowance_s=0.3, initial_backoff_s=0.05, max_backoff_s=0.1
        ) as client,
    ):
        stream = await client.ask("quiet", max_tokens=3)
        assert await _text(stream) == mock_text("quiet", 3)
    assert stream.reconnects >= 2


async def test_following_a_finished_answer_from_its_end_yields_nothing(stack: Stack) -> None:
    async with TokenrelayClient(stack.url) as client:
        stream = await client.ask("done already", max_tokens=5)
        assert await _text(stream) == mock_text("done already", 5)
        again = client.follow(stream.message_id, last_event_id=stream.last_event_id)
        assert await _text(again) == ""


async def test_a_failed_generation_raises(stack: Stack) -> None:
    async with TokenrelayClient(stack.url) as client:
        stream = await client.ask("x [[fail_after=2]]", max_tokens=9)
        with pytest.raises(StreamFailed, match="failed after 2 tokens") as failed:
            await _text(stream)
    assert failed.value.error_type == "model_error"


async def test_chat_command_streams_to_the_terminal(stack: Stack) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenrelay",
        "chat",
        "from the terminal",
        "--max-tokens",
        "12",
        "--url",
        stack.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err
    assert out.decode() == mock_text("from the terminal", 12) + "\n"


@contextlib.asynccontextmanager
async def _behind_a_proxy(
    settings: Settings, *, hold_s: float = 0.0
) -> AsyncIterator[CuttingProxy]:
    """A gateway and worker sending heartbeats every 0.5 s (so a client with a margin of 1 s
    allows 1.5 s of silence in a stream), reached through a proxy."""
    quick = dataclasses.replace(settings, heartbeat_s=0.5, mock_token_delay_ms=20.0)
    async with start_stack(quick) as stack, CuttingProxy(_port(stack), hold_s=hold_s) as proxy:
        yield proxy


def _port(stack: Stack) -> int:
    return int(stack.url.rsplit(":", 1)[1])


@pytest.mark.usefixtures("redis")
async def test_a_connection_gone_silent_is_left_after_the_servers_heartbeat_and_a_margin(
    settings: Settings,
) -> None:
    async with (
        _behind_a_proxy(settings) as proxy,
        TokenrelayClient(
            f"http://127.0.0.1:{proxy.port}", heartbeat_margin_s=1.0, initial_backoff_s=0.05
        ) as client,
    ):
        stream = await client.ask("go quiet", max_tokens=150)
        text = ""
        async with asyncio.timeout(30):  # well short of the 45 s allowed before a heartbeat
            async for piece in stream:
                text = "" if isinstance(piece, Reset) else text + piece.text
                if len(text) > 50 and proxy.connections < 3:
                    proxy.freeze()  # the answer's connection hangs; the client must notice
    assert text == mock_text("go quiet", 150)
    assert stream.reconnects == 1
    assert "no byte for 1.5 s" in client.reconnect_log[0]


@pytest.mark.usefixtures("redis")
async def test_a_slow_response_head_is_waited_for_past_the_heartbeat_allowance(
    settings: Settings,
) -> None:
    # A busy gateway may take longer than the heartbeat allowance to answer a request at all:
    # the head is waited for as long as silence_allowance_s, so a loaded server is not
    # answered with reconnects that load it further.
    async with (
        _behind_a_proxy(settings, hold_s=3.0) as proxy,
        TokenrelayClient(
            f"http://127.0.0.1:{proxy.port}", silence_allowance_s=10, heartbeat_margin_s=1.0
        ) as client,
    ):
        stream = await client.ask("slow head", max_tokens=20)
        assert await _text(stream) == mock_text("slow head", 20)
    assert stream.reconnects == 0


async def test_the_allowance_follows_the_heartbeat_each_stream_announces() -> None:
    async with TokenrelayClient("http://127.0.0.1:1") as client:
        of = client.silence_after
        assert of(httpx.Response(200, headers={"X-Heartbeat-Ms": "15000"})) == 25.0
        assert of(httpx.Response(200, headers={"X-Heartbeat-Ms": "2000"})) == 12.0
        assert of(httpx.Response(200, headers={"X-Heartbeat-Ms": "60000"})) == 45.0  # at most
        assert of(httpx.Response(200)) == 45.0  # a server that does not say
        assert of(httpx.Response(200, headers={"X-Heartbeat-Ms": "soon"})) == 45.0
