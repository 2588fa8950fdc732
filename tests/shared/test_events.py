"""Entry ids and the event codec shared by writers and readers."""

from __future__ import annotations

from collections import Counter

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from shared import keys
from shared.events import EntryId, Event, Kind


def test_entry_ids_order_like_redis() -> None:
    assert EntryId.parse("5-10") > EntryId.parse("5-9") > EntryId.parse("4-99")
    assert str(EntryId.parse(b"1700000000000-3")) == "1700000000000-3"


@pytest.mark.parametrize(
    "text",
    [
        "", "5", "5-", "-5", "a-b", "1-2-3", " 1-2", "1" * 21 + "-0", "1-0\n",
        "\u0661\u0662-1",  # Arabic-Indic digits: int() reads them, Redis does not
        str(2**64) + "-0", b"1-x", b"\xff-1",
    ],
)  # fmt: skip
def test_malformed_entry_ids_are_rejected(text: str | bytes) -> None:
    with pytest.raises(ValueError, match="not a stream entry id"):
        EntryId.parse(text)


def test_announcement_and_entry_decode_to_the_same_event() -> None:
    data = b'"a b\\nc"'
    from_entry = Event.from_entry(b"7-1", {b"n": b"4", b"k": b"chunk", b"d": data})
    from_channel = Event.from_announcement(b"7-1 4 chunk " + data)
    assert from_entry == from_channel
    assert from_entry.kind is Kind.CHUNK
    assert not from_entry.kind.terminal
    assert Event.from_announcement(b"8-0 5 done ").kind.terminal


def test_every_key_of_a_message_shares_one_cluster_hash_tag() -> None:
    message_id = "abcDEF123_-abcDEF123_-"
    names = [
        keys.message_stream(message_id),
        keys.message_meta(message_id),
        keys.message_channel(message_id),
    ]
    assert {name[name.index("{") : name.index("}") + 1] for name in names} == {
        "{" + message_id + "}"
    }


@pytest.mark.parametrize("partitions", [1, 3, 16, 64])
def test_job_partitions_lie_evenly_over_the_slot_range(partitions: int) -> None:
    """So that any cluster whose shards hold even stretches of slots (as ``redis-cli
    --cluster create`` makes them) gets the partitions evenly."""
    slots = [key_slot(keys.jobs_stream(p, partitions).encode()) for p in range(partitions)]
    width = REDIS_CLUSTER_HASH_SLOTS / partitions
    assert [int(slot // width) for slot in slots] == list(range(partitions))
    for p in range(partitions):  # a partition's dead letters live in its slot
        dead = key_slot(keys.jobs_dead_stream(p, partitions).encode())
        assert dead == slots[p]
    spread = Counter(keys.job_partition(f"m{i:021d}", partitions) for i in range(10_000))
    assert len(spread) == partitions
    assert max(spread.values()) < 1.25 * 10_000 / partitions
