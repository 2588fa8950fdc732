"""Message ids, jobs, and the message's meta hash: what a gateway creates and a worker advances.

The meta hash (``keys.message_meta``) holds:

- ``status``: ``queued`` → ``running`` → ``done`` | ``error`` | ``cancelled``
- ``seq``: the sequence number the next event gets (the append script checks it)
- ``owner``: the token of the generation attempt allowed to append (the fence)
- ``end``: the entry id of the terminal event, once there is one
- ``cancel``: set (to the reason) when cancellation was requested
- ``model``, ``created_ms``, ``include_usage``: what the OpenAI-format renderer needs on resume
- ``watch_ms``: for ``cancel_on_disconnect``, how long the message may go unwatched
- ``tenant``: whose message it is (the tenant of the API key that created it)
- ``rewound``: set once Redis lost events of the message that readers may have been sent (a
  failover to a replica that lacked them): a reader whose position is unknown starts again
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared import keys
from shared.redis_client import RedisClient

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
REWOUND = b"rewound"
TENANT = b"tenant"
# What the request asked that its API reports back (the Responses API's object echoes its
# settings): JSON, kept as given.
ASKED = b"asked"
CANCEL = b"cancel"

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
    #: Whose message it is, and the API key whose quota it counts against (empty: none).
    tenant: str = ""
    key_id: str = ""

    def to_fields(self) -> dict[bytes, bytes]:
        """The jobs-stream entry for this job."""
        body: dict[str, Any] = {"prompt": self.prompt, "max_tokens": self.max_tokens}
        if self.messages is not None:
            body["messages"] = self.messages
        if self.model is not None:
            body["model"] = self.model
        if self.params:
            body["params"] = self.params
        if self.key_id:
            body["key_id"] = self.key_id
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
            key_id=str(body.get("key_id", "")),
        )


async def submit(
    redis: RedisClient,
    job: Job,
    *,
    ttl_ms: int,
    model: str,
    partitions: int,
    include_usage: bool = False,
    watch_ms: int | None = None,
    asked: bytes = b"",
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
        TENANT: job.tenant,
    }
    if watch_ms is not None:
        fields[WATCH_MS] = str(watch_ms)
    if asked:
        fields[ASKED] = asked
    # Meta and job live in different cluster slots, so these are two round trips, meta first:
    # a worker that picks the job always finds its message.
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(meta, mapping=fields)  # type: ignore[arg-type]
        pipe.pexpire(meta, ttl_ms)
        if watch_ms is not None:
            pipe.set(keys.message_watched(job.message_id), b"1", px=watch_ms)
        await pipe.execute()
    stream = keys.jobs_stream(keys.job_partition(job.message_id, partitions), partitions)
    await redis.xadd(stream, job.to_fields())  # type: ignore[arg-type]
    return created_ms


# Ask for cancellation. A message no worker has taken yet ends here and now: its cancelled event
# is written as the worker's append script writes events (same fields, same announcement), and
# the owner set so that no worker takes it. A running one is flagged (the append script checks
# the flag before every event), and its owner is returned: the caller tells that worker on its
# own shard channel, so that it stops at once even if the model is silent.
_REQUEST_CANCEL = """
local meta = redis.call('HMGET', KEYS[1], 'status', 'seq', 'owner', 'end', 'tenant')
if not meta[2] then return {'missing'} end
if ARGV[4] ~= '*' and (meta[5] or '') ~= ARGV[4] then return {'missing'} end
if meta[4] then return {'finished'} end
redis.call('HSET', KEYS[1], 'cancel', ARGV[1])
if meta[3] == '' then
  local n = meta[2]
  local data = '{"reason":"' .. ARGV[1] .. '"}'
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '*',
                        'n', n, 'k', 'cancelled', 'd', data)
  redis.call('HSET', KEYS[1], 'seq', n + 1, 'status', 'cancelled', 'end', id, 'owner', 'cancelled')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  redis.call('SPUBLISH', KEYS[3], id .. ' ' .. n .. ' cancelled ' .. data)
  return {'ok'}
end
return {'ok', meta[3]}
"""


async def request_cancel(
    redis: RedisClient, message_id: str, *, ttl_ms: int, maxlen: int, tenant: str | None = None
) -> str:
    """Stop a generation; ``ok``, ``missing`` (no such message, or with ``tenant`` one of
    another tenant) or ``finished`` (too late)."""
    message_keys = (
        keys.message_meta(message_id),
        keys.message_stream(message_id),
        keys.message_channel(message_id),
    )
    owner = "*" if tenant is None else tenant
    reply = await redis.eval(_REQUEST_CANCEL, 3, *message_keys, "requested", ttl_ms, maxlen, owner)
    outcome: str = reply[0].decode()
    if len(reply) > 1:
        # The worker's token is "<consumer>/<job>/<attempt>" (worker.runner): tell it.
        consumer = reply[1].decode().partition("/")[0]
        await redis.spublish(keys.worker_channel(consumer), message_id)
    return outcome
