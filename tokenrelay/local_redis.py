"""Redis servers run as local processes, for the local stack, the tests and the benchmark: one
redis-server, or a Redis Cluster of primaries and replicas made with ``redis-cli --cluster
create``, or a primary with a replica and sentinels. All on loopback, nothing kept on disk."""

from __future__ import annotations

import os
import pathlib
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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
        "--dir", workdir, "--dbfilename", f"dump-{port}.rdb", "--loglevel", "warning",
        # A replica is in sync at once rather than after the default 5 s wait for others.
        "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip


def binary(name: str) -> str:
    """The path of ``redis-server`` or ``redis-cli``; RuntimeError saying how to get it."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (Debian package redis-server)")
    return path


def ask(port: int, *command: str, timeout_s: float = 2.0) -> str:
    """One command to the Redis on ``port`` (redis-cli), its reply as text."""
    done = subprocess.run(
        [binary("redis-cli"), "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return done.stdout


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _wait(condition: object, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout_s:.0f} s")
        time.sleep(0.05)


@dataclass
class LocalCluster:
    """A Redis Cluster of local redis-server processes."""

    workdir: str
    node_timeout_ms: int
    ports: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Each node's cluster bus port, chosen free like its own (by default it would be the
    # port + 10000, which may be taken, or in the range of outgoing connections).
    bus_ports: dict[int, int] = field(default_factory=dict)
    #: Run in each node's process before it execs (see tokenrelay.stack).
    preexec: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        """``REDIS_URL`` naming the cluster by its first three nodes."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def start_node(self, port: int) -> None:
        argv = [
            *redis_server_argv(binary("redis-server"), port, self.workdir),
            "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-port", str(self.bus_ports.setdefault(port, free_port())),
            "--logfile", os.path.join(self.workdir, f"redis-{port}.log"),
        ]  # fmt: skip
        process = self.processes[port] = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, preexec_fn=self.preexec
        )
        _wait(
            lambda: answers(port) or process.poll() is not None,
            f"the cluster node on {port} did not start",
        )
        if process.poll() is not None:
            del self.processes[port]
            raise RuntimeError(f"the cluster node on {port} exited (see redis-{port}.log)")

    def primaries(self) -> list[int]:
        """The ports of the nodes that are primaries now."""
        return [p for p in self.ports if p in self.processes and _role(p) == "master"]

    def replicas_of(self, port: int) -> list[int]:
        node_id = ask(port, "CLUSTER", "MYID").strip()
        return [p for p in self.ports if p in self.processes and _primary_id(p) == node_id]

    def kill(self, port: int) -> None:
        """Kill a node at once (SIGKILL): its replica takes over after the node timeout."""
        process = self.processes.pop(port)
        process.kill()
        process.wait()

    def healthy(self) -> bool:
        """Every live node sees every slot served (cluster_state:ok), and every replica is in
        sync with its primary."""
        return all(
            "cluster_state:ok" in ask(p, "CLUSTER", "INFO")
            and replica_in_sync(p)
            # Clients learn the replicas from CLUSTER SLOTS, which lists one only once it has
            # received a write: with none yet, reads meant for replicas go to the primaries.
            and len(set(_NODE_ID.findall(ask(p, "CLUSTER", "SLOTS")))) == len(self.processes)
            for p in self.processes
        ) and all(self._replicates(p) for p in self.primaries())

    def _replicates(self, primary: int) -> bool:
        """A write to ``primary`` reaches each of its replicas: a replica that rejoined says
        its link is up, and is in step, a moment before it applies what is written."""
        ranges = _slot_ranges(primary)
        if not ranges:
            return True
        key = _key_in_slots(ranges, f"health:{primary}")
        token = str(time.monotonic_ns())
        ask(primary, "SET", key, token)
        return all(_read_only_get(replica, key) == token for replica in self.replicas_of(primary))

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        _wait(self.healthy, "the cluster did not become healthy", timeout_s)

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            process.wait(timeout=10)
        self.processes.clear()


def start_cluster(
    workdir: str,
    *,
    primaries: int = 3,
    replicas: int = 1,
    node_timeout_ms: int = 2000,
    preexec: Callable[[], None] | None = None,
) -> LocalCluster:
    """``primaries`` primaries with ``replicas`` replicas each, their slots spread evenly;
    returned once the cluster serves every slot."""
    cluster = LocalCluster(workdir, node_timeout_ms, preexec=preexec)
    try:
        for _ in range(primaries * (1 + replicas)):
            port = free_port()
            cluster.ports.append(port)
            cluster.start_node(port)
        created = subprocess.run(
            [
                binary("redis-cli"), "--cluster", "create",
                *(f"127.0.0.1:{p}" for p in cluster.ports),
                "--cluster-replicas", str(replicas), "--cluster-yes",
            ],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
        _wait(lambda: all(_role(p) for p in cluster.ports), "the nodes did not take their roles")
        for port in cluster.primaries():
            ask(port, "FLUSHALL")  # a first write, replicated: see healthy()
        cluster.wait_healthy()
        # Every replica attached to its primary (a failover test needs one to promote).
        _wait(
            lambda: (
                sum(len(cluster.replicas_of(p)) for p in cluster.primaries())
                == primaries * replicas
            ),
            "the cluster's replicas did not attach",
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster


_NODE_ID = re.compile(r"^[0-9a-f]{40}$", re.MULTILINE)


def replica_in_sync(port: int) -> bool:
    """True for a primary, and for a replica whose link to its primary is up and that has
    everything its primary sent (its offset is the primary's: a replica that rejoined reports
    its link up a moment before it replicates what is written)."""
    info = _fields(ask(port, "INFO", "replication"))
    if info.get("role") == "master":
        return True
    if info.get("master_link_status") != "up":
        return False
    primary = _fields(ask(int(info["master_port"]), "INFO", "replication"))
    offset = info.get("slave_repl_offset")
    return offset is not None and offset == primary.get("master_repl_offset") and offset != "0"


def _slot_ranges(port: int) -> list[tuple[int, int]]:
    """The slot ranges the node on ``port`` serves (as it says)."""
    for line in ask(port, "CLUSTER", "NODES").splitlines():
        fields = line.split()
        if "myself" in fields[2]:
            bounds = (part.split("-") for part in fields[8:] if part[0].isdigit())
            return [(int(b[0]), int(b[-1])) for b in bounds]
    return []


def _key_in_slots(ranges: list[tuple[int, int]], name: str) -> str:
    """A key named ``name`` whose hash tag puts it in one of ``ranges``."""
    for n in range(1_000_000):
        key = f"{{{name}:{n}}}"
        slot = slot_of(key)
        if any(low <= slot <= high for low, high in ranges):
            return key
    raise RuntimeError(f"no key found for slots {ranges}")


def _read_only_get(port: int, key: str) -> str:
    done = subprocess.run(
        [binary("redis-cli"), "-p", str(port)],
        input=f"READONLY\nGET {key}\n",
        capture_output=True,
        text=True,
        timeout=2.0,
        check=False,
    )
    lines = done.stdout.splitlines()
    return lines[1].strip() if len(lines) > 1 else ""


def _fields(info: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in info.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


def _role(port: int) -> str:
    for line in ask(port, "ROLE").splitlines()[:1]:
        return line.strip()
    return ""


def _primary_id(port: int) -> str | None:
    for line in ask(port, "CLUSTER", "NODES").splitlines():
        fields = line.split()
        if "myself" in fields[2] and "slave" in fields[2]:
            return fields[3]
    return None


def slot_of(key: str) -> int:
    """The cluster slot of ``key``."""
    from redis.crc import key_slot

    return int(key_slot(key.encode()))


def node_id(port: int) -> str:
    return ask(port, "CLUSTER", "MYID").strip()


def owner_of(cluster: LocalCluster, slot: int) -> int:
    """The port of the primary that serves ``slot`` now."""
    for port in cluster.primaries():
        for line in ask(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "myself" not in fields[2]:
                continue
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return port
    raise RuntimeError(f"no primary serves slot {slot}")


def migrate_slot(cluster: LocalCluster, slot: int, target: int) -> None:
    """Move ``slot`` with its keys to the primary on port ``target``, as ``redis-cli --cluster
    reshard`` moves slots: IMPORTING/MIGRATING, MIGRATE of every key, then the new owner."""
    source = owner_of(cluster, slot)
    source_id, target_id = node_id(source), node_id(target)
    ask(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
    ask(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
    while keys := ask(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split():
        ask(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys)
    for port in cluster.primaries():
        ask(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)


@dataclass
class LocalSentinel:
    """A primary, one replica, and three sentinels watching them."""

    workdir: str
    service: str = "tokenrelay"
    redis: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    sentinels: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
        return f"redis+sentinel://{nodes}/{self.service}/0"

    def primary(self) -> int:
        """The port of the primary, as the first sentinel that answers says."""
        for port in self.sentinels:
            reply = ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service).split()
            if len(reply) == 2:
                return int(reply[1])
        raise RuntimeError("no sentinel names the primary")

    def kill(self, port: int) -> None:
        process = self.redis.pop(port)
        process.kill()
        process.wait()

    def stop(self) -> None:
        for process in [*self.redis.values(), *self.sentinels.values()]:
            process.terminate()
        for process in [*self.redis.values(), *self.sentinels.values()]:
            process.wait(timeout=10)
        self.redis.clear()
        self.sentinels.clear()


def start_sentinel(workdir: str, *, down_after_ms: int = 1000) -> LocalSentinel:
    """A primary with one replica, watched by three sentinels (quorum 2); returned once the
    sentinels know the replica."""
    setup = LocalSentinel(workdir)
    try:
        primary, replica = free_port(), free_port()
        for port, extra in ((primary, []), (replica, ["--replicaof", "127.0.0.1", str(primary)])):
            argv = [
                *redis_server_argv(binary("redis-server"), port, workdir),
                "--logfile", os.path.join(workdir, f"redis-{port}.log"), *extra,
            ]  # fmt: skip
            setup.redis[port] = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
            _wait(lambda port=port: answers(port), f"redis on {port} did not start")
        for _ in range(3):
            port = free_port()
            config = os.path.join(workdir, f"sentinel-{port}.conf")
            pathlib.Path(config).write_text(
                f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                f"sentinel monitor {setup.service} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {setup.service} {down_after_ms}\n"
                f"sentinel failover-timeout {setup.service} 5000\n"
            )
            argv = [binary("redis-server"), config, "--sentinel", "--logfile",
                    os.path.join(workdir, f"sentinel-{port}.log")]  # fmt: skip
            setup.sentinels[port] = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
            _wait(lambda port=port: answers(port), f"sentinel on {port} did not start")
        _wait(
            lambda: all(
                "num-slaves" in ask(p, "SENTINEL", "MASTER", setup.service)
                and _sentinel_field(p, setup.service, "num-slaves") == "1"
                and _sentinel_field(p, setup.service, "num-other-sentinels") == "2"
                for p in setup.sentinels
            ),
            "the sentinels did not find the replica and each other",
        )
        _wait(lambda: replica_in_sync(replica), "the replica did not sync with the primary")
    except BaseException:
        setup.stop()
        raise
    return setup


def _sentinel_field(port: int, service: str, name: str) -> str:
    lines = ask(port, "SENTINEL", "MASTER", service).splitlines()
    for key, value in zip(lines[::2], lines[1::2], strict=False):
        if key == name:
            return value
    return ""
