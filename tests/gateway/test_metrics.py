"""A gateway's /metrics, scraped while a message streams: the values move."""

from __future__ import annotations

import re

import httpx

from tests.support import Stack, parse_sse, read_stream


def _value(text: str, name: str, labels: str = "") -> float:
    """A sample of a Prometheus text exposition (0 when absent)."""
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    found = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def _scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_metrics_move_while_a_message_streams(stack: Stack) -> None:
    async with stack.client() as client:
        before = await _scrape(client)
        async with client.stream(
            "POST", "/chat/stream", json={"prompt": "metrics", "max_tokens": 20}
        ) as response:
            message_id = response.headers["x-message-id"]
            during = ""
            async for line in response.aiter_lines():
                if line.startswith("data:") and not during:
                    during = await _scrape(client)
        events = parse_sse(
            (await read_stream(client, "GET", f"/chat/stream/{message_id}"))[1]
        ).events
        await read_stream(
            client,
            "GET",
            f"/chat/stream/{message_id}",
            headers={"Last-Event-ID": events[5].id or ""},
        )
        after = await _scrape(client)
    assert _value(during, "tokenrelay_gateway_subscribers") >= 1
    delivered = "tokenrelay_gateway_events_delivered_total"
    assert _value(after, delivered) >= _value(before, delivered) + 2 * 21
    resumes = "tokenrelay_gateway_resumes_total"
    assert _value(after, resumes, 'outcome="memory"') + _value(
        after, resumes, 'outcome="redis"'
    ) >= 1 + _value(before, resumes, 'outcome="memory"') + _value(
        before, resumes, 'outcome="redis"'
    )
    assert _value(after, "tokenrelay_queue_jobs") >= 0
    assert "tokenrelay_redis_seconds_bucket" in after
    assert "# HELP tokenrelay_gateway_send_timeouts_total" in after
