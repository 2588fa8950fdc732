"""REDIS_URL: one Redis, a cluster by its seed nodes, a Sentinel-managed primary."""

from __future__ import annotations

import pytest

from shared.errors import ConfigError
from shared.redis_url import Topology, parse_redis_url
from shared.settings import Settings


def test_one_redis() -> None:
    target = parse_redis_url("redis://user:p%40ss@example:6380/2")
    assert (target.topology, target.nodes, target.db) == (
        Topology.STANDALONE,
        (("example", 6380),),
        2,
    )
    assert (target.username, target.password, target.tls) == ("user", "p@ss", False)
    assert "p@ss" not in target.description


def test_a_cluster_by_its_seed_nodes() -> None:
    target = parse_redis_url("rediss+cluster://10.0.0.1:7000,10.0.0.2,[::1]:7002/")
    assert target.topology is Topology.CLUSTER
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert target.tls


def test_a_sentinel_managed_primary() -> None:
    target = parse_redis_url("redis+sentinel://:secret@s1:26379,s2/mymaster/3")
    assert target.topology is Topology.SENTINEL
    assert target.nodes == (("s1", 26379), ("s2", 26379))
    assert (target.service, target.db, target.password) == ("mymaster", 3, "secret")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://example:6379", "the scheme must be"),
        ("redis+cloud://example", "the scheme must be"),
        ("redis://", "names no host"),
        ("redis://a:1,b:2/0", "several hosts"),
        ("redis://example:port/0", "is not host:port"),
        ("redis://example:70000/0", "is not host:port"),
        ("redis://example:6379/zero", "database number"),
        ("redis+cluster://a:1,b:2/3", "database 0 only"),
        ("redis+sentinel://s1:26379", "name the primary"),
        ("redis://:hunter2@example:6379/x", ":***@"),
    ],
)
def test_a_malformed_url_names_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("*", r"\*")) as raised:
        parse_redis_url(url)
    assert "hunter2" not in str(raised.value)


def test_settings_refuse_a_bad_url_and_durable_mode_without_replicas() -> None:
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Settings.from_env({"REDIS_URL": "redis+cluster://"})
    with pytest.raises(ConfigError, match="TOKENRELAY_READ_FROM_REPLICAS"):
        Settings.from_env({"TOKENRELAY_READ_FROM_REPLICAS": "1"})
    durable = Settings.from_env(
        {"REDIS_URL": "redis+cluster://a:1", "TOKENRELAY_READ_FROM_REPLICAS": "true"}
    )
    assert durable.read_from_replicas
