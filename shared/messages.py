"""Message ids and the message's meta hash: what a gateway creates and a worker advances.

The meta hash (``keys.message_meta``) holds:

- ``status``: ``queued`` → ``running`` → ``done`` | ``error``
- ``seq``: the sequence number the next event gets (the append script checks it)
- ``owner``: the token of the generation attempt allowed to append (the fence)
- ``end``: the entry id of the terminal event, once there is one
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from shared import keys

# 16 random bytes (128 bits) in URL-safe base64: 22 characters, no braces (they would break the
# cluster hash tag), safe in paths.
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{22}")

STATUS = b"status"
SEQ = b"seq"
OWNER = b"owner"
END = b"end"

QUEUED = b"queued"
RUNNING = b"running"


def new_message_id() -> str:
    """An unguessable message id (128 random bits)."""
    return secrets.token_urlsafe(16)


def is_message_id(text: str) -> bool:
    """Whether ``text`` has the shape of a message id (so it may be used in a key)."""
    return _MESSAGE_ID.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Job:
    """A generation request as it travels through the jobs stream."""

    message_id: str
    prompt: str
    max_tokens: int

    def to_fields(self) -> dict[bytes, bytes]:
        """The jobs-stream entry for this job."""
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens}
        return {b"m": self.message_id.encode(), b"p": orjson.dumps(body)}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Job:
        """Decode a jobs-stream entry; raise ValueError/KeyError when it is not one of ours."""
        body = orjson.loads(fields[b"p"])
        return cls(fields[b"m"].decode(), str(body["prompt"]), int(body["max_tokens"]))


async def submit(redis: Redis, job: Job, *, ttl_ms: int) -> None:
    """Create the message (so readers find it at once) and queue its job for the workers."""
    meta = keys.message_meta(job.message_id)
    created = str(time.time_ns() // 1_000_000)
    # Meta and job live in different cluster slots, so these are two round trips, meta first:
    # a worker that picks the job always finds its message.
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(meta, mapping={STATUS: QUEUED, SEQ: b"0", OWNER: b"", b"created_ms": created})
        pipe.pexpire(meta, ttl_ms)
        await pipe.execute()
    await redis.xadd(keys.JOBS_STREAM, job.to_fields())  # type: ignore[arg-type]
