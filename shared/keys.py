"""Every Redis key and channel name tokenrelay uses, built in one place.

All keys of one message share the hash tag ``{<message id>}`` so they live in one Redis Cluster
slot: the append script touches them atomically, and a cluster needs no key migration. Jobs go
to one of several partition streams (``TOKENRELAY_JOB_PARTITIONS``), whose hash tags are chosen
so that the partitions' slots lie evenly across the slot range, and so across the shards of a
cluster. Channels are shard channels (SPUBLISH/SSUBSCRIBE): a message's channel lives in the
message's slot, a worker's cancellation channel in a slot of its own.
"""

from __future__ import annotations

import functools
import zlib

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

PREFIX = "tr"

#: The consumer group every worker joins on every jobs partition.
JOBS_GROUP = "workers"


@functools.cache
def _partition_tags(partitions: int) -> tuple[str, ...]:
    """For each partition, the first tag ``p<n>.<k>`` whose slot lies in its share of the
    slot range (so P partitions land on P even stretches of slots)."""
    tags = []
    for partition in range(partitions):
        low = partition * REDIS_CLUSTER_HASH_SLOTS // partitions
        high = (partition + 1) * REDIS_CLUSTER_HASH_SLOTS // partitions
        k = 0
        while not low <= key_slot(f"p{partition}.{k}".encode()) < high:
            k += 1
        tags.append(f"p{partition}.{k}")
    return tuple(tags)


def job_partition(message_id: str, partitions: int) -> int:
    """The partition a message's job goes to."""
    return zlib.crc32(message_id.encode()) % partitions


def jobs_stream(partition: int, partitions: int) -> str:
    """The consumer-group stream of one partition of the generation jobs."""
    return f"{PREFIX}:jobs:{{{_partition_tags(partitions)[partition]}}}"


def jobs_dead_stream(partition: int, partitions: int) -> str:
    """Jobs of a partition that lost their worker ``job_max_attempts`` times, kept for
    inspection (in the partition's slot)."""
    return f"{PREFIX}:jobs:dead:{{{_partition_tags(partitions)[partition]}}}"


def worker_channel(consumer: str) -> str:
    """The shard channel on which a worker hears cancellation requests for its generations
    (payload: the message id)."""
    return f"{PREFIX}:{{w:{consumer}}}:cancel"


def worker_alive(consumer: str) -> str:
    """A string that exists while the worker named ``consumer`` in the jobs group lives (it
    renews the key's expiry): Redis 7.0's consumer idle time grows while a live worker's
    blocking reads find nothing, so it cannot tell a gone worker from a quiet one."""
    return f"{PREFIX}:worker:{consumer}:alive"


def message_stream(message_id: str) -> str:
    """The Redis Stream holding a message's events; entry ids are the SSE ``id:`` values."""
    return f"{PREFIX}:{{{message_id}}}:events"


def message_meta(message_id: str) -> str:
    """The hash holding a message's status, owner, next sequence number and terminal entry id."""
    return f"{PREFIX}:{{{message_id}}}:meta"


def message_channel(message_id: str) -> str:
    """The shard channel on which every appended event of a message is announced."""
    return f"{PREFIX}:{{{message_id}}}:live"


def message_watched(message_id: str) -> str:
    """Exists while some client watches the message (for ``cancel_on_disconnect``); gateways
    with a subscriber keep renewing its expiry."""
    return f"{PREFIX}:{{{message_id}}}:watched"


def message_id_of_channel(channel: bytes) -> str:
    """The message id of a :func:`message_channel` name (as Redis sends it back)."""
    return channel[channel.index(b"{") + 1 : channel.rindex(b"}")].decode()


def api_key(key_id: str) -> str:
    """An API key as stored (its tenant, limits and the hash of its secret; never the secret)."""
    return f"{PREFIX}:apikey:{{k:{key_id}}}"


def api_key_index() -> str:
    """The set of every stored API key's id (what ``tokenrelay keys list`` reads)."""
    return f"{PREFIX}:apikeys"


def quota_active(key_id: str) -> str:
    """A key's generations that count against its concurrency limit: a sorted set of message
    ids, scored by when each stops counting even if its end is never reported."""
    return f"{PREFIX}:quota:{{k:{key_id}}}:active"


def quota_tokens(key_id: str, minute: int) -> str:
    """The ``max_tokens`` a key was admitted for in one minute (since the epoch): its
    tokens-per-minute window, in the slot of :func:`quota_active`."""
    return f"{PREFIX}:quota:{{k:{key_id}}}:tokens:{minute}"


def chat_active(tenant: str, chat_id: str) -> str:
    """The message id of an AI SDK chat's latest answer (the chat id is the client's, so it
    is kept per tenant)."""
    return f"{PREFIX}:chat:{{c:{tenant}:{chat_id}}}"


def idempotency(tenant: str, key_digest: str) -> str:
    """The message an ``Idempotency-Key`` created, with the fingerprint of its request (the
    client's key is stored as a digest: any text, bounded length)."""
    return f"{PREFIX}:idem:{{i:{tenant}:{key_digest}}}"
