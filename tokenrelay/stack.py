"""``tokenrelay stack``: the whole topology as local processes, for development and tests.

It starts a private redis-server, N gateways, M workers and haproxy in front, each a process of
its own (as they would be in containers), and stops them all when it is stopped: SIGTERM to
each (gateways hand their clients over), then SIGKILL for any still running after the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import random
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tokenrelay.topology import Topology, haproxy_config

_log = logging.getLogger("tokenrelay.stack")


@dataclass
class LocalStack:
    """The running processes of a topology."""

    topology: Topology
    redis: asyncio.subprocess.Process
    lb: asyncio.subprocess.Process
    gateways: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    workers: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    _redis_argv: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.topology.lb_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.topology.redis_port}/0"

    async def restart_redis(self, *, down_s: float = 0.0) -> None:
        """Kill the stack's redis-server (no persistence: its data is gone) and start a new one
        on the same port after ``down_s`` seconds."""
        self.redis.kill()
        await self.redis.wait()
        await asyncio.sleep(down_s)
        self.redis = await asyncio.create_subprocess_exec(*self._redis_argv)
        await _wait_for_port(self.topology.redis_port, self.redis)

    def all(self) -> list[asyncio.subprocess.Process]:
        return [self.lb, *self.gateways.values(), *self.workers.values(), self.redis]


@contextlib.asynccontextmanager
async def local_stack(
    topology: Topology, env: dict[str, str] | None = None
) -> AsyncIterator[LocalStack]:
    """Start the topology's processes; stop them all on exit."""
    haproxy = shutil.which("haproxy")
    redis_server = shutil.which("redis-server")
    if haproxy is None or redis_server is None:
        raise RuntimeError(
            "tokenrelay stack needs haproxy and redis-server (Debian packages of those names)"
        )
    workdir = tempfile.mkdtemp(prefix="tokenrelay-stack-")
    base_env = {
        **os.environ,
        **(env or {}),
        "REDIS_URL": f"redis://127.0.0.1:{topology.redis_port}/0",
    }
    processes: list[asyncio.subprocess.Process] = []

    async def start(*argv: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(*argv, env=base_env)
        processes.append(process)
        return process

    try:
        redis = await start(*redis_server_argv(redis_server, topology.redis_port, workdir))
        await _wait_for_port(topology.redis_port, redis)
        stack_gateways = {}
        for name, port in zip(topology.gateway_names(), topology.gateway_ports(), strict=True):
            gateway = await start(
                sys.executable,
                "-m",
                "tokenrelay",
                "gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            )
            stack_gateways[name] = gateway
        stack_workers = {
            name: await start(sys.executable, "-m", "tokenrelay", "worker")
            for name in topology.worker_names()
        }
        for port, gateway in zip(topology.gateway_ports(), stack_gateways.values(), strict=True):
            await _wait_for_port(port, gateway)
        config = os.path.join(workdir, "haproxy.cfg")
        backends = [
            (name, "127.0.0.1", port)
            for name, port in zip(topology.gateway_names(), topology.gateway_ports(), strict=True)
        ]
        pathlib.Path(config).write_text(haproxy_config(topology.lb_port, backends))  # noqa: ASYNC240 - a small file, once
        lb = await start(haproxy, "-f", config, "-db")
        await _wait_for_port(topology.lb_port, lb)
        redis_argv = redis_server_argv(redis_server, topology.redis_port, workdir)
        stack = LocalStack(topology, redis, lb, stack_gateways, stack_workers, redis_argv)
        try:
            yield stack
        finally:
            # In dependency order: the balancer, then gateways (they hand clients over), then
            # workers (they end or hand back their jobs), then Redis, which all of them need.
            await _stop([stack.lb])
            await _stop(list(stack.gateways.values()))
            await _stop(list(stack.workers.values()))
            await _stop([stack.redis])
    finally:
        await _stop(processes)
        shutil.rmtree(workdir, ignore_errors=True)


# Ports this process has handed out: two calls in a row must not return the same free port.
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free right now, for a server about to be started on it.

    It is chosen below the kernel's ephemeral range. A port from that range can become the
    local end of any outgoing connection (a worker's to Redis, a client's to haproxy) between
    this check and the server's bind, and the server then dies of "address already in use".
    """
    return free_port_block(0)


def free_port_block(count: int) -> int:
    """A free base port such that base+1 .. base+count are free too (the gateways' ports)."""
    below = _below_ephemeral()
    for _ in range(200):
        base = random.randrange(below[0], below[1] - count) if below else _any_free_port()
        block = range(base, base + count + 1)
        if _handed_out.intersection(block) or not all(map(_bindable, block)):
            continue
        _handed_out.update(block)
        return base
    raise RuntimeError("found no block of free ports")


def _below_ephemeral() -> tuple[int, int] | None:
    """The unprivileged ports below the ephemeral range, or None where there are too few."""
    try:
        text = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # not Linux: assume Linux's default range
    return (1024, low) if low - 1024 >= 1000 else None


def _any_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def redis_server_argv(binary: str, port: int, workdir: str) -> list[str]:
    """A throw-away redis-server on loopback: nothing saved, nothing appended."""
    return [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", workdir, "--loglevel", "warning",
    ]  # fmt: skip


async def _wait_for_port(port: int, process: asyncio.subprocess.Process) -> None:
    for _ in range(300):
        if process.returncode is not None:
            raise RuntimeError(
                f"a stack process exited with {process.returncode} before listening on {port}"
            )
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def _stop(processes: list[asyncio.subprocess.Process], grace_s: float = 15.0) -> None:
    running = [p for p in processes if p.returncode is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    waits = [asyncio.ensure_future(p.wait()) for p in running]
    if waits:
        _, late = await asyncio.wait(waits, timeout=grace_s)
        for process, wait in zip(running, waits, strict=True):
            if wait in late:
                process.kill()
        await asyncio.gather(*waits)


async def run(topology: Topology) -> int:
    """Run until SIGINT/SIGTERM, or until a process of the stack dies (then exit 1)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    async with local_stack(topology) as stack:
        print(
            f"tokenrelay stack: {stack.url} (haproxy) -> {topology.gateways} gateways on ports "
            f"{', '.join(map(str, topology.gateway_ports()))}; {topology.workers} workers; "
            f"{stack.redis_url}. Ctrl-C stops it all.",
            flush=True,
        )
        watchers = {asyncio.ensure_future(p.wait()): p for p in stack.all()}
        stop = asyncio.ensure_future(stopping.wait())
        done, _ = await asyncio.wait({stop, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        for future in (stop, *watchers):
            future.cancel()
        await asyncio.gather(stop, *watchers, return_exceptions=True)
        if stop not in done:
            _log.error("a process of the stack exited; stopping the rest")
            return 1
    return 0
