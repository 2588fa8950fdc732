"""Who may do what (README, "Security").

Starting a generation takes an API key (``Authorization: Bearer trk_...``); the message belongs
to the key's tenant. Reading, resuming and cancelling a message take a key of that tenant, or a
per-message token (``?token=`` or ``Authorization: Bearer trt1...``) whose scope covers the
action. Another tenant's message answers 404, exactly as a missing one. With
``TOKENRELAY_AUTH=off`` everyone may do everything (``tokenrelay dev`` runs so).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ApiError
from gateway.message_tokens import PREFIX as TOKEN_PREFIX
from gateway.message_tokens import READ, READ_CANCEL, BadToken, Grant, TokenSigner
from shared.api_keys import ApiKey, load_key, parse_key
from shared.redis_client import RedisClient
from shared.settings import Settings

#: The tenant of every message while access control is off.
OPEN_TENANT = ""


@dataclass(frozen=True, slots=True)
class Reader:
    """Who asks to read or cancel a message: ``tenant`` must own it (None: anyone's, as a
    token for the message or access control being off allows)."""

    tenant: str | None

    def owns(self, message_tenant: str) -> bool:
        return self.tenant is None or self.tenant == message_tenant


class Access:
    """Checks credentials against the keys (in Redis, else in the key file) and the tokens."""

    def __init__(
        self, settings: Settings, redis: RedisClient, file_keys: dict[str, ApiKey]
    ) -> None:
        self.required = settings.auth == "keys"
        self._redis = redis
        self._file_keys = file_keys
        self.signer = TokenSigner(
            settings.token_secret, settings.token_secret_previous, ttl_s=settings.token_ttl_s
        )

    async def key_of(self, authorization: str | None, *, openai: bool) -> ApiKey | None:
        """The caller's key (None when access control is off); 401 when it has none that
        works."""
        if not self.required:
            return None
        credential = bearer(authorization)
        if credential is None:
            raise _unauthorized("no API key: send Authorization: Bearer <key>", openai, "missing")
        key = await self._find(credential)
        if key is None:
            raise _unauthorized("the API key is not valid (unknown or revoked)", openai, "invalid")
        return key

    async def reader(
        self,
        message_id: str,
        authorization: str | None,
        token: str | None,
        scope: str,
        *,
        openai: bool,
    ) -> Reader:
        """Who asks to act on ``message_id`` (``scope``: READ or READ_CANCEL); 401 without a
        working credential, 403 for a token whose scope falls short, 404 for a token of
        another message."""
        if not self.required:
            return Reader(None)
        if token is not None and not token.startswith(TOKEN_PREFIX):
            # The query carries message tokens only: an API key in a URL would be kept in
            # browser histories and proxies' logs.
            raise _unauthorized(
                "the message token is not valid: '?token=' takes a message token; an API key "
                "goes in the Authorization header",
                openai,
                "invalid",
            )
        credential = token if token is not None else bearer(authorization)
        if credential is None:
            raise _unauthorized(
                "no credential: send an API key (Authorization: Bearer) or the message's token "
                "(?token=)",
                openai,
                "missing",
            )
        if credential.startswith(TOKEN_PREFIX):
            grant = self.grant(credential, openai=openai)
            check_grant(grant, message_id, scope, openai=openai)
            return Reader(None)
        key = await self._find(credential)
        if key is None:
            raise _unauthorized("the API key is not valid (unknown or revoked)", openai, "invalid")
        return Reader(key.tenant)

    def grant(self, token: str, *, openai: bool) -> Grant:
        """What ``token`` allows; 401 when it is not valid."""
        try:
            return self.signer.verify(token)
        except BadToken as exc:
            raise _unauthorized(
                f"the message token is not valid: {exc}", openai, "invalid"
            ) from None

    def tokens_for(self, message_id: str) -> dict[str, str]:
        """The tokens a new message's creator gets: read+cancel and read-only."""
        return {
            "token": self.signer.issue(message_id, READ_CANCEL),
            "read_token": self.signer.issue(message_id, READ),
        }

    async def _find(self, credential: str) -> ApiKey | None:
        parsed = parse_key(credential)
        if parsed is None:
            return None
        key_id, secret = parsed
        key = await load_key(self._redis, key_id)
        if key is None:
            key = self._file_keys.get(key_id)
        return key if key is not None and key.matches(secret) else None


def check_grant(grant: Grant, message_id: str, scope: str, *, openai: bool) -> None:
    """404 for a token of another message (as for a missing one), 403 for a scope too narrow."""
    if grant.message_id != message_id:
        raise ApiError(404, f"message {message_id} does not exist or has expired")
    if not grant.allows(scope):
        raise ApiError(
            403,
            "this message token may only read the message",
            error_type="permission_error" if openai else "forbidden",
            code="insufficient_scope",
        )


def bearer(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer`` header (None without one)."""
    if authorization is None:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    credential = credential.strip()
    return credential if scheme.lower() == "bearer" and credential else None


def _unauthorized(message: str, openai: bool, what: str) -> ApiError:
    return ApiError(
        401,
        message,
        error_type="invalid_request_error" if openai else "unauthorized",
        code="invalid_api_key" if what == "invalid" else "missing_credentials",
        headers={"WWW-Authenticate": 'Bearer realm="tokenrelay"'},
    )
