"""``tokenrelay keys create | list | revoke``: API keys in Redis (or in a key file)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from shared import api_keys
from shared.api_keys import ApiKey, Limits
from shared.errors import ConfigError
from shared.redis_client import RedisConnector
from shared.settings import Settings


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``keys`` command and its subcommands."""
    keys = commands.add_parser(
        "keys",
        help="create, list and revoke API keys (in Redis, or in a key file with --file)",
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key; prints it once (it is kept hashed)")
    create.add_argument("--tenant", required=True, help="whose messages the key's requests make")
    for name, what in (
        ("max-concurrent", "generations of the key at once"),
        ("tokens-per-minute", "max_tokens admitted per minute"),
        ("max-tokens", "largest max_tokens of one request"),
        ("max-prompt-chars", "longest prompt of one request"),
    ):
        create.add_argument(f"--{name}", type=_positive, default=None, metavar="N", help=what)
    listing = actions.add_parser("list", help="list keys (ids, tenants, limits; never secrets)")
    revoke = actions.add_parser("revoke", help="revoke a key: every gateway refuses it at once")
    revoke.add_argument("key_id", help="the key's id (the 16 hex digits after trk_)")
    for parser in (create, listing, revoke):
        parser.add_argument(
            "--file",
            default=None,
            metavar="PATH",
            help="a JSON key file (TOKENRELAY_API_KEYS_FILE) instead of Redis",
        )
        parser.add_argument("--json", action="store_true", help="print JSON")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


async def run(settings: Settings, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Carry out ``args.action``; the exit status."""
    if args.action == "create":
        try:
            api_keys.check_tenant(args.tenant)
        except ValueError as exc:
            print(f"tokenrelay keys: {exc}", file=sys.stderr)
            return 2
    if args.file is not None:
        return _on_file(args, out)
    connector = RedisConnector(settings)
    redis = connector.client()
    try:
        if args.action == "create":
            text, key = api_keys.new_key(args.tenant, _limits(args))
            await api_keys.store_key(redis, key)
            _created(text, key, args.json, out)
        elif args.action == "list":
            _listed(await api_keys.list_keys(redis), args.json, out)
        elif not await api_keys.revoke_key(redis, args.key_id):
            print(f"tokenrelay keys: no key {args.key_id}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.key_id}", file=out)
    finally:
        await connector.aclose()
    return 0


def _on_file(args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "create":
        text, key = api_keys.new_key(args.tenant, _limits(args))
        api_keys.append_to_key_file(args.file, key)
        _created(text, key, args.json, out)
    elif args.action == "list":
        _listed(list(api_keys.read_key_file(args.file).values()), args.json, out)
    elif not api_keys.remove_from_key_file(args.file, args.key_id):
        print(f"tokenrelay keys: no key {args.key_id} in {args.file}", file=sys.stderr)
        return 1
    else:
        print(f"removed {args.key_id} (gateways refuse it once restarted)", file=out)
    return 0


def _limits(args: argparse.Namespace) -> Limits:
    try:
        return Limits(
            max_concurrent=args.max_concurrent,
            tokens_per_minute=args.tokens_per_minute,
            max_tokens=args.max_tokens,
            max_prompt_chars=args.max_prompt_chars,
        )
    except ValueError as exc:  # pragma: no cover - argparse checked each
        raise ConfigError(str(exc)) from None


def _created(text: str, key: ApiKey, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps({"key": text, "id": key.key_id, "tenant": key.tenant}), file=out)
    else:
        print(f"{text}\n(id {key.key_id}, tenant {key.tenant}: shown once, keep it)", file=out)


def _listed(found: list[ApiKey], as_json: bool, out: TextIO) -> None:
    if as_json:
        public = [{k: v for k, v in key.to_dict().items() if k != "secret_sha256"} for key in found]
        print(json.dumps(public), file=out)
        return
    for key in found:
        limits = ", ".join(f"{k}={v}" for k, v in key.to_dict()["limits"].items() if v) or "-"
        print(f"{key.key_id}  {key.tenant}  {limits}", file=out)
