"""Per-message tokens: a signed, expiring grant to read (and maybe cancel) one message.

A browser's ``EventSource`` sends no header, so following or resuming a message from a page
needs a credential that rides in the URL: ``?token=``. A token reads
``trt1.<message id>.<scope>.<expiry>.<key>.<signature>``: scope ``r`` (read) or ``rc`` (read and
cancel), expiry in seconds since the epoch, ``key`` the first 8 hex digits of the SHA-256 of the
secret that signed it, and the signature an HMAC-SHA256 of the rest, in URL-safe base64.

Rotation: tokens are signed with ``TOKENRELAY_TOKEN_SECRET`` and accepted when signed with it or
with ``TOKENRELAY_TOKEN_SECRET_PREVIOUS``; keep the old secret there for one token lifetime
after a rotation (the grace period), then drop it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass

PREFIX = "trt1."
READ = "r"
READ_CANCEL = "rc"
_TOKEN = re.compile(
    r"trt1\.([A-Za-z0-9_-]{22})\.(r|rc)\.([0-9]{1,12})\.([0-9a-f]{8})\.([A-Za-z0-9_-]{43})"
)


class BadToken(ValueError):
    """A token that is malformed, tampered with, signed by an unknown secret, or expired."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token allows."""

    message_id: str
    scope: str
    expires_s: int

    def allows(self, scope: str) -> bool:
        return self.scope == READ_CANCEL or scope == READ


class TokenSigner:
    """Signs tokens with the current secret; verifies with it or the previous one."""

    def __init__(self, secret: str, previous: str = "", *, ttl_s: int) -> None:
        self._current = _Secret(secret)
        self._accepted = {s.kid: s for s in (_Secret(secret), _Secret(previous)) if s.key}
        self._ttl_s = ttl_s

    def issue(self, message_id: str, scope: str, *, now_s: float | None = None) -> str:
        """A token for ``message_id`` with ``scope``, expiring after the configured lifetime."""
        expires = int(time.time() if now_s is None else now_s) + self._ttl_s
        body = f"{PREFIX}{message_id}.{scope}.{expires}.{self._current.kid}"
        return f"{body}.{self._current.sign(body)}"

    def verify(self, token: str, *, now_s: float | None = None) -> Grant:
        """The grant of a valid token; :class:`BadToken` otherwise (the signature compared in
        constant time, before anything else of the token is trusted)."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise BadToken("malformed token")
        message_id, scope, expires, kid, signature = match.groups()
        secret = self._accepted.get(kid)
        body = token[: token.rindex(".")]
        # Compared even when the key is unknown, so the answer's timing tells nothing.
        expected = (secret or self._current).sign(body)
        if not hmac.compare_digest(expected, signature) or secret is None:
            raise BadToken("token signature does not verify")
        if int(expires) <= (time.time() if now_s is None else now_s):
            raise BadToken("token expired")
        return Grant(message_id, scope, int(expires))


class _Secret:
    __slots__ = ("key", "kid")

    def __init__(self, secret: str) -> None:
        self.key = secret.encode()
        self.kid = hashlib.sha256(self.key).hexdigest()[:8]

    def sign(self, body: str) -> str:
        digest = hmac.new(self.key, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
