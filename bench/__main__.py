"""The side-by-side benchmark: tokenrelay's gateway, a naive gateway, Nchan and a C floor.

    python -m bench            # full: workloads A, B, C, D and idle memory, 3 rounds
    python -m bench --quick    # under 2 minutes: A at 100 and 1,000, a storm, idle memory
    python -m bench --smoke    # seconds: the harness works and notices a planted gap

Each run starts its system afresh, pinned to one core, with the load generator (compiled C),
Redis and the publisher on the other. Runs rotate the order of systems from round to round.
Prints a markdown table; writes every run and the summary as JSON under docs/bench/ (and, for a
full run, the charts).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bench import report, servers, systems
from bench.workloads import Workload, run
from shared import open_files

_OUT = Path(__file__).resolve().parent.parent / "docs" / "bench"

_STREAMING = ["tokenrelay", "tokenrelay+coalescing", "nchan", "naive", "floor"]
_RESUMING = ["tokenrelay", "nchan", "naive", "floor"]
# A storm with the worker's default coalescing too: fewer events for the same tokens.
_STORMING = ["tokenrelay", "tokenrelay+coalescing", "nchan", "naive", "floor"]
# The optional peer (Node.js and npm): in the full plan only, where A-D and M run on it too.
_OPTIONAL = ["resumable-stream"]
# The chat-like workload on a 3+3 Redis Cluster too: Redis CPU per append, each shard's share,
# and what durable mode costs.
_CLUSTER = ["tokenrelay-cluster", "tokenrelay-cluster-durable"]


def plan(quick: bool) -> list[tuple[Workload, list[str]]]:
    """What to run: each workload with the systems it runs on."""
    if quick:
        return [
            (Workload("A", 100, tokens=200), _STREAMING),
            (Workload("A", 1000, tokens=200), _STREAMING),
            (Workload("C", 1000, rate=20, tokens=100, storm_at=2.0), ["tokenrelay", "nchan"]),
            (Workload("M", 1000), _RESUMING),
        ]
    streaming, resuming, storming = (
        [*names, *_OPTIONAL] for names in (_STREAMING, _RESUMING, _STORMING)
    )
    chat = [*streaming, *_CLUSTER]
    return [
        *((Workload("A", n, tokens=500), streaming) for n in (100, 1000)),
        # 5,000 x 100 tokens/s would be 500,000 writes/s: past one core for every system.
        (Workload("A", 5000, rate=20, tokens=200), streaming),
        (Workload("A", 10_000, rate=20, tokens=200), ["tokenrelay", "tokenrelay+coalescing"]),
        # B with the default coalescing too, as chats run by default.
        (Workload("B", 100, streams=100, rate=20, tokens=100, churn_every=30), chat),
        (Workload("B", 1000, streams=1000, rate=5, tokens=40, churn_every=15), chat),
        (Workload("B", 5000, streams=5000, rate=1, tokens=10, churn_every=4), chat),
        *((Workload("C", n, rate=20, tokens=200, storm_at=2.0), storming) for n in (1000, 5000)),
        (Workload("D", 1000, tokens=500, slow_fraction=0.1), resuming),
        (Workload("M", 2000), resuming),
    ]


async def bench(
    rounds: int,
    quick: bool,
    only: set[str] | None,
    kinds: str | None = None,
    refs: Sequence[str] = (),
) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for round_ in range(rounds):
        for workload, names in plan(quick):
            if kinds is not None and workload.kind not in kinds:
                continue
            names = [n for n in names if only is None or n in only]
            for ref in refs:
                names = systems.with_ref(names, ref)
            shift = round_ % len(names) if names else 0
            for name in names[shift:] + names[:shift]:
                print(f"round {round_ + 1}/{rounds}: {workload.label} on {name}", file=sys.stderr)
                try:
                    result = await run(systems.ALL[name], workload)
                except Exception as exc:
                    # One system failing one workload is a finding, not the end of the run.
                    print(f"  failed: {exc!r}", file=sys.stderr)
                    result = {"system": name, "workload": workload.label, "error": repr(exc)}
                result["round"] = round_
                runs.append(result)
    return runs


async def smoke() -> int:
    """A few seconds: every subscriber of the floor notices the planted gap, and tokenrelay
    delivers every token once, in order."""
    subscribers = 20
    planted = await run(
        systems.ALL["floor"], Workload("A", subscribers, rate=200, tokens=40), plant="gap"
    )
    clean = await run(systems.ALL["tokenrelay"], Workload("A", subscribers, rate=200, tokens=40))
    checks = {
        "floor: each subscriber saw the planted gap": planted["gaps"] == subscribers,
        "floor: no duplicate": planted["dups"] == 0,
        "tokenrelay: every token delivered": clean["delivered_tokens"] == subscribers * 40,
        "tokenrelay: no gap, no duplicate": clean["gaps"] == clean["dups"] == 0,
    }
    for what, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    return 0 if all(checks.values()) else 1


def main() -> int:
    open_files.raise_limit()  # thousands of clients, from this process and the servers it starts
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a reduced plan, under 2 minutes")
    mode.add_argument("--smoke", action="store_true", help="seconds: the harness works")
    mode.add_argument(
        "--replot", action="store_true", help="redraw the charts from the results.json in --out"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    parser.add_argument("--systems", default=None, help="comma-separated subset of systems")
    parser.add_argument(
        "--kinds",
        default=None,
        help="only these workload kinds (letters, e.g. A or AC); results go to results-<kinds>",
    )
    parser.add_argument(
        "--ref",
        action="append",
        default=[],
        metavar="REF",
        help="also run the gateway of this git ref (a worktree) beside every tokenrelay system",
    )
    parser.add_argument("--out", type=Path, default=_OUT, help="where JSON and charts go")
    args = parser.parse_args()
    if servers.LOAD_CORE is not None:
        os.sched_setaffinity(0, {servers.LOAD_CORE})  # the publisher shares the load's core
    if args.smoke:
        return asyncio.run(smoke())
    if args.replot:
        rows = orjson.loads((args.out / "results.json").read_bytes())["summary"]
        for path in report.charts(rows, args.out):
            print(f"wrote {path}", file=sys.stderr)
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    only = set(args.systems.split(",")) if args.systems else None
    started = datetime.datetime.now(datetime.UTC)
    runs = asyncio.run(bench(rounds, args.quick, only, args.kinds, args.ref))
    rows = report.summarise(runs)
    table = report.markdown(rows) + report.failures(runs) + report.void(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "quick" if args.quick else "results"
    if args.kinds:
        name += f"-{args.kinds}"
    document = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "build": _build(),
        "refs": {ref: systems.resolve(ref) for ref in args.ref},
        "machine": _machine(),
        "rounds": rounds,
        "summary": rows,
        "runs": [
            {k: v for k, v in r.items() if k != "loadgen"} | {"loadgen": r.get("loadgen")}
            for r in runs
        ],
    }
    (args.out / f"{name}.json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    (args.out / f"{name}.md").write_text(table)
    if not args.quick and not args.kinds:
        for path in report.charts(rows, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _build() -> dict[str, Any] | None:
    """The commit measured, and whether the tree had changes on top of it (outside ``docs/``,
    where the results themselves go): figures are only worth as much as knowing what produced
    them."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"not recording the build: {error}", file=sys.stderr)
        return None
    return {"commit": commit, "changed": bool(status.strip())}


def _machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "server_core": servers.SERVER_CORE,
        "load_core": servers.LOAD_CORE,
    }


if __name__ == "__main__":
    raise SystemExit(main())
