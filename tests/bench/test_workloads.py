"""The benchmark harness, run for seconds: its load generator notices what it must notice.

These check counts, never timings (the figures are the benchmark's business, not the tests').
"""

from __future__ import annotations

import os
import shutil

import pytest

from bench import peers, systems
from bench.workloads import Workload, run

SUBSCRIBERS = 20
TOKENS = 30


@pytest.fixture(autouse=True)
def _tools() -> None:
    missing = [tool for tool in ("gcc", "redis-server") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the harness needs {missing}")
        pytest.skip(f"the harness needs {missing}")


@pytest.mark.timeout(120)
async def test_a_planted_gap_is_seen_by_every_subscriber() -> None:
    result = await run(
        peers.Floor(), Workload("A", SUBSCRIBERS, rate=300, tokens=TOKENS), plant="gap"
    )
    assert result["gaps"] == SUBSCRIBERS
    assert result["dups"] == 0
    assert result["delivered_tokens"] == SUBSCRIBERS * (TOKENS - 1)


@pytest.mark.timeout(120)
async def test_a_planted_duplicate_is_seen_by_every_subscriber() -> None:
    result = await run(
        peers.Floor(), Workload("A", SUBSCRIBERS, rate=300, tokens=TOKENS), plant="duplicate"
    )
    assert result["dups"] == SUBSCRIBERS
    assert result["gaps"] == 0


@pytest.mark.timeout(120)
async def test_tokenrelay_delivers_every_token_once_and_reads_redis_once() -> None:
    result = await run(systems.Tokenrelay(), Workload("A", SUBSCRIBERS, rate=300, tokens=TOKENS))
    assert result["delivered_tokens"] == SUBSCRIBERS * TOKENS
    assert result["gaps"] == result["dups"] == result["incomplete"] == 0
    # The fan-out reads nothing per token: at most a join's reads for the whole run.
    assert result["redis_cmds_per_token"] < 0.1
    assert result["latency_p50_ms"] >= 0


@pytest.mark.timeout(120)
async def test_a_storm_resumes_every_client_with_last_event_id() -> None:
    workload = Workload("C", SUBSCRIBERS, rate=100, tokens=80, storm_at=0.2)
    result = await run(systems.Tokenrelay(), workload)
    assert result["loadgen"]["reconnects"] == SUBSCRIBERS
    assert result["delivered_tokens"] == SUBSCRIBERS * 80
    assert result["gaps"] == result["dups"] == 0
    assert result["loadgen"]["back_ms"]["n"] == SUBSCRIBERS


@pytest.mark.timeout(120)
async def test_churning_clients_resume_where_they_left() -> None:
    workload = Workload("B", 10, streams=10, rate=50, tokens=20, churn_every=7)
    result = await run(systems.Tokenrelay(coalesce_ms=20), workload)
    assert result["loadgen"]["reconnects"] >= 10
    assert result["delivered_tokens"] == 10 * 20
    assert result["gaps"] == result["dups"] == 0


@pytest.mark.timeout(120)
async def test_idle_connections_are_measured() -> None:
    result = await run(peers.Floor(), Workload("M", 50))
    assert result["rss_after_mb"] >= result["rss_before_mb"] > 0


@pytest.mark.timeout(300)
async def test_the_resumable_stream_peer_streams_and_resumes_at_the_right_character() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("the resumable-stream peer needs Node.js and npm")
        pytest.skip("the resumable-stream peer needs Node.js and npm")
    # Every client drops and resumes (Last-Event-ID: its character offset) twice.
    workload = Workload("B", 10, streams=10, rate=50, tokens=20, churn_every=7)
    result = await run(peers.ResumableStream(), workload)
    assert result["loadgen"]["reconnects"] >= 10
    assert result["delivered_tokens"] == 10 * 20
    assert result["gaps"] == result["dups"] == 0
    # Its Redis commands are its own (the publisher writes to its stdin, not to Redis).
    assert result["redis_cmds_per_token"] > 0
