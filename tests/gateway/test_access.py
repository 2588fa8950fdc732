"""Access control through real HTTP against real Redis: API keys (Redis and file), tenants,
per-message tokens (scopes, expiry, tampering, rotation, the fast path), quotas, CORS, and
JSON-only POST bodies."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.message_tokens import READ, READ_CANCEL, TokenSigner
from shared import api_keys, keys
from shared.api_keys import Limits
from shared.redis_client import RedisClient
from shared.settings import Settings
from tests.support import Stack, parse_sse, start_stack

SECRET = "s" * 40
OLD_SECRET = "o" * 40
PROMPT = "who may read this"


@pytest.fixture
def secured(settings: Settings) -> Settings:
    return dataclasses.replace(settings, auth="keys", token_secret=SECRET)


async def _key(redis: RedisClient, tenant: str, **limits: int) -> tuple[str, str]:
    """A key stored in Redis: (its text, its id)."""
    text, key = api_keys.new_key(tenant, Limits(**limits))
    await api_keys.store_key(redis, key)
    return text, key.key_id


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _post(
    client: httpx.AsyncClient, key: str | None, max_tokens: int = 5, **extra: Any
) -> httpx.Response:
    """A non-streamed seed answer."""
    body = {"prompt": PROMPT, "stream": False, "max_tokens": max_tokens, **extra}
    return await client.post("/chat/stream", json=body, headers=_auth(key) if key else {})


async def _meta_count(redis: RedisClient) -> int:
    return len([k async for k in redis.scan_iter(match="tr:{*}:meta")])


@contextlib.asynccontextmanager
async def _running(
    settings: Settings, **kwargs: Any
) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    async with start_stack(settings, **kwargs) as stack, stack.client() as client:
        yield stack, client


async def test_a_request_without_a_working_key_is_refused_in_each_apis_shape(
    secured: Settings, redis: RedisClient
) -> None:
    key, key_id = await _key(redis, "acme")
    async with _running(secured) as (_, client):
        for credential in (None, "trk_0000000000000000_" + "x" * 43, "nonsense", key + "x"):
            seed = await _post(client, credential)
            assert seed.status_code == 401, credential
            assert seed.headers["www-authenticate"].startswith("Bearer")
            assert seed.json()["error"]["type"] == "unauthorized"
            v1 = await client.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                headers=_auth(credential) if credential else {},
            )
            assert v1.status_code == 401
            assert v1.json()["error"]["type"] == "invalid_request_error"
            assert v1.json()["error"]["code"] in ("invalid_api_key", "missing_credentials")
        assert await _meta_count(redis) == 0  # refused before anything was written
        answer = await _post(client, key)
        assert answer.status_code == 200
        assert answer.json()["token"].startswith("trt1.")
        assert await api_keys.revoke_key(redis, key_id)
        assert (await _post(client, key)).status_code == 401  # at once: no cache


async def test_keys_from_a_key_file(secured: Settings, redis: RedisClient, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    text, key = api_keys.new_key("filed", Limits())
    api_keys.append_to_key_file(str(path), key)
    assert await api_keys.load_key(redis, key.key_id) is None  # in the file only
    async with _running(dataclasses.replace(secured, api_keys_file=str(path))) as (_, client):
        assert (await _post(client, text)).status_code == 200
        other = text[:-1] + ("A" if text[-1] != "A" else "B")
        assert (await _post(client, other)).status_code == 401


async def test_another_tenants_message_is_missing_to_read_resume_and_cancel(
    secured: Settings, redis: RedisClient
) -> None:
    mine, _ = await _key(redis, "acme")
    theirs, _ = await _key(redis, "globex")
    colleague, _ = await _key(redis, "acme")
    async with _running(secured, worker=False) as (_, client):
        # No worker: the message stays queued, so cancel has something to cancel.
        async with client.stream(
            "POST", "/chat/stream", json={"prompt": PROMPT}, headers=_auth(mine)
        ) as created:
            assert created.status_code == 200
            message_id = created.headers["x-message-id"]
        path = f"/chat/stream/{message_id}"
        missing = f"/chat/stream/{'A' * 22}"
        for target in (path, missing):
            for cursor in ({}, {"Last-Event-ID": "0-1"}):
                answer = await client.get(target, headers={**_auth(theirs), **cursor})
                assert answer.status_code == 404
        gone = await client.get(missing, headers=_auth(theirs))
        assert (await client.get(path, headers=_auth(theirs))).json() == gone.json() | {
            "error": gone.json()["error"]
            | {"message": f"message {message_id} does not exist or has expired"}
        }
        assert (await client.post(f"{path}/cancel", headers=_auth(theirs))).status_code == 404
        v1 = f"/v1/chat/completions/{message_id}"
        assert (await client.post(f"{v1}/cancel", headers=_auth(theirs))).status_code == 404
        # Resuming by count tells nothing either: not whether it exists, nor its length.
        for target in (v1, f"/v1/chat/completions/{'A' * 22}"):
            for count in ("0", "1", "7", "x"):
                answer = await client.get(
                    f"{target}/stream", params={"after_chunk": count}, headers=_auth(theirs)
                )
                assert answer.status_code == 404, (target, count, answer.text)
        own = await client.get(f"{v1}/stream", params={"after_chunk": "1"}, headers=_auth(mine))
        assert own.status_code == 400  # for its tenant: no chunk 1 yet
        # The same tenant's other key may: the message is the tenant's, not the key's.
        cancelled = await client.post(f"{path}/cancel", headers=_auth(colleague))
        assert cancelled.status_code == 202
        async with client.stream("GET", path, headers=_auth(mine)) as followed:
            assert followed.status_code == 200
            events = parse_sse(await followed.aread()).events
        assert events[-1].event == "cancelled"


async def test_a_message_token_reads_from_a_url_and_its_scope_holds(
    secured: Settings, redis: RedisClient
) -> None:
    key, _ = await _key(redis, "acme")
    async with _running(secured) as (_, client):
        answer = await _post(client, key, max_tokens=8)
        message_id = answer.json()["id"]
        token, read_token = answer.json()["token"], answer.json()["read_token"]
        assert answer.headers["x-message-token"] == token
        path = f"/chat/stream/{message_id}"
        # A fresh EventSource-style request: no header but Last-Event-ID, the token in the URL.
        whole = await client.get(path, params={"token": read_token})
        assert whole.status_code == 200
        events = parse_sse(whole.content).events
        resumed = await client.get(
            path, params={"token": token}, headers={"Last-Event-ID": events[2].id or ""}
        )
        assert [e.id for e in parse_sse(resumed.content).events] == [e.id for e in events[3:]]
        # Scope, tampering, another message, expiry.
        forbidden = await client.post(f"{path}/cancel", params={"token": read_token})
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["code"] == "insufficient_scope"
        assert (await client.post(f"{path}/cancel", params={"token": token})).status_code == 409
        tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        assert (await client.get(path, params={"token": tampered})).status_code == 401
        other = (await _post(client, key)).json()["token"]
        assert (await client.get(path, params={"token": other})).status_code == 404
        expired = TokenSigner(SECRET, ttl_s=60).issue(message_id, READ, now_s=time.time() - 120)
        refused = await client.get(path, params={"token": expired})
        assert refused.status_code == 401
        assert "expired" in refused.json()["error"]["message"]
        # As a bearer credential too (a client that can send headers).
        assert (await client.get(path, headers=_auth(read_token))).status_code == 200
        assert (await client.get(path)).status_code == 401
        # The query takes message tokens only: not an API key, not anything else.
        for not_a_token in (key, "abc", ""):
            refused = await client.get(path, params={"token": not_a_token})
            assert refused.status_code == 401
            assert "message token" in refused.json()["error"]["message"]


async def test_rotation_accepts_the_previous_secret_until_it_is_dropped(
    secured: Settings, redis: RedisClient
) -> None:
    key, _ = await _key(redis, "acme")
    async with _running(dataclasses.replace(secured, token_secret=OLD_SECRET)) as (_, client):
        answer = await _post(client, key)
        message_id, old_token = answer.json()["id"], answer.json()["token"]
    path = f"/chat/stream/{message_id}"
    rotated = dataclasses.replace(secured, token_secret_previous=OLD_SECRET)
    async with _running(rotated) as (_, client):
        assert (await client.get(path, params={"token": old_token})).status_code == 200
        new_token = (await _post(client, key)).json()["token"]
        assert TokenSigner(SECRET, ttl_s=60).verify(new_token).scope == READ_CANCEL
    async with _running(secured, worker=False) as (_, client):
        assert (await client.get(path, params={"token": old_token})).status_code == 401


async def test_the_fast_path_answers_a_token_resume_and_leaves_the_rest_to_the_application(
    secured: Settings, redis: RedisClient
) -> None:
    key, _ = await _key(redis, "acme")
    theirs, _ = await _key(redis, "globex")
    slow = dataclasses.replace(secured, mock_token_delay_ms=30)
    async with (
        _running(slow) as (stack, client),
        client.stream(
            "POST",
            "/chat/stream",
            json={"prompt": PROMPT, "max_tokens": 60},
            headers=_auth(key),
        ) as created,
    ):
        message_id = created.headers["x-message-id"]
        token = created.headers["x-message-read-token"]
        path = f"/chat/stream/{message_id}"
        lines = created.aiter_lines()
        first_id = ""
        while not first_id:
            line = await anext(lines)
            first_id = line[4:] if line.startswith("id: ") else ""
        before = stack.hub.counters.fast_path_answers
        async with client.stream(
            "GET", path, params={"token": token}, headers={"Last-Event-ID": first_id}
        ) as resumed:
            assert resumed.status_code == 200
            assert stack.hub.counters.fast_path_answers == before + 1
            await resumed.aclose()
        # What the fast path does not answer, the application refuses the same way.
        for params, headers, status in (
            ({}, {}, 401),
            ({"token": token[:-1] + "x"}, {}, 401),
            ({}, _auth(theirs), 404),
        ):
            refused = await client.get(path, params=params, headers=headers)
            assert refused.status_code == status
        assert stack.hub.counters.fast_path_answers == before + 1
        async for _ in lines:  # the answer goes on to its end
            pass


async def test_a_hundred_racing_requests_against_a_limit_of_ten_admit_ten(
    secured: Settings, redis: RedisClient
) -> None:
    key, key_id = await _key(redis, "acme", max_concurrent=10)
    async with _running(secured, worker=False) as (_, client):

        async def ask() -> httpx.Response:
            async with client.stream(
                "POST", "/chat/stream", json={"prompt": PROMPT}, headers=_auth(key)
            ) as response:
                return response

        answers = await asyncio.gather(*(ask() for _ in range(100)))
        statuses = [a.status_code for a in answers]
        assert statuses.count(200) == 10
        assert statuses.count(429) == 90
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["x-ratelimit-limit-requests"] == "10"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert await redis.zcard(keys.quota_active(key_id)) == 10
        assert await _meta_count(redis) == 10  # the refused wrote nothing


async def test_tokens_per_minute_and_a_keys_own_request_limits(
    secured: Settings, redis: RedisClient
) -> None:
    key, _ = await _key(redis, "acme", tokens_per_minute=100, max_tokens=60, max_prompt_chars=50)
    async with _running(secured) as (_, client):
        first = await _post(client, key, max_tokens=60)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "100"
        assert first.headers["x-ratelimit-remaining-tokens"] == "40"
        second = await _post(client, key, max_tokens=60)
        assert second.status_code == 429
        assert 1 <= int(second.headers["retry-after"]) <= 60
        assert second.json()["error"]["code"] == "rate_limit_exceeded"
        too_long = await _post(client, key, max_tokens=61)
        assert too_long.status_code == 422
        assert "between 1 and 60" in too_long.json()["error"]["message"]
        v1 = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x" * 80}]},
            headers=_auth(key),
        )
        assert v1.status_code == 400
        assert v1.json()["error"]["code"] == "context_length_exceeded"
    # A request larger than a whole minute's tokens could never be admitted: refused for good,
    # not 429 (which clients retry); one that names no max_tokens gets at most a minute's.
    small, _ = await _key(redis, "acme", tokens_per_minute=100)
    async with _running(secured) as (_, client):
        beyond = await _post(client, small, max_tokens=101)
        assert beyond.status_code == 422
        assert "between 1 and 100" in beyond.json()["error"]["message"]
        unnamed = await client.post(
            "/chat/stream", json={"prompt": PROMPT, "stream": False}, headers=_auth(small)
        )
        assert unnamed.status_code == 200
        assert unnamed.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_a_finished_generation_no_longer_counts(
    secured: Settings, redis: RedisClient
) -> None:
    key, key_id = await _key(redis, "acme", max_concurrent=1)
    async with _running(secured) as (_, client):
        for _ in range(3):
            assert (await _post(client, key)).status_code == 200
            # Its worker reports the end just after the final event.
            for _ in range(500):
                if await redis.zcard(keys.quota_active(key_id)) == 0:
                    break
                await asyncio.sleep(0.01)
            assert await redis.zcard(keys.quota_active(key_id)) == 0


async def test_cors_answers_listed_origins_only(secured: Settings, redis: RedisClient) -> None:
    allowed = "https://app.example.com"
    key, _ = await _key(redis, "acme")
    cors = dataclasses.replace(secured, cors_origins=f"{allowed},https://other.example.com")
    async with _running(cors) as (_, client):
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        ok = await client.options("/chat/stream", headers={"Origin": allowed, **preflight})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == allowed
        assert ok.headers["access-control-allow-credentials"] == "true"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        assert "origin" in ok.headers["vary"].lower()
        foreign = await client.options(
            "/chat/stream", headers={"Origin": "https://evil.example", **preflight}
        )
        assert foreign.status_code == 400
        assert "access-control-allow-origin" not in foreign.headers
        answer = await client.post(
            "/chat/stream",
            json={"prompt": PROMPT, "stream": False, "max_tokens": 3},
            headers={"Origin": allowed, **_auth(key)},
        )
        assert answer.headers["access-control-allow-origin"] == allowed
        assert "x-message-token" in answer.headers["access-control-expose-headers"]
        # An EventSource from the page: answered by the application, with the CORS headers.
        followed = await client.get(
            f"/chat/stream/{answer.json()['id']}",
            params={"token": answer.json()["read_token"]},
            headers={"Origin": allowed},
        )
        assert followed.status_code == 200
        assert followed.headers["access-control-allow-origin"] == allowed
        stranger = await client.get(
            f"/chat/stream/{answer.json()['id']}",
            params={"token": answer.json()["read_token"]},
            headers={"Origin": "https://evil.example"},
        )
        assert "access-control-allow-origin" not in stranger.headers


async def test_without_cors_settings_no_cors_header_is_sent(stack: Stack) -> None:
    async with stack.client() as client:
        answer = await client.options(
            "/chat/stream",
            headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in answer.headers
        assert answer.status_code == 405


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_a_post_body_that_is_not_declared_json_gets_415(
    secured: Settings, redis: RedisClient, content_type: str | None
) -> None:
    key, _ = await _key(redis, "acme")
    body = json.dumps({"prompt": PROMPT}).encode()
    async with _running(secured, worker=False) as (_, client):
        for path in ("/chat/stream", "/v1/chat/completions"):
            request = client.build_request("POST", path, content=body, headers=_auth(key))
            request.headers.pop("content-type", None)
            if content_type is not None:
                request.headers["content-type"] = content_type
            answer = await client.send(request)
            assert answer.status_code == 415
            assert "Content-Type: application/json" in answer.json()["error"]["message"]
        assert await _meta_count(redis) == 0
        # The POSTs that take no body refuse one that a foreign page could send too.
        async with client.stream(
            "POST", "/chat/stream", json={"prompt": PROMPT}, headers=_auth(key)
        ) as created:
            message_id = created.headers["x-message-id"]
        for path in (
            f"/chat/stream/{message_id}/cancel",
            f"/v1/chat/completions/{message_id}/cancel",
            f"/v1/responses/resp_{message_id}/cancel",
            "/api/chat/some-chat/stop",
        ):
            request = client.build_request("POST", path, content=b"x=1", headers=_auth(key))
            request.headers.pop("content-type", None)
            if content_type is not None:
                request.headers["content-type"] = content_type
            assert (await client.send(request)).status_code == 415, path
        assert (await redis.hget(keys.message_meta(message_id), "cancel")) is None


async def test_the_official_openai_client_with_a_valid_and_a_revoked_key(
    secured: Settings, redis: RedisClient
) -> None:
    key, key_id = await _key(redis, "acme")
    async with _running(secured) as (stack, _):
        client = openai.AsyncOpenAI(api_key=key, base_url=f"{stack.url}/v1", max_retries=0)
        try:
            completion = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=4
            )
            assert completion.choices[0].message.content
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hello"}], stream=True
            )
            assert [chunk async for chunk in stream]
            await api_keys.revoke_key(redis, key_id)
            with pytest.raises(openai.AuthenticationError):
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hello"}]
                )
        finally:
            await client.close()


async def test_every_secret_is_compared_in_constant_time(
    secured: Settings, redis: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    key, _ = await _key(redis, "acme")
    async with _running(secured) as (_, client):
        answer = await _post(client, key)
        assert len(compared) == 1  # the key's secret
        await client.get(f"/chat/stream/{answer.json()['id']}", params={"token": "trt1.x"})
        token = answer.json()["token"]
        await client.get(f"/chat/stream/{answer.json()['id']}", params={"token": token})
        assert len(compared) == 2  # the malformed token is refused by its shape alone
        assert compared[-1][1] == token.rsplit(".", 1)[1]
