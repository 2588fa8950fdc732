"""``tokenrelay stack``: the whole topology as local processes, for development and tests.

It starts a private redis-server (or a Redis Cluster), N gateways, M workers and haproxy in
front, each a process of its own (as they would be in containers), and supervises them as
compose's ``restart: unless-stopped`` does: a process that dies is logged and started again
(after a delay that grows while it keeps dying). Stopping the stack stops them all in order:
SIGTERM to each (gateways hand their clients over), then SIGKILL for any still running after
the grace. The processes run in sessions of their own: a Ctrl-C reaches the stack, which stops
them in that order, not each of them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pathlib
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from shared import open_files
from tokenrelay.local_redis import redis_server_argv, start_cluster
from tokenrelay.topology import Topology, haproxy_config

_log = logging.getLogger("tokenrelay.stack")

# A process that dies is started again after this, doubled for each death in a row...
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_FIRST_RESTART_S = 0.5
_MAX_RESTART_S = 30.0
# How often the cluster's nodes (processes of their own kind) are looked at.
_CLUSTER_POLL_S = 0.5
# ... and one that lived this long is healthy again: its next death waits the first delay
# (as Docker's restart policy does): a process killed now and then is not a crash loop.
_HEALTHY_AFTER_S = 10.0


@dataclass
class Member:
    """One process of the stack and how to start it again."""

    name: str
    argv: list[str]
    port: int | None
    process: asyncio.subprocess.Process
    #: Deaths in a row (see _HEALTHY_AFTER_S); restarts done by the supervisor.
    deaths: int = 0
    restarts: int = 0
    #: Restarted by hand (LocalStack.restart): the supervisor leaves it alone meanwhile.
    held: bool = False


@dataclass
class LocalStack:
    """The running processes of a topology."""

    topology: Topology
    members: dict[str, Member]
    env: dict[str, str]
    #: With --redis-cluster: the cluster's nodes (tokenrelay.local_redis.LocalCluster).
    cluster: Any = None
    stopping: bool = False
    _supervisors: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.topology.lb_port}"

    @property
    def redis_url(self) -> str:
        if self.cluster is not None:
            url: str = self.cluster.url
            return url
        return f"redis://127.0.0.1:{self.topology.redis_port}/0"

    @property
    def gateways(self) -> dict[str, asyncio.subprocess.Process]:
        return {n: self.members[n].process for n in self.topology.gateway_names()}

    @property
    def workers(self) -> dict[str, asyncio.subprocess.Process]:
        return {n: self.members[n].process for n in self.topology.worker_names()}

    @property
    def redis(self) -> asyncio.subprocess.Process | None:
        member = self.members.get("redis")
        return None if member is None else member.process

    @property
    def lb(self) -> asyncio.subprocess.Process:
        return self.members["haproxy"].process

    def all(self) -> list[asyncio.subprocess.Process]:
        return [member.process for member in self.members.values()]

    async def restart(self, name: str, *, down_s: float = 0.0) -> None:
        """Kill member ``name`` and start it again after ``down_s`` seconds."""
        member = self.members[name]
        member.held = True
        try:
            member.process.kill()
            await member.process.wait()
            await asyncio.sleep(down_s)
            member.process = await _spawn(member.argv, self.env)
            if member.port is not None:
                await _wait_for_port(member.port, member.process)
        finally:
            member.held = False
        self._watch(member)

    async def restart_redis(self, *, down_s: float = 0.0) -> None:
        """Kill the stack's redis-server (no persistence: its data is gone) and start a new one
        on the same port after ``down_s`` seconds."""
        if "redis" not in self.members:
            raise RuntimeError("the stack runs a Redis Cluster")
        await self.restart("redis", down_s=down_s)

    def supervise(self) -> None:
        """Watch every member, and the cluster's nodes: restart the ones that die until
        :meth:`stop`."""
        for member in self.members.values():
            self._watch(member)
        if self.cluster is not None:
            self._supervisors["redis-cluster"] = asyncio.create_task(self._keep_cluster())

    def _watch(self, member: Member) -> None:
        old = self._supervisors.get(member.name)
        if old is not None and not old.done():
            old.cancel()
        self._supervisors[member.name] = asyncio.create_task(self._keep(member))

    async def _keep(self, member: Member) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            process = member.process
            code = await process.wait()
            if self.stopping or member.held or process is not member.process:
                return
            member.deaths = _deaths_in_a_row(member.deaths, loop.time() - started)
            delay = _restart_delay_s(member.deaths)
            _log.warning("%s exited (%s); starting it again in %.1f s", member.name, code, delay)
            await asyncio.sleep(delay)
            if self.stopping or member.held:
                return
            try:
                member.process = await _spawn(member.argv, self.env)
                if member.port is not None:
                    await _wait_for_port(member.port, member.process)
            except (OSError, RuntimeError) as exc:
                _log.error("%s could not be started again: %s", member.name, exc)
                continue  # its new process (if any) has exited: the loop waits it out
            member.restarts += 1
            _log.info("%s started again (pid %d)", member.name, member.process.pid)

    async def _keep_cluster(self) -> None:
        """Start a cluster node that died again, on its port with its cluster configuration:
        it rejoins, as a replica of the node that took its slots over."""
        cluster = self.cluster
        loop = asyncio.get_running_loop()
        deaths: dict[int, int] = {}
        started = dict.fromkeys(cluster.processes, loop.time())
        while not self.stopping:
            await asyncio.sleep(_CLUSTER_POLL_S)
            for port, process in list(cluster.processes.items()):
                code = process.poll()
                if code is None or self.stopping:
                    continue
                del cluster.processes[port]
                deaths[port] = _deaths_in_a_row(deaths.get(port, 0), loop.time() - started[port])
                # Not before its replica took over: a node back within the node timeout would
                # serve its slots again, empty (the stack's Redis keeps nothing on disk).
                delay = max(3 * cluster.node_timeout_ms / 1000, _restart_delay_s(deaths[port]))
                _log.warning(
                    "Redis Cluster node %d exited (%s); starting it again in %.1f s",
                    port,
                    code,
                    delay,
                )
                await asyncio.sleep(delay)
                try:
                    # In this thread, not a worker thread: a node's parent-death signal
                    # follows the thread that started it.
                    cluster.start_node(port)
                except (OSError, RuntimeError) as exc:
                    _log.error("Redis Cluster node %d could not be started again: %s", port, exc)
                    continue
                started[port] = loop.time()
                _log.info(
                    "Redis Cluster node %d started again (pid %d)",
                    port,
                    cluster.processes[port].pid,
                )

    async def stop(self) -> None:
        """Stop supervising, then stop every process, in dependency order: the balancer,
        gateways (they hand clients over), workers (they end or hand back their jobs), then
        Redis, which all of them need."""
        self.stopping = True
        for task in self._supervisors.values():
            task.cancel()
        await asyncio.gather(*self._supervisors.values(), return_exceptions=True)
        await _stop([self.lb])
        await _stop(list(self.gateways.values()))
        await _stop(list(self.workers.values()))
        await _stop([] if self.redis is None else [self.redis])


def _deaths_in_a_row(deaths: int, lived_s: float) -> int:
    """Deaths in a row, counting one that came after ``lived_s``: a process that lived
    :data:`_HEALTHY_AFTER_S` was healthy, and its death starts the count again."""
    return 1 if lived_s >= _HEALTHY_AFTER_S else deaths + 1


def _restart_delay_s(deaths: int) -> float:
    """How long to wait before starting a process again after ``deaths`` deaths in a row."""
    return min(_MAX_RESTART_S, _FIRST_RESTART_S * 2.0 ** (deaths - 1))


async def _spawn(argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    # A session of its own: a terminal's Ctrl-C goes to the stack only, which stops it in order.
    return await asyncio.create_subprocess_exec(
        *argv, env=env, start_new_session=True, preexec_fn=_ends_with(os.getpid())
    )


def _ends_with(parent: int) -> Callable[[], None] | None:
    """What a member runs before it execs: on Linux, ask the kernel to send it SIGTERM when the
    stack dies, however it dies (a SIGKILL or an OOM kill gives the stack no chance to stop its
    members, which would otherwise keep their ports and go on generating)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def end_with_the_stack() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the stack died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return end_with_the_stack


@contextlib.asynccontextmanager
async def local_stack(
    topology: Topology, env: dict[str, str] | None = None, *, host: str = "127.0.0.1"
) -> AsyncIterator[LocalStack]:
    """Start the topology's processes, supervised; stop them all on exit. haproxy listens on
    ``host`` (loopback unless told otherwise)."""
    haproxy = shutil.which("haproxy")
    redis_server = shutil.which("redis-server")
    if haproxy is None or redis_server is None:
        raise RuntimeError(
            "tokenrelay stack needs haproxy and redis-server (Debian packages of those names)"
        )
    # haproxy derives its connection limit from the open-file limit it inherits.
    open_files.raise_limit()
    workdir = tempfile.mkdtemp(prefix="tokenrelay-stack-")
    base_env = {
        **os.environ,
        **(env or {}),
        "REDIS_URL": f"redis://127.0.0.1:{topology.redis_port}/0",
    }
    # A local stack is for trying things out: open, unless told otherwise.
    base_env.setdefault("TOKENRELAY_AUTH", "off")
    members: dict[str, Member] = {}
    cluster = None

    async def start(name: str, argv: list[str], port: int | None) -> Member:
        member = members[name] = Member(name, argv, port, await _spawn(argv, base_env))
        return member

    stack: LocalStack | None = None
    try:
        if topology.redis_cluster:
            # In this thread, before anything else runs: a node's parent-death signal follows
            # the thread that started it, and the stack's members must end with the stack.
            cluster = start_cluster(workdir, preexec=_ends_with(os.getpid()))
            base_env["REDIS_URL"] = cluster.url
        else:
            argv = redis_server_argv(redis_server, topology.redis_port, workdir)
            # Its log to a file: its start-up banner on the terminal says nothing useful.
            argv += ["--logfile", os.path.join(workdir, "redis.log")]
            redis = await start("redis", argv, topology.redis_port)
            await _wait_for_port(topology.redis_port, redis.process)
        tokenrelay = [sys.executable, "-m", "tokenrelay"]
        for name, port in zip(topology.gateway_names(), topology.gateway_ports(), strict=True):
            argv = [*tokenrelay, "gateway", "--host", "127.0.0.1", "--port", str(port)]
            await start(name, argv, port)
        for name in topology.worker_names():
            await start(name, [*tokenrelay, "worker"], None)
        for name, port in zip(topology.gateway_names(), topology.gateway_ports(), strict=True):
            await _wait_for_port(port, members[name].process)
        config = os.path.join(workdir, "haproxy.cfg")
        backends = [
            (name, "127.0.0.1", port)
            for name, port in zip(topology.gateway_names(), topology.gateway_ports(), strict=True)
        ]
        pathlib.Path(config).write_text(haproxy_config(topology.lb_port, backends, bind=host))  # noqa: ASYNC240 - a small file, once
        lb = await start("haproxy", [haproxy, "-f", config, "-db"], topology.lb_port)
        await _wait_for_port(topology.lb_port, lb.process)
        stack = LocalStack(topology, members, base_env, cluster)
        stack.supervise()
        yield stack
    finally:
        if stack is not None:
            await stack.stop()
        await _stop([member.process for member in members.values()])
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
        shutil.rmtree(workdir, ignore_errors=True)


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


async def run(
    topology: Topology, *, host: str = "127.0.0.1", env: dict[str, str] | None = None
) -> int:
    """Run, supervised, until SIGINT or SIGTERM; then stop everything in order (``env``: set
    for every process, over this one's environment)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    async with local_stack(topology, env=env, host=host) as stack:
        print(
            f"tokenrelay stack: {stack.url} (haproxy on {host}) -> {topology.gateways} gateways "
            f"on ports {', '.join(map(str, topology.gateway_ports()))}; {topology.workers} "
            f"workers; {stack.redis_url}. A process that dies is started again; Ctrl-C stops "
            "it all.",
            flush=True,
        )
        await stopping.wait()
        print("tokenrelay stack: stopping", flush=True)
    return 0
