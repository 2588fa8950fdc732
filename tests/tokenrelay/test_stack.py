"""Failures on the real topology: haproxy in front of gateway and worker processes, one Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import random
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tests.support import PARTITIONS, CuttingProxy, eventually
from tokenrelay.client import (
    Chunk,
    MessageStream,
    Reset,
    StreamCancelled,
    StreamFailed,
    TokenrelayClient,
)
from tokenrelay.local_redis import answers, ask, free_port, free_port_block
from tokenrelay.stack import LocalStack, local_stack
from tokenrelay.topology import Topology
from worker.backends.mock import mock_text

_ENV = {
    "TOKENRELAY_MOCK_TOKEN_DELAY_MS": "20",
    "TOKENRELAY_COALESCE_MS": "0",
    "TOKENRELAY_RETRY_MS": "100",
    "TOKENRELAY_JOB_LEASE_S": "1",
    "TOKENRELAY_LOG_LEVEL": "warning",
    "TOKENRELAY_HEARTBEAT_S": "1",
}


@pytest.fixture(autouse=True)
def _needs_haproxy_and_redis() -> None:
    for binary in ("haproxy", "redis-server"):
        if shutil.which(binary) is None:
            reason = f"{binary} is not installed (Debian package {binary})"
            if os.environ.get("CI"):
                pytest.fail(f"CI requires it: {reason}")
            pytest.skip(reason)


@contextlib.asynccontextmanager
async def _stack(gateways: int, workers: int, **env: str) -> AsyncIterator[LocalStack]:
    topology = Topology(gateways, workers, free_port(), free_port(), free_port_block(gateways))
    async with local_stack(topology, env={**os.environ, **_ENV, **env}) as stack:
        yield stack


def _pid(served_by: str | None) -> int:
    assert served_by is not None
    return int(served_by.rsplit(":", 1)[1])


@pytest.mark.timeout(90)
async def test_a_killed_gateway_is_survived_through_the_load_balancer() -> None:
    async with (
        _stack(gateways=2, workers=1) as stack,
        TokenrelayClient(stack.url, initial_backoff_s=0.05) as client,
    ):
        await _signal_the_serving_gateway(stack, client, "kill the gateway", signal.SIGKILL)


@pytest.mark.timeout(90)
async def test_a_gateway_stopped_with_sigterm_hands_its_clients_over() -> None:
    grace_s = 5
    async with (
        _stack(gateways=2, workers=1, TOKENRELAY_SHUTDOWN_GRACE_S=str(grace_s)) as stack,
        TokenrelayClient(stack.url, initial_backoff_s=0.05) as client,
    ):
        stopping = await _signal_the_serving_gateway(
            stack, client, "stop the gateway", signal.SIGTERM
        )
        # It told its client to go elsewhere at once, so it has no stream to wait for.
        await asyncio.wait_for(stopping.wait(), timeout=grace_s)
    # uvicorn re-raises the signal once it has shut down cleanly, so the status says SIGTERM.
    assert stopping.returncode == -signal.SIGTERM


async def _signal_the_serving_gateway(
    stack: LocalStack, client: TokenrelayClient, prompt: str, signum: int
) -> asyncio.subprocess.Process:
    """Ask for an answer; 20 chunks in, send ``signum`` to the gateway serving it. Check that
    the client finished the whole answer on the other gateway; return the signalled one."""
    by_pid = {process.pid: (name, process) for name, process in stack.gateways.items()}
    stream = await client.ask(prompt, max_tokens=120)
    parts: list[str] = []
    served_by: list[str] = []
    signalled: asyncio.subprocess.Process | None = None
    async for piece in stream:
        assert isinstance(piece, Chunk)
        parts.append(piece.text)
        if len(parts) == 20:
            name, signalled = by_pid[_pid(stream.served_by)]
            served_by.append(name)
            signalled.send_signal(signum)
    served_by.append(by_pid[_pid(stream.served_by)][0])
    assert "".join(parts) == mock_text(prompt, 120)
    assert stream.reconnects >= 1
    assert served_by[0] != served_by[1]  # the answer was finished by the other gateway
    assert signalled is not None
    return signalled


@pytest.mark.timeout(90)
async def test_a_killed_worker_is_taken_over_by_another() -> None:
    async with (
        _stack(gateways=1, workers=2) as stack,
        TokenrelayClient(stack.url, initial_backoff_s=0.05) as client,
    ):
        stream = await client.ask("kill the worker", max_tokens=150)
        text: list[str] = []
        resets = 0
        killed = False
        async for piece in stream:
            if isinstance(piece, Reset):
                resets += 1
                text.clear()
                continue
            text.append(piece.text)
            if len(text) == 20 and not killed:
                # The worker generating it is the one whose consumer holds the job.
                for process in stack.workers.values():
                    if await _generates(stack, process.pid):
                        process.send_signal(signal.SIGKILL)
                        killed = True
    assert killed
    assert resets == 1
    assert "".join(text) == mock_text("kill the worker", 150)


async def _generates(stack: LocalStack, pid: int) -> bool:
    from redis.asyncio import Redis

    from shared import keys

    redis = Redis.from_url(stack.redis_url)
    try:
        consumers = []
        for partition in range(PARTITIONS):
            stream = keys.jobs_stream(partition, PARTITIONS)
            if await redis.exists(stream):
                consumers += await redis.xinfo_consumers(stream, keys.JOBS_GROUP)
    finally:
        await redis.aclose()
    return any(c["pending"] and f":{pid}:" in c["name"].decode() for c in consumers)


@pytest.mark.timeout(90)
async def test_a_redis_restart_is_survived_without_restarting_anything() -> None:
    async with (
        _stack(gateways=1, workers=1) as stack,
        TokenrelayClient(stack.url, initial_backoff_s=0.05) as client,
    ):
        stream = await client.ask("before the restart", max_tokens=300)

        async def read_through_a_restart() -> None:
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 10:
                    await stack.restart_redis(down_s=1.0)

        with pytest.raises(StreamFailed) as lost:
            await read_through_a_restart()
        # In-flight answers are lost with Redis' data, and say so.
        assert lost.value.error_type == "message_lost"
        # While Redis is away, a reconnecting EventSource would get 200 + a retry hint (any
        # other status would end it for good): checked on a second outage.
        outage = asyncio.create_task(stack.restart_redis(down_s=1.5))
        await asyncio.sleep(0.5)
        response = await client.http.get(
            f"/chat/stream/{stream.message_id}", headers={"Last-Event-ID": "1-0"}
        )
        assert response.status_code == 200
        assert response.text.startswith("retry: ")
        await outage
        # New requests work again, served by the same processes.
        for _ in range(100):
            if (await client.http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        fresh = await client.ask("after the restart", max_tokens=20)
        text = [piece.text async for piece in fresh if isinstance(piece, Chunk)]
        assert "".join(text) == mock_text("after the restart", 20)
        assert all(
            process.returncode is None
            for process in [*stack.gateways.values(), *stack.workers.values()]
        )


# Generous bounds: on a loaded CI machine with coverage tracing every process, the 1,000
# joins once took more than 90 s (the whole suite ran at half its usual speed that time).
@pytest.mark.timeout(420)
async def test_a_reconnect_storm_of_1000_clients_loses_nothing() -> None:
    """1,000 clients of one live answer lose their connections at once; each resumes with
    Last-Event-ID through the load balancer and has exactly every event: no gap, no duplicate.

    The answer runs until the test cancels it (after every client has resumed), so the storm
    hits a live answer however slow the machine (or a coverage-traced gateway) is.
    """
    slow = {"TOKENRELAY_MOCK_TOKEN_DELAY_MS": "150"}
    async with (
        _stack(gateways=2, workers=1, **slow) as stack,
        CuttingProxy(stack.topology.lb_port) as proxy,
    ):
        limits = httpx.Limits(max_connections=1100, max_keepalive_connections=0)
        timeout = httpx.Timeout(60.0, read=30.0)
        base = f"http://127.0.0.1:{proxy.port}"
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as http:
            client = TokenrelayClient(
                stack.url, http=http, initial_backoff_s=0.05, max_backoff_s=0.5
            )
            first = await client.ask("storm", max_tokens=4000)  # 10 min: longer than the test
            streams = [client.follow(first.message_id) for _ in range(1000)]
            received = [0] * len(streams)

            async def read(index: int) -> list[str]:
                ids: list[str] = []
                with contextlib.suppress(StreamCancelled):
                    async for piece in streams[index]:
                        assert isinstance(piece, Chunk)
                        ids.append(piece.event_id)
                        received[index] += 1
                return ids

            readers = [asyncio.create_task(read(i)) for i in range(len(streams))]
            await _until(lambda: all(received), 240)  # every client is on the live tail
            before = list(received)
            proxy.cut()
            # Every client resumed and got newer events; then the answer is stopped.
            await _until(
                lambda: (
                    all(s.reconnects >= 1 for s in streams)
                    and all(now > then for now, then in zip(received, before, strict=True))
                ),
                120,
            )
            assert (await http.post(f"/chat/stream/{first.message_id}/cancel")).status_code == 202
            results = await asyncio.wait_for(asyncio.gather(*readers), 60)
            whole = await read_all(client.follow(first.message_id))
    assert len(whole) > max(before)
    assert all(ids == whole for ids in results)  # no gap, no duplicate, for every client


async def read_all(stream: MessageStream) -> list[str]:
    ids: list[str] = []
    with contextlib.suppress(StreamCancelled):
        async for piece in stream:
            assert isinstance(piece, Chunk)
            ids.append(piece.event_id)
    return ids


async def _until(predicate: Callable[[], bool], timeout_s: float) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_free_ports_lie_below_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    # An outgoing connection can take any port of the ephemeral range as its local end between
    # the check and a server's bind; below the range, only another listener can.
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(100)]
    base = free_port_block(3)
    block = range(base, base + 4)
    assert len(set(ports)) == len(ports)
    assert not set(ports) & set(block)
    for port in [*ports, *block]:
        assert 1024 <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_something_listens_on_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[int] = []
    real = random.randrange
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy: int = taken.getsockname()[1]

        def draw(*bounds: int) -> int:
            # The first draw lands on the busy port; the rest are random as usual.
            draws.append(busy if not draws else real(*bounds))
            return draws[-1]

        monkeypatch.setattr(random, "randrange", draw)
        port = free_port()
    assert draws[0] == busy
    assert port == draws[-1] != busy


@pytest.mark.timeout(90)
async def test_the_stack_starts_again_a_process_that_dies() -> None:
    async with _stack(gateways=1, workers=1) as stack:
        gateway, worker = stack.gateways["gateway-1"], stack.workers["worker-1"]
        gateway.send_signal(signal.SIGKILL)
        worker.send_signal(signal.SIGTERM)
        for _ in range(400):
            if stack.members["gateway-1"].restarts and stack.members["worker-1"].restarts:
                break
            await asyncio.sleep(0.05)
        assert stack.members["gateway-1"].restarts == 1
        assert stack.members["worker-1"].restarts == 1
        assert stack.gateways["gateway-1"] is not gateway
        assert stack.workers["worker-1"] is not worker
        async with TokenrelayClient(stack.url, initial_backoff_s=0.05) as client:
            stream = await client.ask("after a restart", max_tokens=10)
            text = [piece.text async for piece in stream if isinstance(piece, Chunk)]
        assert "".join(text) == mock_text("after a restart", 10)


async def _cli(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenrelay",
        *args,
        env={**os.environ, **_ENV, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _cli_stack() -> tuple[asyncio.subprocess.Process, tuple[int, ...]]:
    """``tokenrelay stack`` with one gateway and one worker, serving; and the ports it holds."""
    lb, redis, base = free_port(), free_port(), free_port_block(1)
    process = await _cli(
        "stack", "--gateways", "1", "--workers", "1", "--port", str(lb),
        "--redis-port", str(redis), "--gateway-base-port", str(base),
    )  # fmt: skip
    assert process.stdout is not None
    banner = await asyncio.wait_for(process.stdout.readline(), 60)
    assert b"tokenrelay stack: http://127.0.0.1:" in banner
    assert b"haproxy on 127.0.0.1" in banner
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{lb}") as http:
        assert (await http.get("/healthz")).status_code == 200
    return process, (lb, redis, base + 1)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(120)
async def test_ctrl_c_stops_the_whole_stack_cleanly() -> None:
    process, ports = await _cli_stack()
    process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0
    assert b"Traceback" not in out + err
    assert not any(_listening(port) for port in ports)  # nothing is left behind


@pytest.mark.timeout(90)
async def test_a_stack_killed_outright_takes_its_members_with_it() -> None:
    """SIGKILL (or the OOM killer) gives the stack no chance to stop its members: the kernel
    sends them SIGTERM when it dies, so no gateway, worker, Redis or haproxy is left holding
    its port."""
    process, ports = await _cli_stack()
    process.kill()
    await asyncio.wait_for(process.communicate(), 30)
    await _until(lambda: not any(_listening(port) for port in ports), 30)


@pytest.mark.timeout(60)
async def test_chat_gives_up_on_a_server_that_is_not_there_with_one_line() -> None:
    process = await _cli("chat", "--url", f"http://127.0.0.1:{free_port()}", "hello")
    out, err = await asyncio.wait_for(process.communicate(), 45)  # it tries for 15 s
    assert process.returncode == 1
    assert out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("tokenrelay chat: cannot reach http://127.0.0.1:")


@pytest.mark.timeout(150)
async def test_a_killed_cluster_node_is_started_again_and_rejoins_as_a_replica() -> None:
    topology = Topology(1, 1, free_port(), free_port(), free_port_block(1), redis_cluster=True)
    async with local_stack(topology, env={**os.environ, **_ENV}) as stack:
        cluster = stack.cluster
        port = cluster.primaries()[0]
        killed = cluster.processes[port]
        killed.kill()

        def back() -> bool:
            process = cluster.processes.get(port)
            return process is not None and process is not killed and answers(port)

        await eventually(back, timeout_s=60)
        # Its replica took its slots over first: it comes back as that node's replica.
        await eventually(lambda: ask(port, "ROLE").startswith("slave"), timeout_s=60)
        await asyncio.to_thread(cluster.wait_healthy, 60)
        async with TokenrelayClient(stack.url, initial_backoff_s=0.05) as client:
            stream = await client.ask("after the node came back", max_tokens=30)
            text = "".join([piece.text async for piece in stream if isinstance(piece, Chunk)])
        assert text == mock_text("after the node came back", 30)
