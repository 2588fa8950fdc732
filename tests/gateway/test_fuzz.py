"""Property-based tests of what reads untrusted input: the request parsers of both APIs, the
resume cursor, and the per-message token verifier. Any input either parses into something the
rest of the gateway can use (a job that serializes), or is refused with an ApiError naming the
problem: never another exception (which would be a 500). Bounded example counts keep CI fast."""

from __future__ import annotations

import contextlib
import string
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import ApiError
from gateway.message_tokens import READ, READ_CANCEL, BadToken, TokenSigner
from gateway.requests import parse_chat_request, parse_completion_request, resume_cursor
from shared.api_keys import ApiKey, Limits, parse_key
from shared.messages import Job, prompt_of
from shared.settings import Settings

SETTINGS = Settings(max_prompt_chars=2_000, max_tokens_limit=512)
EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON as orjson.loads can return it (64-bit integers, finite floats).
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=30,
)


def _chat_bodies() -> st.SearchStrategy[dict[str, Any]]:
    known = {
        "prompt": st.text(max_size=60) | JSON,
        "stream": st.booleans() | JSON,
        "max_tokens": st.integers(-5, 600) | JSON,
        "cancel_on_disconnect": st.booleans() | JSON,
    }
    return st.fixed_dictionaries({}, optional=known) | st.dictionaries(
        st.text(max_size=12), JSON, max_size=5
    )


def _messages() -> st.SearchStrategy[Any]:
    content = (
        st.text(max_size=40)
        | JSON
        | st.lists(
            st.fixed_dictionaries({}, optional={"type": st.just("text") | JSON, "text": JSON}),
            max_size=3,
        )
    )
    message = st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "system", "assistant"]) | JSON,
            "content": content,
        },
    )
    return st.lists(message, max_size=4) | JSON


def _completion_bodies() -> st.SearchStrategy[dict[str, Any]]:
    known = {
        "model": st.text(max_size=20) | JSON,
        "messages": _messages(),
        "stream": st.booleans() | JSON,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": JSON}) | JSON,
        "max_tokens": st.integers(-5, 600) | JSON,
        "max_completion_tokens": st.integers(-5, 600) | JSON,
        "n": st.integers(0, 3) | JSON,
        "temperature": JSON,
        "cancel_on_disconnect": JSON,
    }
    return st.fixed_dictionaries({}, optional=known)


def _refusal(parse: Callable[[], object]) -> ApiError | None:
    """The ApiError ``parse`` raises, None if it parses (any other exception fails the test)."""
    try:
        parse()
    except ApiError as exc:
        return exc
    return None


@EXAMPLES
@given(_chat_bodies())
def test_a_chat_body_parses_into_a_job_or_is_refused_clearly(body: dict[str, Any]) -> None:
    refusal = _refusal(lambda: parse_chat_request(body, SETTINGS))
    if refusal is not None:
        assert refusal.status in (413, 422)
        assert refusal.message
        return
    chat = parse_chat_request(body, SETTINGS)
    Job("A" * 22, chat.prompt, chat.max_tokens).to_fields()
    assert 1 <= chat.max_tokens <= SETTINGS.max_tokens_limit


@EXAMPLES
@given(_completion_bodies())
def test_a_completion_body_parses_into_a_job_or_is_refused_clearly(body: dict[str, Any]) -> None:
    refusal = _refusal(lambda: parse_completion_request(body, SETTINGS))
    if refusal is not None:
        assert refusal.status == 400
        assert orjson.loads(refusal.body())["error"]["message"]
        return
    completion = parse_completion_request(body, SETTINGS)
    job = Job(
        "A" * 22,
        prompt_of(completion.messages),
        completion.max_tokens,
        messages=completion.messages,
        model=completion.model,
        params=completion.params,
    )
    assert Job.from_fields(job.to_fields()) == job


@EXAMPLES
@given(st.one_of(st.none(), st.text(max_size=40)), st.one_of(st.none(), st.text(max_size=40)))
def test_a_cursor_is_an_event_id_none_or_a_400(header: str | None, parameter: str | None) -> None:
    refusal = _refusal(lambda: resume_cursor(header, parameter))
    if refusal is not None:
        assert refusal.status == 400
        return
    cursor = resume_cursor(header, parameter)
    assert cursor is None or str(cursor).count("-") == 1


_SIGNER = TokenSigner("k" * 40, "p" * 40, ttl_s=3600)
_VALID = _SIGNER.issue("B" * 22, READ_CANCEL)


@EXAMPLES
@given(st.text(alphabet=string.printable, max_size=120))
def test_the_token_verifier_grants_only_what_was_signed(text: str) -> None:
    try:
        grant = _SIGNER.verify(text)
    except BadToken:
        return
    assert text == _VALID or _SIGNER.issue(grant.message_id, grant.scope) == text


@EXAMPLES
@given(st.integers(0, len(_VALID) - 1), st.characters(whitelist_categories=("L", "N", "P")))
def test_any_change_to_a_valid_token_is_refused(position: int, replacement: str) -> None:
    tampered = _VALID[:position] + replacement + _VALID[position + 1 :]
    if tampered == _VALID:
        return
    try:
        _SIGNER.verify(tampered)
    except BadToken:
        return
    raise AssertionError(f"{tampered!r} was accepted")


def test_a_token_signed_by_another_secret_or_of_another_scope_is_not_this_one() -> None:
    stranger = TokenSigner("x" * 40, ttl_s=3600).issue("B" * 22, READ_CANCEL)
    with pytest.raises(BadToken, match="signature"):
        _SIGNER.verify(stranger)
    read = _SIGNER.issue("B" * 22, READ)
    assert _SIGNER.verify(read).allows(READ)
    assert not _SIGNER.verify(read).allows(READ_CANCEL)
    previous = TokenSigner("p" * 40, ttl_s=3600).issue("B" * 22, READ)
    assert _SIGNER.verify(previous).message_id == "B" * 22  # the rotated-out secret's, still


@EXAMPLES
@given(JSON)
def test_a_stored_key_or_limits_parse_or_are_refused_with_a_value_error(value: Any) -> None:
    for parse in (ApiKey.from_dict, Limits.from_dict):
        with contextlib.suppress(ValueError):
            parse(value)


@EXAMPLES
@given(st.text(max_size=80))
def test_a_presented_key_is_parsed_or_ignored(text: str) -> None:
    parsed = parse_key(text)
    assert parsed is None or text == f"trk_{parsed[0]}_{parsed[1]}"
