"""API keys: their text, their stored form (a hash, never the secret), Redis and file stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared import api_keys
from shared.api_keys import ApiKey, Limits
from shared.errors import ConfigError
from shared.redis_client import RedisClient


def test_a_key_is_stored_as_a_hash_and_matches_only_its_secret() -> None:
    text, key = api_keys.new_key("acme", Limits(max_concurrent=2))
    parsed = api_keys.parse_key(text)
    assert parsed is not None
    key_id, secret = parsed
    assert key_id == key.key_id
    assert secret not in json.dumps(key.to_dict())
    assert key.matches(secret)
    assert not key.matches(secret[:-1] + ("a" if secret[-1] != "a" else "b"))
    assert ApiKey.from_dict(key.to_dict()) == key


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        ({"id": "x", "tenant": "t", "secret_sha256": "0" * 64}, "16 hex"),
        ({"id": "0" * 16, "tenant": "t t", "secret_sha256": "0" * 64}, "tenant"),
        ({"id": "0" * 16, "tenant": "t", "secret_sha256": "0" * 64, "limits": {"x": 1}}, "x"),
        (
            {"id": "0" * 16, "tenant": "t", "secret_sha256": "0" * 64, "limits": {"max_tokens": 0}},
            "positive",
        ),
        ({"id": "0" * 16, "tenant": "t"}, "secret_sha256"),
    ],
)
def test_a_malformed_stored_key_is_refused_naming_the_problem(
    stored: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        ApiKey.from_dict(stored)


async def test_keys_in_redis_are_listed_and_revoked_at_once(redis: RedisClient) -> None:
    _, first = api_keys.new_key("acme", Limits())
    _, second = api_keys.new_key("globex", Limits(tokens_per_minute=10))
    for key in (first, second):
        await api_keys.store_key(redis, key)
    assert {k.key_id for k in await api_keys.list_keys(redis)} == {first.key_id, second.key_id}
    assert await api_keys.load_key(redis, second.key_id) == second
    assert await api_keys.revoke_key(redis, first.key_id)
    assert await api_keys.load_key(redis, first.key_id) is None
    assert not await api_keys.revoke_key(redis, first.key_id)
    assert [k.key_id for k in await api_keys.list_keys(redis)] == [second.key_id]


def test_a_key_file_round_trips_and_a_bad_one_stops_the_gateway(tmp_path: Path) -> None:
    path = str(tmp_path / "keys.json")
    _, key = api_keys.new_key("acme", Limits(max_tokens=9))
    api_keys.append_to_key_file(path, key)
    assert api_keys.read_key_file(path) == {key.key_id: key}
    assert oct(Path(path).stat().st_mode & 0o777) == "0o600"
    assert api_keys.remove_from_key_file(path, key.key_id)
    assert api_keys.read_key_file(path) == {}
    Path(path).write_text("{}")
    with pytest.raises(ConfigError, match="TOKENRELAY_API_KEYS_FILE"):
        api_keys.read_key_file(path)
    with pytest.raises(ConfigError, match="TOKENRELAY_API_KEYS_FILE"):
        api_keys.read_key_file(str(tmp_path / "missing.json"))
