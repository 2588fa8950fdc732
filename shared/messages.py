"""Message ids, jobs, and the message's meta hash: what a gateway creates and a worker advances.

The meta hash (``keys.message_meta``) holds:

- ``status``: ``queued`` → ``running`` → ``done`` | ``error`` | ``cancelled``
- ``seq``: the sequence number the next event gets (the append script checks it)
- ``owner``: the token of the generation attempt allowed to append (the fence)
- ``end``: the entry id of the terminal event, once there is one
- ``cancel``: set (to the reason) when cancellation was requested
- ``model``, ``created_ms``, ``include_usage``: what the OpenAI-format renderer needs on resume
- ``watch_ms``: for ``cancel_on_disconnect``, how long the message may go unwatched
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

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
MODEL = b"model"
CREATED_MS = b"created_ms"
INCLUDE_USAGE = b"include_usage"
WATCH_MS = b"watch_ms"

QUEUED = b"queued"
RUNNING = b"running"


def new_message_id() -> str:
    """An unguessable message id (128 random bits)."""
    return secrets.token_urlsafe(16)


def is_message_id(text: str) -> bool:
    """Whether ``text`` has the shape of a message id (so it may be used in a key)."""
    return _MESSAGE_ID.fullmatch(text) is not None


def prompt_of(messages: list[dict[str, Any]]) -> str:
    """Chat messages as one text (``role: content`` lines): what the mock model answers."""
    lines = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        lines.append(f"{message.get('role')}: {content or ''}")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Job:
    """A generation request as it travels through the jobs stream."""

    message_id: str
    #: The text the mock model answers; for chat requests, :func:`prompt_of` the messages.
    prompt: str
    max_tokens: int
    #: The chat messages for a real model; None for a plain prompt (sent as one user message).
    messages: list[dict[str, Any]] | None = None
    model: str | None = None
    #: Sampling and other request fields passed through to the model unchanged.
    params: dict[str, Any] = field(default_factory=dict)

    def to_fields(self) -> dict[bytes, bytes]:
        """The jobs-stream entry for this job."""
        body: dict[str, Any] = {"prompt": self.prompt, "max_tokens": self.max_tokens}
        if self.messages is not None:
            body["messages"] = self.messages
        if self.model is not None:
            body["model"] = self.model
        if self.params:
            body["params"] = self.params
        return {b"m": self.message_id.encode(), b"p": orjson.dumps(body)}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Job:
        """Decode a jobs-stream entry; raise ValueError/KeyError when it is not one of ours."""
        body = orjson.loads(fields[b"p"])
        messages = body.get("messages")
        params = body.get("params", {})
        if messages is not None and not isinstance(messages, list):
            raise ValueError("messages is not a list")
        if not isinstance(params, dict):
            raise ValueError("params is not an object")
        return cls(
            message_id=fields[b"m"].decode(),
            prompt=str(body["prompt"]),
            max_tokens=int(body["max_tokens"]),
            messages=messages,
            model=body.get("model"),
            params=params,
        )


async def submit(
    redis: Redis,
    job: Job,
    *,
    ttl_ms: int,
    model: str,
    include_usage: bool = False,
    watch_ms: int | None = None,
) -> int:
    """Create the message (so readers find it at once) and queue its job for the workers.

    ``watch_ms`` opts into cancel-on-disconnect: generation stops once no client has watched
    the message for that long. Returns the creation time stored with it (ms since the epoch).
    """
    meta = keys.message_meta(job.message_id)
    created_ms = time.time_ns() // 1_000_000
    fields: dict[bytes, bytes | str] = {
        STATUS: QUEUED,
        SEQ: b"0",
        OWNER: b"",
        CREATED_MS: str(created_ms),
        MODEL: model,
        INCLUDE_USAGE: b"1" if include_usage else b"0",
    }
    if watch_ms is not None:
        fields[WATCH_MS] = str(watch_ms)
    # Meta and job live in different cluster slots, so these are two round trips, meta first:
    # a worker that picks the job always finds its message.
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(meta, mapping=fields)  # type: ignore[arg-type]
        pipe.pexpire(meta, ttl_ms)
        if watch_ms is not None:
            pipe.set(keys.message_watched(job.message_id), b"1", px=watch_ms)
        await pipe.execute()
    await redis.xadd(keys.JOBS_STREAM, job.to_fields())  # type: ignore[arg-type]
    return created_ms


# Ask for cancellation. A message no worker has taken yet ends here and now: its cancelled event
# is written as the worker's append script writes events (same fields, same announcement), and
# the owner set so that no worker takes it. A running one is flagged (the append script checks
# the flag before every event) and announced (its worker stops at once, even if the model is
# silent).
_REQUEST_CANCEL = """
local meta = redis.call('HMGET', KEYS[1], 'status', 'seq', 'owner', 'end')
if not meta[2] then return 'missing' end
if meta[4] then return 'finished' end
redis.call('HSET', KEYS[1], 'cancel', ARGV[1])
if meta[3] == '' then
  local n = meta[2]
  local data = '{"reason":"' .. ARGV[1] .. '"}'
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[5], '*',
                        'n', n, 'k', 'cancelled', 'd', data)
  redis.call('HSET', KEYS[1], 'seq', n + 1, 'status', 'cancelled', 'end', id, 'owner', 'cancelled')
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  redis.call('PUBLISH', KEYS[3], id .. ' ' .. n .. ' cancelled ' .. data)
  return 'ok'
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 'ok'
"""


async def request_cancel(redis: Redis, message_id: str, *, ttl_ms: int, maxlen: int) -> str:
    """Stop a generation; ``ok``, ``missing`` (no such message) or ``finished`` (too late)."""
    message_keys = (
        keys.message_meta(message_id),
        keys.message_stream(message_id),
        keys.message_channel(message_id),
    )
    args = ("requested", keys.CANCEL_CHANNEL, message_id, ttl_ms, maxlen)
    result = await redis.eval(_REQUEST_CANCEL, 3, *message_keys, *args)
    text: str = result.decode()
    return text
