"""The tokenrelay command: help, configuration errors, and the embedded dev mode as users run it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import httpx
import pytest

from shared.settings import settings_table
from tests.support import parse_sse
from tokenrelay.local_redis import free_port
from worker.backends.mock import mock_text


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenrelay", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def _wait_until_it_answers(url: str, process: subprocess.Popen[str], *, timeout_s: float) -> None:
    """Until ``url`` answers 200; fails if ``process`` exits or the time runs out first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise AssertionError(f"{url} did not answer 200 within {timeout_s:g} s")
        time.sleep(0.1)


@pytest.mark.parametrize("command", [[], ["gateway"], ["worker"], ["dev"]])
def test_help_describes_every_option_and_setting(command: list[str]) -> None:
    result = _run(*command, "--help")
    assert result.returncode == 0
    for name, _, _ in settings_table():
        assert name in result.stdout
    if command in (["gateway"], ["dev"]):
        assert "--host" in result.stdout
        assert "--port" in result.stdout


def test_bad_setting_stops_the_process_naming_the_variable() -> None:
    result = _run("worker", env={**os.environ, "TOKENRELAY_HEARTBEAT_S": "often"})
    assert result.returncode == 2
    assert "TOKENRELAY_HEARTBEAT_S" in result.stderr


def test_dev_mode_embeds_fakeredis_and_serves_resumable_streams() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["TOKENRELAY_MOCK_TOKEN_DELAY_MS"] = "1"
    env["TOKENRELAY_COALESCE_MS"] = "0"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "dev", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_it_answers(f"{url}/healthz", process, timeout_s=20)
        assert "EventSource" in httpx.get(url).text
        with httpx.Client(base_url=url, timeout=20) as client:
            posted = client.post("/chat/stream", json={"prompt": "dev mode", "max_tokens": 20})
            events = parse_sse(posted.content).events
            message_id = posted.headers["x-message-id"]
            resumed = client.get(
                f"/chat/stream/{message_id}", headers={"Last-Event-ID": events[9].id or ""}
            )
            assert parse_sse(resumed.content).events == events[10:]
            whole = client.post(
                "/chat/stream", json={"prompt": "dev mode", "max_tokens": 20, "stream": False}
            )
            assert whole.json()["content"] == mock_text("dev mode", 20)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    # uvicorn re-raises SIGTERM after its graceful shutdown: the conventional signal exit.
    assert process.returncode in (0, -15), output
    assert "embedded fakeredis" in output
    assert "access control is off" in output  # and it says so
    assert "worker stopped" in output  # the embedded worker shut down before the process ended


def test_a_gateway_with_access_control_and_no_secret_does_not_start() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    result = _run("gateway", "--port", str(free_port()), env=env)
    assert result.returncode == 2
    assert "TOKENRELAY_TOKEN_SECRET" in result.stderr
    assert "TOKENRELAY_AUTH=off" in result.stderr


def test_keys_are_created_listed_and_revoked_in_redis(redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url}
    created = _run("keys", "create", "--tenant", "acme", "--max-concurrent", "3", "--json", env=env)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith(f"trk_{key['id']}_")
    listed = _run("keys", "list", "--json", env=env)
    found = {k["id"]: k for k in json.loads(listed.stdout)}
    assert (found[key["id"]]["tenant"], found[key["id"]]["limits"]["max_concurrent"]) == (
        "acme",
        3,
    )
    assert key["key"] not in listed.stdout
    assert "secret" not in listed.stdout
    assert _run("keys", "revoke", key["id"], env=env).returncode == 0
    remaining = json.loads(_run("keys", "list", "--json", env=env).stdout)
    assert key["id"] not in {k["id"] for k in remaining}
    again = _run("keys", "revoke", key["id"], env=env)
    assert again.returncode == 1
    assert "no key" in again.stderr
    refused = _run("keys", "create", "--tenant", "bad tenant!", env=env)
    assert refused.returncode == 2
    assert "tenant" in refused.stderr


def test_keys_in_a_key_file(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "keys.json")
    created = _run("keys", "create", "--tenant", "small", "--file", path, "--json")
    key = json.loads(created.stdout)
    stored = json.loads(pathlib.Path(path).read_text())
    assert stored[0]["id"] == key["id"]
    assert key["key"] not in pathlib.Path(path).read_text()
    assert "small" in _run("keys", "list", "--file", path).stdout
    assert _run("keys", "revoke", key["id"], "--file", path).returncode == 0
    assert json.loads(pathlib.Path(path).read_text()) == []


def test_a_gateway_of_several_processes_serves_and_counts_as_one(redis_url: str) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        "REDIS_URL": redis_url,
        "TOKENRELAY_AUTH": "off",
    }
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "gateway", "--workers", "2", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_it_answers(f"{url}/readyz", process, timeout_s=30)
        refused = 6
        for _ in range(refused):  # each on its own connection, answered by either process
            answer = httpx.get(f"{url}/healthz", headers={"x-big": "x" * 20_000}, timeout=5)
            assert answer.status_code == 431
        wanted = f'tokenrelay_gateway_refused_requests_total{{reason="head_too_large"}} {refused}.0'
        for _ in range(4):  # whichever process answers the scrape counts both
            assert wanted in httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "Started parent process" in output, output
    # Each process logs as a single one does (its refusals at info, in the one format).
    refusals = [line for line in output.splitlines() if "refusing a request head" in line]
    assert len(refusals) == refused, output
    assert all(" INFO gateway.server: " in line for line in refusals), refusals
