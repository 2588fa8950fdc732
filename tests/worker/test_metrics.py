"""A worker's metrics, served on TOKENRELAY_WORKER_METRICS and scraped around a generation."""

from __future__ import annotations

import dataclasses
import re

import httpx

from shared.settings import Settings
from tests.support import read_stream, start_stack
from tokenrelay.local_redis import free_port


def _value(text: str, sample: str) -> float:
    found = re.search("^" + re.escape(sample) + r" (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_a_generation_moves_the_workers_metrics(settings: Settings) -> None:
    port = free_port()
    exported = dataclasses.replace(settings, worker_metrics=f"127.0.0.1:{port}")
    async with (
        start_stack(exported) as stack,
        stack.client() as client,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as scraper,
    ):
        before = (await scraper.get("/metrics")).text
        await read_stream(
            client, "POST", "/chat/stream", json={"prompt": "count me", "max_tokens": 12}
        )
        after = (await scraper.get("/metrics")).text
    chunks = 'tokenrelay_worker_events_appended_total{kind="chunk"}'
    assert _value(after, chunks) >= _value(before, chunks) + 12
    done = 'tokenrelay_worker_messages_total{outcome="done"}'
    assert _value(after, done) == _value(before, done) + 1
    first = "tokenrelay_worker_time_to_first_token_seconds_count"
    assert _value(after, first) == _value(before, first) + 1
    gaps = "tokenrelay_worker_inter_token_seconds_count"
    assert _value(after, gaps) >= _value(before, gaps) + 12
    assert _value(after, 'tokenrelay_redis_seconds_count{operation="append"}') > 0
    assert _value(after, "tokenrelay_worker_generations") == 0
