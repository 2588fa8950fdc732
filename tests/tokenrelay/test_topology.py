"""docker-compose.yml and the local topology describe the same services, ports and settings."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import yaml
from prometheus_client import REGISTRY

import shared.metrics  # noqa: F401 - registers every metric
from tokenrelay.topology import GATEWAY_PORT, LB_PORT, REDIS_PORT, Topology, haproxy_config

COMPOSE = pathlib.Path(__file__).parents[2] / "docker-compose.yml"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_the_same_services() -> None:
    topology = Topology()
    services = _compose()["services"]
    monitoring = {
        name for name, service in services.items() if "monitoring" in service.get("profiles", [])
    }
    assert monitoring == {"prometheus", "grafana"}
    assert set(services) - monitoring == {
        "redis",
        "lb",
        *topology.gateway_names(),
        *topology.worker_names(),
    }


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
    url = f"redis://redis:{REDIS_PORT}/0"
    for name in topology.gateway_names():
        assert services[name]["environment"] == {"REDIS_URL": url, "TOKENRELAY_AUTH": "off"}
    for name in topology.worker_names():
        assert services[name]["environment"] == {
            "REDIS_URL": url,
            "TOKENRELAY_WORKER_METRICS": f"0.0.0.0:{WORKER_METRICS_PORT}",
        }
    assert services["lb"]["ports"] == [f"{LB_PORT}:{LB_PORT}"]
    assert topology.lb_port == LB_PORT


def test_the_same_load_balancer_configuration() -> None:
    topology = Topology()
    backends = [(name, name, GATEWAY_PORT) for name in topology.gateway_names()]
    assert _compose()["configs"]["haproxy"]["content"] == haproxy_config(LB_PORT, backends)


WORKER_METRICS_PORT = 9464
MONITORING = COMPOSE.parent / "monitoring"


def test_prometheus_scrapes_every_gateway_and_worker() -> None:
    topology = Topology()
    config: dict[str, Any] = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    assert targets == {
        "tokenrelay-gateways": [f"{n}:{GATEWAY_PORT}" for n in topology.gateway_names()],
        "tokenrelay-workers": [f"{n}:{WORKER_METRICS_PORT}" for n in topology.worker_names()],
    }


def test_the_dashboard_asks_only_for_metrics_that_exist() -> None:
    dashboard = json.loads((MONITORING / "grafana/dashboards/tokenrelay.json").read_text())
    asked = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"tokenrelay_\w+", target["expr"])
    }
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    exported = {
        metric.name + suffix
        for metric in REGISTRY.collect()
        if metric.name.startswith("tokenrelay_")
        for suffix in suffixes.get(metric.type, ("",))
    }
    assert asked
    assert asked <= exported, asked - exported


CLUSTER_COMPOSE = COMPOSE.with_name("docker-compose.cluster.yml")


def test_the_cluster_variant_runs_the_same_stack_on_six_nodes() -> None:
    topology = Topology()
    cluster: dict[str, Any] = yaml.safe_load(CLUSTER_COMPOSE.read_text())
    services = cluster["services"]
    nodes = {f"redis-{i}" for i in range(1, 7)}
    assert set(services) == {
        *nodes,
        "redis-cluster",
        "lb",
        *topology.gateway_names(),
        *topology.worker_names(),
    }
    assert all("--cluster-enabled" in services[node]["command"] for node in nodes)
    base = _compose()["services"]
    url = "redis+cluster://redis-1:6379,redis-2:6379,redis-3:6379"
    for name in [*topology.gateway_names(), *topology.worker_names()]:
        assert services[name]["command"] == base[name]["command"]
        assert services[name]["environment"] == {"REDIS_URL": url, "TOKENRELAY_AUTH": "off"}
    assert cluster["configs"] == _compose()["configs"]
