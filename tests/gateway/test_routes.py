"""The HTTP contract of /chat/stream, end to end over real sockets against a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import signal
from typing import cast

import orjson
import pytest

from shared import keys
from shared.redis_client import RedisClient
from shared.settings import Settings
from tests.support import (
    ON_BOTH,
    Stack,
    content_of,
    eventually,
    parse_sse,
    post_stream,
    queued_jobs,
    read_stream,
    run_worker,
    start_stack,
)
from tokenrelay.local_redis import answers, binary, free_port, redis_server_argv
from worker.backends.mock import mock_text, mock_tokens


@ON_BOTH
async def test_post_streams_the_exact_wire_format(stack: Stack) -> None:
    async with stack.client() as client:
        response, raw = await read_stream(
            client,
            "POST",
            "/chat/stream",
            json={"prompt": "wire", "stream": True, "max_tokens": 3},
            headers={"Accept": "text/event-stream"},
        )
    message_id = response.headers["x-message-id"]
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-length" not in response.headers
    ids = await _entry_ids(stack, message_id)
    expected = b"retry: %d\n" % stack.settings.retry_ms
    for entry_id, token in zip(ids, mock_tokens("wire", 3), strict=False):
        data = orjson.dumps({"id": message_id, "content": token})
        expected += b"id: " + entry_id.encode() + b"\ndata: " + data + b"\n\n"
    expected += b"id: " + ids[-1].encode() + b"\ndata: [DONE]\n\n"
    assert raw == expected


async def test_message_ids_are_unguessable(stack: Stack) -> None:
    async with stack.client() as client:
        ids = [
            (
                await client.post(
                    "/chat/stream", json={"prompt": "x", "stream": False, "max_tokens": 1}
                )
            ).json()["id"]
            for _ in range(3)
        ]
    assert len(set(ids)) == 3
    assert all(len(i) == 22 for i in ids)  # 16 random bytes, base64url


@ON_BOTH
async def test_stream_false_answers_the_whole_text(stack: Stack) -> None:
    async with stack.client() as client:
        response = await client.post(
            "/chat/stream", json={"prompt": "whole", "stream": False, "max_tokens": 40}
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "id": response.headers["x-message-id"],
        "content": mock_text("whole", 40),
    }


@ON_BOTH
async def test_resume_at_every_position_of_a_finished_stream(stack: Stack) -> None:
    async with stack.client() as client:
        message_id, full, _ = await post_stream(client, "finished", 25)
        for index, event in enumerate(full.events[:-1]):
            response, raw = await read_stream(
                client,
                "GET",
                f"/chat/stream/{message_id}",
                headers={"Last-Event-ID": event.id or ""},
            )
            assert response.status_code == 200
            assert parse_sse(raw).events == full.events[index + 1 :]
        _, raw = await read_stream(client, "GET", f"/chat/stream/{message_id}")
        assert parse_sse(raw).events == full.events
        final = await client.get(
            f"/chat/stream/{message_id}", headers={"Last-Event-ID": full.events[-1].id or ""}
        )
        assert final.status_code == 204


async def test_query_parameter_resumes_and_the_header_wins(stack: Stack) -> None:
    async with stack.client() as client:
        message_id, full, _ = await post_stream(client, "query", 10)
        _, raw = await read_stream(
            client, "GET", f"/chat/stream/{message_id}?last_event_id={full.events[3].id}"
        )
        assert parse_sse(raw).events == full.events[4:]
        # A browser EventSource keeps its URL on reconnect; the header holds the newer position.
        _, raw = await read_stream(
            client,
            "GET",
            f"/chat/stream/{message_id}?last_event_id={full.events[3].id}",
            headers={"Last-Event-ID": full.events[6].id or ""},
        )
        assert parse_sse(raw).events == full.events[7:]


@ON_BOTH
@pytest.mark.usefixtures("redis")
async def test_resume_at_every_position_of_a_live_stream(settings: Settings) -> None:
    """Every event id, taken while the answer is still being generated, resumes with no gap and
    no duplicate across the replay/live seam."""
    slow = dataclasses.replace(settings, mock_token_delay_ms=15.0)
    async with start_stack(slow) as stack, stack.client() as client:
        resumers: list[asyncio.Task[tuple[int, list[object]]]] = []
        async with client.stream(
            "POST",
            "/chat/stream",
            json={"prompt": "live seam", "max_tokens": 40},
            headers={"Accept": "text/event-stream"},
        ) as response:
            message_id = response.headers["x-message-id"]
            seen = b""
            async for chunk in response.aiter_bytes():
                seen += chunk
                parsed = parse_sse(seen)
                for index in range(len(resumers), len(parsed.events) - 1):
                    resumers.append(
                        asyncio.create_task(
                            _resume(stack, message_id, index, parsed.events[index].id)
                        )
                    )
        full = parse_sse(seen).events
        results = await asyncio.gather(*resumers)
    assert len(results) == len(full) - 1 == 40  # 40 chunks and [DONE]: 40 positions before the end
    for index, events in results:
        assert events == full[index + 1 :], f"resume after event {index}"


async def _resume(
    stack: Stack, message_id: str, index: int, event_id: str | None
) -> tuple[int, list[object]]:
    async with stack.client() as client:
        _, raw = await read_stream(
            client, "GET", f"/chat/stream/{message_id}", headers={"Last-Event-ID": event_id or ""}
        )
    return index, list(parse_sse(raw).events)


@pytest.mark.usefixtures("redis")
async def test_get_before_the_first_token_waits_for_it(settings: Settings) -> None:
    async with start_stack(settings, worker=False) as stack, stack.client() as client:
        message_id = await _submit_without_reading(stack)
        reader = asyncio.create_task(read_stream(client, "GET", f"/chat/stream/{message_id}"))
        await asyncio.sleep(0.3)
        assert not reader.done()  # waiting, not 404
        async with run_worker(settings):
            got, raw = await reader
    assert got.status_code == 200
    assert content_of(parse_sse(raw)) == mock_text("early", 5)


async def _submit_without_reading(stack: Stack) -> str:
    async with (
        stack.client() as client,
        client.stream(
            "POST",
            "/chat/stream",
            json={"prompt": "early", "max_tokens": 5},
            headers={"Accept": "text/event-stream"},
        ) as response,
    ):
        return response.headers["x-message-id"]


async def test_failure_ends_with_a_terminal_error_event(stack: Stack) -> None:
    async with stack.client() as client:
        message_id, parsed, _ = await post_stream(client, "boom [[fail_after=4]]", 10)
        *chunks, error = parsed.events
        assert [orjson.loads(e.data)["content"] for e in chunks] == mock_tokens(
            "boom [[fail_after=4]]", 10
        )[:4]
        assert error.event == "error"
        assert orjson.loads(error.data) == {
            "id": message_id,
            "error": {
                "type": "model_error",
                "message": "mock model failed after 4 tokens, as the prompt asked",
            },
        }
        after = await client.get(
            f"/chat/stream/{message_id}", headers={"Last-Event-ID": error.id or ""}
        )
        assert after.status_code == 204
        whole = await client.post(
            "/chat/stream", json={"prompt": "x [[fail_after=2]]", "stream": False}
        )
        assert whole.status_code == 502
        assert whole.json()["error"]["type"] == "model_error"


@pytest.mark.usefixtures("redis")
async def test_heartbeats_keep_an_idle_stream_alive(settings: Settings) -> None:
    quick = dataclasses.replace(settings, heartbeat_s=0.2)
    async with start_stack(quick, worker=False) as stack, stack.client() as client:
        message_id = await _submit_without_reading(stack)
        raw = b""
        async with client.stream("GET", f"/chat/stream/{message_id}") as response:
            async for chunk in response.aiter_bytes():
                raw += chunk
                if raw.count(b": ping\n") >= 2:
                    break
    assert parse_sse(raw).comments == ["ping", "ping"]


async def test_finished_stream_expires_after_its_ttl(
    settings: Settings, redis: RedisClient
) -> None:
    short = dataclasses.replace(settings, stream_ttl_s=1)
    async with start_stack(short) as stack, stack.client() as client:
        message_id, _, _ = await post_stream(client, "ttl", 3)
        assert 0 < await redis.pttl(keys.message_stream(message_id)) <= 1000
        assert 0 < await redis.pttl(keys.message_meta(message_id)) <= 1000
        await asyncio.sleep(1.2)
        response = await client.get(f"/chat/stream/{message_id}")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"


@ON_BOTH
@pytest.mark.usefixtures("redis")
async def test_cursor_older_than_retained_history_is_signalled(settings: Settings) -> None:
    trimmed = dataclasses.replace(settings, stream_maxlen=5)
    async with start_stack(trimmed) as stack, stack.client() as client:
        message_id, live, _ = await post_stream(client, "trim", 12)
        assert len(live.events) == 13  # the live stream itself lost nothing
        # The 5 retained entries: two chunks, the finish reason and usage (which the seed format
        # does not show), and the end.
        kept = live.events[-3:]
        _, raw = await read_stream(
            client,
            "GET",
            f"/chat/stream/{message_id}",
            headers={"Last-Event-ID": live.events[2].id or ""},
        )
        gap, *rest = parse_sse(raw).events
        assert gap.event == "truncated"
        assert gap.id is None  # a synthetic frame is no resume position
        assert "id:" not in raw.split(b"event: truncated")[1].split(b"\n\n")[0].decode()
        assert orjson.loads(gap.data) == {
            "id": message_id,
            "last_event_id": live.events[2].id,
            "resumes_at": kept[0].id,
        }
        assert [(e.data, e.id) for e in rest] == [(e.data, e.id) for e in kept]
        _, raw = await read_stream(client, "GET", f"/chat/stream/{message_id}")
        from_start = parse_sse(raw).events
        assert from_start[0].event == "truncated"
        assert orjson.loads(from_start[0].data)["last_event_id"] is None


async def test_a_cursor_past_the_newest_event_starts_again_with_a_reset(stack: Stack) -> None:
    """An id just past the newest event is one a failover lost (before anyone marked the
    message): the client is not told 400, it starts again after a reset without an id."""
    async with stack.client() as client:
        message_id, live, _ = await post_stream(client, "lost", 3)
        newest = live.events[-1].id or ""
        lost = f"{int(newest.split('-')[0]) + 1}-0"
        _, raw = await read_stream(
            client, "GET", f"/chat/stream/{message_id}", headers={"Last-Event-ID": lost}
        )
        reset, *rest = parse_sse(raw).events
        assert reset.event == "reset"
        assert reset.id is None
        assert orjson.loads(reset.data) == {"id": message_id, "reason": "events_lost"}
        assert [(e.data, e.id) for e in rest] == [(e.data, e.id) for e in live.events]


@pytest.mark.parametrize(
    ("body", "status", "error_type", "fragment"),
    [
        (b"{not json", 400, "invalid_json", "not valid JSON"),
        (b"[1, 2]", 422, "invalid_request", "JSON object"),
        (b"{}", 422, "invalid_request", "'prompt' is required"),
        (b'{"prompt": 5}', 422, "invalid_request", "'prompt' must be a string"),
        (b'{"prompt": "  "}', 422, "invalid_request", "must not be empty"),
        (b'{"prompt": "x", "stream": "yes"}', 422, "invalid_request", "'stream'"),
        (
            b'{"prompt": "x", "max_tokens": "5"}',
            422,
            "invalid_request",
            "'max_tokens' must be an integer",
        ),
        (
            b'{"prompt": "x", "max_tokens": true}',
            422,
            "invalid_request",
            "'max_tokens' must be an integer",
        ),
        (b'{"prompt": "x", "max_tokens": 0}', 422, "invalid_request", "between 1 and"),
        (b'{"prompt": "x", "max_tokens": 5000}', 422, "invalid_request", "between 1 and"),
        (
            b'{"prompt": "x", "temperature": 1}',
            422,
            "invalid_request",
            "unknown field(s): temperature",
        ),
        (b'{"prompt": "' + b"y" * 101 + b'"}', 413, "payload_too_large", "101 characters"),
        (b'{"prompt": "' + b"y" * 40_000 + b'"}', 413, "payload_too_large", "request body"),
    ],
)
async def test_bad_post_bodies_get_a_json_error(
    settings: Settings, redis: RedisClient, body: bytes, status: int, error_type: str, fragment: str
) -> None:
    small = dataclasses.replace(settings, max_prompt_chars=100)
    async with start_stack(small, worker=False) as stack, stack.client() as client:
        response = await client.post(
            "/chat/stream", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == status
        error = response.json()["error"]
        assert error["type"] == error_type
        assert fragment in error["message"]
        assert await queued_jobs(redis) == 0  # nothing was queued


async def test_accept_that_excludes_the_answer_is_406(stack: Stack) -> None:
    async with stack.client() as client:
        response = await client.post(
            "/chat/stream",
            json={"prompt": "x", "stream": True},
            headers={"Accept": "application/json"},
        )
        assert response.status_code == 406
        assert response.json()["error"]["type"] == "not_acceptable"


async def test_unknown_routes_and_methods_get_json_errors(stack: Stack) -> None:
    async with stack.client() as client:
        missing = await client.get("/nowhere")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found"
        wrong = await client.delete("/chat/stream")
        assert wrong.status_code == 405
        assert wrong.json()["error"]["type"] == "method_not_allowed"
        assert wrong.headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("cursor", "status", "fragment"),
    [
        ("abc", 400, "is not an event id"),
        ("12-", 400, "is not an event id"),
        ("1-2-3", 400, "is not an event id"),
        ("9" * 30 + "-0", 400, "is not an event id"),
        ("18446744073709551616-0", 400, "is not an event id"),  # past Redis' 64-bit range
        ("1-0", 400, "is not an event of message"),
        ("99999999999999-0", 400, "is not an event of message"),
    ],
)
async def test_bad_cursors_are_400(stack: Stack, cursor: str, status: int, fragment: str) -> None:
    async with stack.client() as client:
        message_id, _, _ = await post_stream(client, "cursor", 3)
        refused = stack.hub.counters.resumes_refused
        for headers, params in (({"Last-Event-ID": cursor}, {}), ({}, {"last_event_id": cursor})):
            response = await client.get(
                f"/chat/stream/{message_id}", headers=headers, params=params
            )
            assert response.status_code == status
            assert response.json()["error"]["type"] == "bad_request"
            assert fragment in response.json()["error"]["message"]
        assert stack.hub.counters.resumes_refused == refused + 2  # counted as refused resumes


async def test_unknown_message_is_404(stack: Stack) -> None:
    async with stack.client() as client:
        for message_id in ("A" * 22, "not-an-id", "x" * 200):
            response = await client.get(f"/chat/stream/{message_id}")
            assert response.status_code == 404
            assert response.json()["error"]["type"] == "not_found"
        # What the path said is repeated in the error, but not without bound.
        response = await client.get(f"/chat/stream/{'A' * 8000}")
        assert response.status_code == 404
        assert len(response.content) < 300
        response = await client.get(f"/v1/responses/resp_{'A' * 8000}")
        assert response.status_code == 404
        assert len(response.content) < 400


@pytest.mark.usefixtures("redis")
async def test_readiness_answers_within_seconds_while_redis_is_stopped(
    settings: Settings, tmp_path: pathlib.Path
) -> None:
    port = free_port()
    argv = redis_server_argv(binary("redis-server"), port, str(tmp_path))
    server = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    try:
        private = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{port}/0")
        await eventually(lambda: answers(port))
        async with start_stack(private, worker=False) as stack, stack.client() as client:
            assert (await client.get("/readyz")).status_code == 200
            server.send_signal(signal.SIGSTOP)
            try:
                async with asyncio.timeout(10):  # the client's retries alone take 40 s
                    stalled = await client.get("/readyz")
            finally:
                server.send_signal(signal.SIGCONT)
            assert stalled.status_code == 503
            assert stalled.json()["error"]["type"] == "unavailable"
            assert stalled.headers["retry-after"] == "1"
            assert (await client.get("/readyz")).status_code == 200
    finally:
        server.kill()
        await server.wait()


async def test_a_join_whose_redis_never_answers_is_sent_to_retry(
    settings: Settings, tmp_path: pathlib.Path
) -> None:
    """A join waits out a failover, but not a Redis (a shard) that stays silent: the stream
    GET answers 200 with the retry hint and closes, as for Redis unreachable."""
    port = free_port()
    argv = redis_server_argv(binary("redis-server"), port, str(tmp_path))
    server = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    try:
        private = dataclasses.replace(
            settings, redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=1.0
        )
        await eventually(lambda: answers(port))
        async with start_stack(private, worker=False) as stack, stack.client() as client:
            assert (await client.get("/readyz")).status_code == 200
            server.send_signal(signal.SIGSTOP)
            try:
                async with asyncio.timeout(15):
                    stalled = await client.get(f"/chat/stream/{'B' * 22}")
            finally:
                server.send_signal(signal.SIGCONT)
            assert stalled.status_code == 200
            assert stalled.text.startswith("retry: ")
    finally:
        server.kill()
        await server.wait()


async def test_health_endpoints(stack: Stack) -> None:
    async with stack.client() as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        page = await client.get("/")
        assert page.status_code == 200
        assert "EventSource" in page.text


async def _entry_ids(stack: Stack, message_id: str) -> list[str]:
    redis: RedisClient = stack.app.state.gateway.redis
    entries = cast(list[tuple[bytes, object]], await redis.xrange(keys.message_stream(message_id)))
    return [raw_id.decode() for raw_id, _ in entries]
