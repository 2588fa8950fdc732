"""docker-compose.yml and the local topology describe the same services, ports and settings."""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

from tokenrelay.topology import GATEWAY_PORT, LB_PORT, REDIS_PORT, Topology, haproxy_config

COMPOSE = pathlib.Path(__file__).parents[2] / "docker-compose.yml"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_the_same_services() -> None:
    topology = Topology()
    services = _compose()["services"]
    assert set(services) == {"redis", "lb", *topology.gateway_names(), *topology.worker_names()}


def test_the_same_commands_ports_and_settings() -> None:
    topology = Topology()
    services = _compose()["services"]
    for name in topology.gateway_names():
        assert services[name]["command"] == [
            "gateway",
            "--host",
            "0.0.0.0",
            "--port",
            str(GATEWAY_PORT),
        ]
    for name in topology.worker_names():
        assert services[name]["command"] == ["worker"]
    for name in [*topology.gateway_names(), *topology.worker_names()]:
        assert services[name]["environment"] == {"REDIS_URL": f"redis://redis:{REDIS_PORT}/0"}
    assert services["lb"]["ports"] == [f"{LB_PORT}:{LB_PORT}"]
    assert topology.lb_port == LB_PORT


def test_the_same_load_balancer_configuration() -> None:
    topology = Topology()
    backends = [(name, name, GATEWAY_PORT) for name in topology.gateway_names()]
    assert _compose()["configs"]["haproxy"]["content"] == haproxy_config(LB_PORT, backends)
