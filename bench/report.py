"""Turning runs into the published figures: medians over rounds, ratios, tables, charts."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Run = dict[str, Any]

#: Per-run figures summarised as a median over rounds (with min and max).
FIGURES = (
    "cpu_us_per_token",
    "redis_cpu_us_per_token",
    "redis_cpu_us_per_write",
    "replicas_cpu_us_per_write",
    "cpu_us_per_event",
    "tokens_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_p999_ms",
    "slow_latency_p50_ms",
    "first_token_p50_ms",
    "first_token_max_ms",
    "back_p50_ms",
    "back_p99_ms",
    "back_max_ms",
    "bytes_per_event",
    "redis_cmds_per_token",
    "server_core_busy",
    "loadgen_core_busy",
    "rss_mb",
    "kb_per_idle_conn",
)
#: Per-run counts summarised as totals over rounds.
COUNTS = ("gaps", "dups", "incomplete", "errors", "non_200")


def _median(values: Iterable[float | None]) -> dict[str, float] | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None
    return {"median": statistics.median(present), "min": min(present), "max": max(present)}


def summarise(runs: list[Run]) -> list[Run]:
    """One row per (workload, system): medians of figures, totals of counts, and the median
    over rounds of each round's ratio to tokenrelay and to the floor (same workload, same round)."""
    by_key: dict[tuple[str, str], list[Run]] = defaultdict(list)
    by_round: dict[tuple[int, str, str], Run] = {}
    for run in runs:
        if "error" in run:
            continue  # listed apart by failures()
        by_key[(run["workload"], run["system"])].append(run)
        by_round[(run["round"], run["workload"], run["system"])] = run
    rows = []
    for (workload, system), group in by_key.items():
        row: Run = {
            "workload": workload,
            "system": system,
            "kind": group[0]["kind"],
            "subscribers": group[0]["subscribers"],
            "streams": group[0]["streams"],
            "rounds": len(group),
        }
        for name in FIGURES:
            summary = _median(r.get(name) for r in group)
            if summary is not None:
                row[name] = summary
        for name in COUNTS:
            if any(name in r for r in group):
                row[name] = sum(r.get(name, 0) for r in group)
        row.update(_ratios(group, by_round))
        rows.append(row)
    return rows


def _ratios(group: list[Run], by_round: dict[tuple[int, str, str], Run]) -> Run:
    """CPU per token against tokenrelay's and the floor's in the same round, gateway alone and
    with Redis: the median over rounds, with its spread."""
    found: Run = {}
    for base in ("tokenrelay", "floor"):
        for name, with_redis in (("cpu", False), ("cpu_with_redis", True)):
            ratios = []
            for run in group:
                other = by_round.get((run["round"], run["workload"], base))
                if other is not None and "cpu_us_per_token" in run:
                    ratios.append(_cpu(run, with_redis) / _cpu(other, with_redis))
            summary = _median(ratios)
            if summary is not None:
                found[f"{name}_vs_{base}"] = summary
    return found


def _cpu(run: Run, with_redis: bool) -> float:
    cpu: float = run["cpu_us_per_token"]
    return cpu + run["redis_cpu_us_per_token"] if with_redis else cpu


def _fmt(row: Run, name: str, digits: int = 1) -> str:
    value = row.get(name)
    if value is None:
        return "-"
    if isinstance(value, dict):
        median, low, high = value["median"], value["min"], value["max"]
        if row["rounds"] > 1 and high > low:
            return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"
        return f"{median:.{digits}f}"
    return str(value)


def _ratio(row: Run, name: str) -> str:
    value = row.get(name)
    if value is None:
        return "-"
    text = f"{value['median']:.2f}x"
    if row["rounds"] > 1 and value["max"] > value["min"]:
        text += f" ({value['min']:.2f}-{value['max']:.2f})"
    return text


Column = tuple[str, Callable[[Run], str]]


def _figure(name: str, digits: int = 1) -> Callable[[Run], str]:
    return lambda row: _fmt(row, name, digits)


def _gaps(row: Run) -> str:
    return f"{row.get('gaps', 0)} / {row.get('dups', 0)}"


_TABLES: list[tuple[tuple[str, ...], list[Column]]] = [
    (
        ("A", "B"),
        [
            ("µs CPU / token (gateway)", _figure("cpu_us_per_token", 2)),
            ("+ Redis", _figure("redis_cpu_us_per_token", 2)),
            ("x tokenrelay", lambda r: _ratio(r, "cpu_vs_tokenrelay")),
            ("x floor", lambda r: _ratio(r, "cpu_vs_floor")),
            ("tokens/s", _figure("tokens_per_s", 0)),
            ("p50 ms", _figure("latency_p50_ms")),
            ("p99 ms", _figure("latency_p99_ms")),
            ("p99.9 ms", _figure("latency_p999_ms")),
            ("first token max ms", _figure("first_token_max_ms")),
            ("Redis cmds / token", _figure("redis_cmds_per_token", 4)),
            ("bytes / event", _figure("bytes_per_event", 0)),
            ("gaps / dups", _gaps),
            ("server core busy", lambda r: _pct(r, "server_core_busy")),
        ],
    ),
    (
        ("C",),
        [
            ("back on the live tail: p50 ms", _figure("back_p50_ms")),
            ("p99 ms", _figure("back_p99_ms")),
            ("max ms", _figure("back_max_ms")),
            ("µs CPU / token", _figure("cpu_us_per_token", 2)),
            ("gaps / dups", _gaps),
            ("incomplete clients", lambda r: str(r.get("incomplete", 0))),
        ],
    ),
    (
        ("D",),
        [
            ("others' p50 ms", _figure("latency_p50_ms")),
            ("others' p99 ms", _figure("latency_p99_ms")),
            ("slow readers' p50 ms", _figure("slow_latency_p50_ms", 0)),
            ("server RSS MB", _figure("rss_mb", 0)),
            ("µs CPU / token", _figure("cpu_us_per_token", 2)),
            ("gaps / dups", _gaps),
        ],
    ),
    (("M",), [("KB per idle connection", _figure("kb_per_idle_conn"))]),
]


def markdown(rows: list[Run]) -> str:
    """The tables of the README and of docs/bench: one per kind of workload."""
    out: list[str] = []
    for kinds, columns in _TABLES:
        selected = [r for r in rows if r["kind"] in kinds]
        if not selected:
            continue
        if out:
            out.append("")
        out.append("| workload | system | " + " | ".join(h for h, _ in columns) + " |")
        out.append("|---|---|" + "---|" * len(columns))
        for row in selected:
            cells = " | ".join(cell(row) for _, cell in columns)
            out.append(f"| {row['workload']} | {row['system']} | {cells} |")
    return "\n".join(out) + "\n"


def failures(runs: list[Run]) -> str:
    """The runs that failed, as a markdown list (empty when none did)."""
    failed = [r for r in runs if "error" in r]
    if not failed:
        return ""
    lines = ["", "Runs that failed:", ""]
    lines += [
        f"- round {r['round'] + 1}, {r['workload']} on {r['system']}: {r['error']}" for r in failed
    ]
    return "\n".join(lines) + "\n"


# Tokens are published a few milliseconds apart: a median latency past this means the system did
# not follow the publisher live (a --ref built before a change of the announcements' wire
# format hears none, and delivers only what its periodic re-reads find).
_VOID_P50_MS = 1_000.0


def void(rows: list[Run]) -> str:
    """The summarised rows whose figures do not measure live relaying, as a markdown list
    (empty when none)."""
    flagged = [r for r in rows if (_med(r, "latency_p50_ms") or 0.0) > _VOID_P50_MS]
    if not flagged:
        return ""
    lines = [
        "",
        "Void (a median latency over 1 s: the system did not follow the publisher live):",
        "",
    ]
    lines += [
        f"- {r['workload']} on {r['system']}: p50 {_med(r, 'latency_p50_ms'):.0f} ms"
        for r in flagged
    ]
    return "\n".join(lines) + "\n"


def _pct(row: Run, name: str) -> str:
    value = row.get(name)
    return "-" if value is None else f"{value['median']:.0%}"


def charts(rows: list[Run], directory: Path) -> list[Path]:
    """Latency and CPU per token against subscribers (workload A), one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fanout = [r for r in rows if r["kind"] == "A"]
    systems = sorted({r["system"] for r in fanout})
    written = []
    panels: list[tuple[str, str, Callable[[Run], float | None], bool]] = [
        ("latency.png", "p99 latency, ms (log)", lambda r: _med(r, "latency_p99_ms"), True),
        # Log too: a gateway that collapses (it delivers almost nothing) costs thousands of
        # µs per token, and a linear axis would flatten every other line to zero.
        (
            "cpu.png",
            "CPU µs per delivered token (log)",
            lambda r: _med(r, "cpu_us_per_token"),
            True,
        ),
    ]
    for filename, ylabel, value, log in panels:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for system in systems:
            points = sorted((r["subscribers"], value(r)) for r in fanout if r["system"] == system)
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=system)
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("subscribers of one stream (workload A: 100 tokens/s; 5,000+ at 20)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = directory / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _med(row: Run, name: str) -> float | None:
    value = row.get(name)
    return None if value is None else float(value["median"])
