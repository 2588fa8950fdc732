"""The chaos harness: clients ask and follow answers through the local stack while faults are
injected at random.

    python -m bench.chaos [--seconds 60] [--clients 20] [--seed 1] [--out FILE]

It runs ``tokenrelay stack`` (haproxy, gateways, workers, Redis; the stack starts again any
process that dies) on free ports. ``--clients`` clients each ask for one answer after another
(the mock model: its text is known in advance) and follow it with the resuming client
(tokenrelay.client), through a proxy that cuts every connection after a random number of
bytes. Meanwhile, every few seconds, one fault from :data:`FAULTS`: a gateway killed or
stopped with SIGTERM, a worker killed or stopped (SIGSTOP) for longer than a job lease, Redis
stopped for a few seconds, or Redis restarted (it keeps nothing: the answers in flight are
lost, and say so).

Every answer must be the mock's text exactly (after any ``reset``), or end with a documented
error (:data:`DOCUMENTED`); anything else is a failure: a wrong text (a gap or a duplicate),
an undocumented ending, or a client that hangs. It prints the faults injected and the
outcomes, writes them to ``--out`` as JSON, and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenrelay.client import Reset, StreamCancelled, StreamFailed, TokenrelayClient
from tokenrelay.local_redis import free_port, free_port_block
from tokenrelay.stack import LocalStack, local_stack
from tokenrelay.topology import Topology
from worker.backends.mock import mock_text

#: Endings an answer may have besides its whole text, each documented in the README.
DOCUMENTED = frozenset(
    {
        "message_lost",  # Redis restarted without its data (a 404 on resume says the same)
        "worker_shutdown",  # a worker stopped past its grace
        "job_failed",  # a job that lost its worker too often (dead letters)
        "events_lost",  # a failover lost more than a worker could write again
    }
)
_LEASE_S = 3.0
_TOKEN_DELAY_MS = 15
_ENV = {
    "TOKENRELAY_MOCK_TOKEN_DELAY_MS": str(_TOKEN_DELAY_MS),
    "TOKENRELAY_COALESCE_MS": "0",
    "TOKENRELAY_RETRY_MS": "200",
    "TOKENRELAY_JOB_LEASE_S": str(_LEASE_S),
    "TOKENRELAY_JOB_MAX_ATTEMPTS": "5",
    "TOKENRELAY_HEARTBEAT_S": "2",
    "TOKENRELAY_SHUTDOWN_GRACE_S": "3",
    "TOKENRELAY_LOG_LEVEL": "error",
    "TOKENRELAY_FAULT_INJECTION": "1",
}
# An answer not finished this long after it was asked for is a hung client.
_HUNG_AFTER_S = 90.0


@dataclass
class Outcome:
    client: int
    prompt: str
    max_tokens: int
    kind: str  # complete, documented, or a failure: wrong_text, undocumented, hung
    detail: str = ""
    resets: int = 0
    reconnects: int = 0


@dataclass
class Tally:
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: list[Outcome] = field(default_factory=list)
    cuts: int = 0

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind not in ("complete", "documented")]


def classify(
    expected: str, text: str, ending: BaseException | None, resets: int
) -> tuple[str, str]:
    """An answer's outcome: ``complete``, ``documented`` or a failure, and a detail."""
    if ending is None:
        if text == expected:
            return "complete", f"{resets} reset(s)" if resets else ""
        return "wrong_text", f"got {len(text)} characters, expected {len(expected)}"
    if isinstance(ending, StreamFailed):
        kind = ending.error_type
        if kind == "http_error" and str(ending).startswith("404"):
            kind = "message_lost"  # the message went with Redis's data: the same, as a 404
        if kind in DOCUMENTED:
            return "documented", kind
        return "undocumented", f"{kind}: {ending}"
    if isinstance(ending, StreamCancelled):
        return "undocumented", f"cancelled: {ending}"  # nobody cancels here
    if isinstance(ending, TimeoutError):
        return "hung", str(ending) or "no end"
    return "undocumented", f"{type(ending).__name__}: {ending}"


class _CuttingProxy:
    """Forwards connections to ``target``, cutting each (both ways, abruptly) after a random
    number of bytes from the server: a flaky network."""

    def __init__(self, target: int, rng: random.Random, tally: Tally) -> None:
        self.port = free_port()
        self._target = target
        self._rng = rng
        self._tally = tally
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[bool]] = set()

    async def __aenter__(self) -> _CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.transport.abort()
            return
        budget = self._rng.randint(2_000, 40_000)
        pipes = (
            asyncio.create_task(_pipe(reader, up_writer, None)),
            asyncio.create_task(_pipe(up_reader, writer, budget)),
        )
        self._pipes.update(pipes)
        done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        if pipes[1] in done and not pipes[1].cancelled() and pipes[1].result():
            self._tally.cuts += 1
        for each in (writer, up_writer):
            each.transport.abort()
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: int | None
) -> bool:
    """Copy until the end; True when it stopped because ``budget`` bytes were copied."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(4096):
            if budget is not None:
                data, budget = data[:budget], budget - len(data)
            writer.write(data)
            await writer.drain()
            if budget is not None and budget <= 0:
                return True
    return False


async def _answer(client: TokenrelayClient, index: int, n: int, rng: random.Random) -> Outcome:
    prompt, max_tokens = f"chaos {index}-{n}", rng.randint(20, 80)
    expected = mock_text(prompt, max_tokens)
    text, resets, ending = "", 0, None
    stream = None
    try:
        async with asyncio.timeout(_HUNG_AFTER_S):
            stream = await _ask(client, prompt, max_tokens)
            async for piece in stream:
                if isinstance(piece, Reset):
                    resets += 1
                    text = ""
                else:
                    text += piece.text
    except (StreamFailed, StreamCancelled, TimeoutError) as exc:
        ending = exc
    kind, detail = classify(expected, text, ending, resets)
    reconnects = 0 if stream is None else stream.reconnects
    return Outcome(index, prompt, max_tokens, kind, detail, resets, reconnects)


async def _ask(client: TokenrelayClient, prompt: str, max_tokens: int) -> Any:
    """POST the question, retrying while no gateway can take it (faults) for up to a minute:
    a question that was never taken is not an answer."""
    for attempt in range(120):
        try:
            return await client.ask(prompt, max_tokens=max_tokens)
        except StreamFailed as exc:
            if not str(exc).startswith(("502", "503", "504")):
                raise
        except httpx.TransportError:
            pass  # the POST never got its answer (a gateway killed under it, say)
        await asyncio.sleep(min(2.0, 0.1 * (attempt + 1)))
    raise StreamFailed("no gateway took the question for a minute", "unreachable")


async def _client(index: int, url: str, until: float, rng: random.Random, tally: Tally) -> None:
    async with TokenrelayClient(
        url, initial_backoff_s=0.05, max_backoff_s=2.0, give_up_after_s=60.0
    ) as client:
        n = 0
        while time.monotonic() < until:
            tally.outcomes.append(await _answer(client, index, n, rng))
            n += 1


#: Each fault: what it does to the stack.
Fault = Callable[[LocalStack, random.Random], Awaitable[None]]


def _running(processes: dict[str, asyncio.subprocess.Process]) -> list[asyncio.subprocess.Process]:
    """The processes that run now (not one the stack is about to start again)."""
    return [p for p in processes.values() if p.returncode is None]


def _signal(processes: dict[str, asyncio.subprocess.Process], sig: int, rng: random.Random) -> None:
    running = _running(processes)
    if running:
        # It may have died since it was looked at: then there is nothing to signal.
        with contextlib.suppress(ProcessLookupError):
            rng.choice(running).send_signal(sig)


async def _kill_gateway(stack: LocalStack, rng: random.Random) -> None:
    _signal(stack.gateways, signal.SIGKILL, rng)


async def _term_gateway(stack: LocalStack, rng: random.Random) -> None:
    _signal(stack.gateways, signal.SIGTERM, rng)


async def _kill_worker(stack: LocalStack, rng: random.Random) -> None:
    _signal(stack.workers, signal.SIGKILL, rng)


async def _stop_worker(stack: LocalStack, rng: random.Random) -> None:
    """Longer than a lease: its jobs are taken over, and it finds itself fenced out."""
    running = _running(stack.workers)
    if running:
        await _paused(rng.choice(running), _LEASE_S + 1.5)


async def _stop_redis(stack: LocalStack, rng: random.Random) -> None:
    if stack.redis is not None:
        await _paused(stack.redis, rng.uniform(1.0, 4.0))


async def _restart_redis(stack: LocalStack, rng: random.Random) -> None:
    await stack.restart_redis(down_s=rng.uniform(0.2, 1.5))


async def _paused(process: asyncio.subprocess.Process, seconds: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            process.send_signal(signal.SIGCONT)


FAULTS: dict[str, Fault] = {
    "gateway SIGKILL": _kill_gateway,
    "gateway SIGTERM": _term_gateway,
    "worker SIGKILL": _kill_worker,
    "worker SIGSTOP past its lease": _stop_worker,
    "Redis SIGSTOP": _stop_redis,
    "Redis restart": _restart_redis,
}


async def _inject(stack: LocalStack, until: float, rng: random.Random, tally: Tally) -> None:
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(2.0, 6.0))
        if time.monotonic() >= until:
            return
        name = rng.choice(list(FAULTS))
        tally.faults[name] += 1
        await FAULTS[name](stack, rng)


async def run(seconds: float, clients: int, seed: int) -> Tally:
    rng = random.Random(seed)
    tally = Tally()
    topology = Topology(2, 2, free_port(), free_port(), free_port_block(2))
    async with (
        local_stack(topology, env={**os.environ, **_ENV}) as stack,
        _CuttingProxy(topology.lb_port, random.Random(rng.random()), tally) as proxy,
    ):
        until = time.monotonic() + seconds
        url = f"http://127.0.0.1:{proxy.port}"
        tasks = [
            asyncio.create_task(_client(i, url, until, random.Random(rng.random()), tally))
            for i in range(clients)
        ]
        injecting = asyncio.create_task(_inject(stack, until, random.Random(rng.random()), tally))
        await asyncio.gather(injecting, *tasks)
    return tally


def report(tally: Tally, seconds: float, clients: int, seed: int) -> dict[str, Any]:
    kinds = collections.Counter(o.kind for o in tally.outcomes)
    documented = collections.Counter(o.detail for o in tally.outcomes if o.kind == "documented")
    return {
        "seconds": seconds,
        "clients": clients,
        "seed": seed,
        "answers": len(tally.outcomes),
        "faults": dict(tally.faults),
        "connection_cuts": tally.cuts,
        "outcomes": dict(kinds),
        "documented_endings": dict(documented),
        "answers_with_a_reset": sum(1 for o in tally.outcomes if o.resets),
        "reconnects": sum(o.reconnects for o in tally.outcomes),
        "failures": [o.__dict__ for o in tally.failures],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long faults go on")
    parser.add_argument("--clients", type=int, default=20, help="clients asking at once")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="random seed")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    started = time.time()
    tally = asyncio.run(run(args.seconds, args.clients, args.seed))
    results = report(tally, args.seconds, args.clients, args.seed)
    results["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    results["wall_s"] = round(time.time() - started, 1)
    print(f"chaos: {args.seconds:.0f} s, {args.clients} clients, seed {args.seed}")
    print("faults injected: " + ", ".join(f"{k} x{v}" for k, v in sorted(tally.faults.items())))
    print(f"connections cut by the proxy: {tally.cuts}")
    print(
        f"answers: {results['answers']}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(results["outcomes"].items()))
    )
    if results["documented_endings"]:
        print(
            "documented endings: "
            + ", ".join(f"{k} {v}" for k, v in sorted(results["documented_endings"].items()))
        )
    print(
        f"answers with a reset: {results['answers_with_a_reset']}; reconnects: "
        f"{results['reconnects']}"
    )
    for failure in tally.failures[:20]:
        print(
            f"FAILURE {failure.kind}: {failure.prompt} ({failure.max_tokens} tokens): "
            f"{failure.detail}",
            file=sys.stderr,
        )
    if args.out:
        with open(args.out, "w") as out:
            json.dump(results, out, indent=2)
    return 1 if tally.failures or not tally.outcomes else 0


if __name__ == "__main__":
    sys.exit(main())
