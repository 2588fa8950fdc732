"""Settings: read once from the environment, every bad value named, documented in the README."""

from __future__ import annotations

import pathlib

import pytest

from shared.errors import ConfigError
from shared.settings import DEFAULT_REDIS_URL, Settings, settings_table


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url is None
    assert settings.effective_redis_url == DEFAULT_REDIS_URL
    assert settings.heartbeat_s == 15.0
    assert settings.coalesce_ms == 50.0


def test_values_are_read_and_cast() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://example:6380/2",
            "TOKENRELAY_HEARTBEAT_S": "2.5",
            "TOKENRELAY_STREAM_TTL_S": "60",
            "TOKENRELAY_COALESCE_MS": "0",
            "TOKENRELAY_LOG_LEVEL": "debug",
        }
    )
    assert settings.effective_redis_url == "redis://example:6380/2"
    assert (settings.heartbeat_s, settings.stream_ttl_s, settings.coalesce_ms) == (2.5, 60, 0.0)
    assert settings.log_level == "debug"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("TOKENRELAY_HEARTBEAT_S", "soon", "not a valid float"),
        ("TOKENRELAY_HEARTBEAT_S", "0", "below the minimum"),
        ("TOKENRELAY_HEARTBEAT_S", "nan", "not a finite number"),
        ("TOKENRELAY_STREAM_TTL_S", "1.5", "not a valid int"),
        ("TOKENRELAY_COALESCE_MS", "-1", "below the minimum"),
        ("TOKENRELAY_BACKEND", "gpt", "not one of mock"),
        ("TOKENRELAY_LOG_LEVEL", "loud", "not one of"),
        ("TOKENRELAY_JOB_BLOCK_MS", "20000", "must exceed TOKENRELAY_JOB_BLOCK_MS"),
        ("TOKENRELAY_DEFAULT_MAX_TOKENS", "9999", "exceeds TOKENRELAY_MAX_TOKENS_LIMIT"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as caught:
        Settings.from_env({name: value})
    assert name in str(caught.value)


def test_unknown_variables_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    Settings.from_env({"TOKENRELAY_HEARTBEAT": "5"})
    assert "unknown setting TOKENRELAY_HEARTBEAT" in caplog.text


def test_readme_documents_every_setting() -> None:
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    for name, default, _ in settings_table():
        assert f"| `{name}` | `{default}` |" in readme, name
