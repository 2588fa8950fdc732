"""The workloads, and one measured run of one system under one of them."""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from bench import native, procstat
from bench.servers import LOAD_CORE, Publisher, Running, System, command_counts, reset_stats

_SETTLE_S = 1.0


@dataclass(frozen=True)
class Workload:
    kind: str  # A fan-out, B chat-like, C reconnect storm, D slow subscribers, M idle memory
    subscribers: int
    streams: int = 1
    rate: float = 100.0  # tokens per second per stream
    tokens: int = 400  # per stream
    churn_every: int = 0  # B: each client drops and resumes after this many tokens
    # C: seconds after all connected when every client drops (after the settling second,
    # so that tokens flow when it happens)
    storm_at: float = -1.0
    slow_fraction: float = 0.0  # D

    @property
    def label(self) -> str:
        if self.kind == "B":
            return f"B {self.streams} streams x 1"
        names = {"A": "fan-out", "C": "storm", "D": "slow 10%", "M": "idle"}
        return f"{self.kind} {names[self.kind]} {self.subscribers}"

    @property
    def seconds(self) -> float:
        return self.tokens / self.rate


async def drive(
    publisher: Publisher, streams: int, rate: float, tokens: int, *, plant: str | None = None
) -> float:
    """Publish ``tokens`` tokens to each stream at ``rate`` per second each; return when done.

    Tokens go to the streams in turn, so load is even over time. Each is "s=<n> t=<ns> ", its
    sequence number in its stream and the wall-clock time it was published. ``plant`` is
    ``"gap"`` (skip one number of stream 0) or ``"duplicate"`` (send one token of stream 0
    twice), to show that the load generator notices. Returns the seconds it took.
    """
    total_rate = rate * streams
    tick = max(0.01, 1 / total_rate)
    per_tick = total_rate * tick
    seq = [0] * streams
    cursor = 0
    owed = 0.0
    remaining = streams * tokens
    loop = asyncio.get_running_loop()
    started = deadline = loop.time()
    while remaining:
        owed += per_tick
        batch: list[tuple[int, str]] = []
        while owed >= 1 and remaining:
            owed -= 1
            stream = cursor
            cursor = (cursor + 1) % streams
            if seq[stream] >= tokens:
                continue
            n = seq[stream]
            seq[stream] += 1
            remaining -= 1
            planted = stream == 0 and n == tokens // 2
            if planted and plant == "gap":
                continue
            text = f"s={n} t={time.time_ns()} "
            batch.append((stream, text + text if planted and plant == "duplicate" else text))
        if batch:
            await publisher.publish(batch)
        deadline += tick
        # Until the next tick, flush coalesced text the moment its window closes, as the
        # worker's timer does.
        while (flush_at := publisher.next_flush()) is not None and flush_at < deadline:
            await asyncio.sleep(max(0.0, flush_at - loop.time()))
            await publisher.flush_due()
        await asyncio.sleep(max(0.0, deadline - loop.time()))
    await publisher.flush_all()
    return loop.time() - started


async def run(system: System, workload: Workload, *, plant: str | None = None) -> dict[str, Any]:
    """One run on freshly started processes: the figures of ``system`` under ``workload``
    (``plant``: see :func:`drive`)."""
    async with system.start(workload.streams) as running:
        if workload.kind == "M":
            return await _idle_memory(system, workload, running)
        return await _measured(system, workload, running, plant)


async def _start_loadgen(
    workload: Workload, running: Running, *, duration: float, expect: int
) -> tuple[asyncio.subprocess.Process, str]:
    fd, paths_file = tempfile.mkstemp(prefix="bench-paths-")
    os.write(fd, "".join(p + "\n" for p in running.paths).encode())
    os.close(fd)
    pin = [] if LOAD_CORE is None else ["taskset", "-c", str(LOAD_CORE)]
    argv = [
        *pin, str(native.program("loadgen")),
        "--port", str(running.port), "--paths", paths_file,
        "--conns", str(workload.subscribers), "--duration", str(duration),
        "--expect", str(expect), "--churn-every", str(workload.churn_every),
        "--storm-at", str(workload.storm_at), "--slow-fraction", str(workload.slow_fraction),
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    if process.stderr is None:
        raise RuntimeError("the load generator was started without a pipe to its stderr")
    try:
        line = await asyncio.wait_for(process.stderr.readline(), 120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError("the load generator did not connect within 120 s") from None
    if not line.startswith(b"READY"):
        await process.wait()
        raise RuntimeError(f"the load generator failed: {line!r}")
    return process, paths_file


async def _measured(
    system: System, workload: Workload, running: Running, plant: str | None
) -> dict[str, Any]:
    duration = workload.seconds + max(workload.storm_at, 0) + 20
    if workload.slow_fraction:
        duration = workload.seconds + 5  # slow readers never finish: stop after the others
    loadgen, paths_file = await _start_loadgen(
        workload, running, duration=duration, expect=workload.tokens
    )
    try:
        # Connected is not settled (tokenrelay's subscribers still attach to the tail, say):
        # measure from a second later, so a run measures streaming, not joining.
        await asyncio.sleep(_SETTLE_S)
        server = procstat.family(running.server_pid)  # uvicorn/nginx workers are up by now
        if running.redis is not None:
            await reset_stats(running.redis)
        per_process0 = {pid: procstat.cpu_ns([pid]) for pid in server}
        redis0 = procstat.cpu_ns(running.redis_pids)
        replicas0 = procstat.cpu_ns(running.replica_pids)
        wall0 = time.monotonic()
        writes0, renewals0 = running.publisher.writes, running.publisher.renewals
        drive_s = await drive(
            running.publisher, workload.streams, workload.rate, workload.tokens, plant=plant
        )
        out, _ = await loadgen.communicate()
        wall = time.monotonic() - wall0
        per_process = [procstat.cpu_ns([pid]) - ns for pid, ns in per_process0.items()]
        cpu = sum(per_process)
        redis_cpu = procstat.cpu_ns(running.redis_pids) - redis0
        replicas_cpu = procstat.cpu_ns(running.replica_pids) - replicas0
        rss = procstat.rss_bytes(server)
        writes = running.publisher.writes - writes0
        renewals = running.publisher.renewals - renewals0
        shards = await command_counts(running.redis) if running.redis is not None else {}
        commands = _gateway_commands(running, shards, writes, renewals)
    finally:
        if loadgen.returncode is None:
            loadgen.kill()
            await loadgen.wait()
        os.unlink(paths_file)
    result = orjson.loads(out)
    figures = _figures(
        system, workload, result, cpu, redis_cpu, wall, drive_s, rss, commands, writes
    )
    figures["cpu_s_by_process"] = [ns / 1e9 for ns in per_process]
    figures["redis_cpu_us_per_write"] = redis_cpu / 1000 / writes if writes else math.nan
    if running.replica_pids:
        figures["replicas_cpu_us_per_write"] = replicas_cpu / 1000 / writes if writes else 0
    if len(shards) > 1:  # each primary's share of every command served
        total = sum(shards.values()) or 1
        figures["shard_shares"] = sorted(calls / total for calls in shards.values())
    return figures


def _gateway_commands(
    running: Running, shards: dict[str, int], writes: int, renewals: int
) -> int | None:
    """Commands the gateway sent Redis during the run (all minus the publisher's appends)."""
    if running.redis is None:
        return None
    own = running.commands_per_write * writes + (2 * renewals if running.commands_per_write else 0)
    return max(0, sum(shards.values()) - own)


def _figures(
    system: System,
    workload: Workload,
    result: dict[str, Any],
    cpu_ns: int,
    redis_cpu_ns: int,
    wall: float,
    drive_s: float,
    rss: int,
    commands: int | None,
    writes: int,
) -> dict[str, Any]:
    tokens = result["tokens"] or math.nan
    events = result["events"] or math.nan
    latency = result["latency_ms"]
    return {
        "system": system.name,
        "workload": workload.label,
        **asdict(workload),
        "delivered_tokens": result["tokens"],
        "delivered_events": result["events"],
        "tokens_per_s": result["tokens"] / drive_s,
        "cpu_us_per_token": cpu_ns / 1000 / tokens,
        "redis_cpu_us_per_token": redis_cpu_ns / 1000 / tokens,
        "cpu_us_per_event": cpu_ns / 1000 / events,
        "server_core_busy": cpu_ns / 1e9 / wall,
        "loadgen_core_busy": result["cpu_s"] / result["elapsed_s"],
        "latency_p50_ms": latency["p50"],
        "latency_p99_ms": latency["p99"],
        "latency_p999_ms": latency["p999"],
        "latency_max_ms": latency["max"],
        "slow_latency_p50_ms": result["slow_latency_ms"]["p50"],
        "first_token_p50_ms": result["first_token_ms"]["p50"],
        "first_token_max_ms": result["first_token_ms"]["max"],
        "back_p50_ms": result["back_ms"]["p50"],
        "back_p99_ms": result["back_ms"]["p99"],
        "back_max_ms": result["back_ms"]["max"],
        "bytes_per_event": result["bytes"] / events,
        "redis_cmds_per_token": None if commands is None else commands / tokens,
        "writes": writes,
        "rss_mb": rss / 1e6,
        "gaps": result["gaps"],
        "dups": result["dups"],
        "incomplete": result["incomplete"],
        "errors": result["errors"],
        "non_200": result["status_204"] + result["status_4xx"] + result["status_5xx"],
        "loadgen": result,
    }


async def _idle_memory(system: System, workload: Workload, running: Running) -> dict[str, Any]:
    """Resident memory per idle connection: fresh processes, then ``subscribers`` connections
    that receive nothing."""
    await asyncio.sleep(1.0)  # let the server settle after start
    server = procstat.family(running.server_pid)
    before = procstat.rss_bytes(server)
    loadgen, paths_file = await _start_loadgen(workload, running, duration=60, expect=0)
    try:
        await asyncio.sleep(2.0)
        after = procstat.rss_bytes(procstat.family(running.server_pid))
        if loadgen.returncode is not None:
            raise RuntimeError("the idle connections ended before they were measured")
    finally:
        if loadgen.returncode is None:
            loadgen.kill()
        await loadgen.wait()
        os.unlink(paths_file)
    return {
        "system": system.name,
        "workload": workload.label,
        **asdict(workload),
        "rss_before_mb": before / 1e6,
        "rss_after_mb": after / 1e6,
        "kb_per_idle_conn": (after - before) / 1024 / workload.subscribers,
    }
