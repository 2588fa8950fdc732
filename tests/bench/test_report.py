"""The summary: medians over rounds and per-round ratios."""

from __future__ import annotations

from typing import Any

from bench.report import markdown, summarise, void


def _run(round_: int, system: str, cpu: float, **more: Any) -> dict[str, Any]:
    return {
        "round": round_,
        "system": system,
        "workload": "A fan-out 100",
        "kind": "A",
        "subscribers": 100,
        "streams": 1,
        "cpu_us_per_token": cpu,
        "redis_cpu_us_per_token": 1.0,
        "latency_p99_ms": 2.0,
        "gaps": 0,
        "dups": 0,
        **more,
    }


def test_ratios_are_taken_within_a_round_then_the_median_over_rounds() -> None:
    runs = [
        _run(0, "tokenrelay", 4.0),
        _run(0, "floor", 2.0),
        _run(1, "tokenrelay", 9.0),  # a noisy round: both slower, the ratio holds
        _run(1, "floor", 3.0),
        _run(2, "tokenrelay", 5.0),
        _run(2, "floor", 2.0, gaps=1),
    ]
    rows = {r["system"]: r for r in summarise(runs)}
    ours = rows["tokenrelay"]
    assert ours["cpu_us_per_token"] == {"median": 5.0, "min": 4.0, "max": 9.0}
    assert ours["cpu_vs_floor"] == {"median": 2.5, "min": 2.0, "max": 3.0}
    assert ours["cpu_vs_tokenrelay"]["median"] == 1.0
    # With Redis: (4+1)/(2+1), (9+1)/(3+1), (5+1)/(2+1)
    assert ours["cpu_with_redis_vs_floor"]["median"] == 2.0
    assert rows["floor"]["gaps"] == 1
    table = markdown(list(rows.values()))
    assert "| A fan-out 100 | tokenrelay | 5.00 (4.00-9.00) |" in table


def test_a_system_that_did_not_follow_the_publisher_live_is_flagged_void() -> None:
    runs = [
        _run(0, "tokenrelay", 4.0, latency_p50_ms=1.5),
        _run(0, "tokenrelay@old", 0.4, latency_p50_ms=16_455.1),
    ]
    flagged = void(summarise(runs))
    assert "A fan-out 100 on tokenrelay@old: p50 16455 ms" in flagged
    assert "on tokenrelay:" not in flagged
    assert void(summarise(runs[:1])) == ""
