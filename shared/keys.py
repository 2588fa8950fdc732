"""Every Redis key and channel name tokenrelay uses, built in one place.

All keys of one message share the hash tag ``{<message id>}`` so they live in one Redis Cluster
slot: the append script touches them atomically, and a cluster needs no key migration.
"""

from __future__ import annotations

PREFIX = "tr"

#: The consumer-group stream that carries generation jobs from gateways to workers.
JOBS_STREAM = f"{PREFIX}:jobs"
#: The consumer group every worker joins on :data:`JOBS_STREAM`.
JOBS_GROUP = "workers"
#: Jobs that lost their worker ``job_max_attempts`` times, kept for inspection.
JOBS_DEAD_STREAM = f"{PREFIX}:jobs:dead"
#: Cancellation requests (payload: the message id), so the worker running it stops at once.
CANCEL_CHANNEL = f"{PREFIX}:cancel"


def message_stream(message_id: str) -> str:
    """The Redis Stream holding a message's events; entry ids are the SSE ``id:`` values."""
    return f"{PREFIX}:{{{message_id}}}:events"


def message_meta(message_id: str) -> str:
    """The hash holding a message's status, owner, next sequence number and terminal entry id."""
    return f"{PREFIX}:{{{message_id}}}:meta"


def message_channel(message_id: str) -> str:
    """The pub/sub channel on which every appended event of a message is announced."""
    return f"{PREFIX}:{{{message_id}}}:live"


def message_watched(message_id: str) -> str:
    """Exists while some client watches the message (for ``cancel_on_disconnect``); gateways
    with a subscriber keep renewing its expiry."""
    return f"{PREFIX}:{{{message_id}}}:watched"
