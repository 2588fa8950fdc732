"""``tokenrelay gateway | worker | dev | stack | chat | keys``: argument parsing, logging,
signals."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

import uvicorn

from gateway.app import create_app
from gateway.server import served, uvicorn_options
from shared import gc_policy, log_format, metrics
from shared.errors import ConfigError
from shared.redis_client import RedisConnector
from shared.settings import Settings, settings_help
from tokenrelay import dev, keys_command, stack
from tokenrelay.chat import chat
from tokenrelay.topology import GATEWAY_PORT, LB_PORT, LOCAL_REDIS_PORT, Topology
from worker import service

_log = logging.getLogger("tokenrelay")


def build_parser() -> argparse.ArgumentParser:
    """The command line, with every option and setting described in ``--help``."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="tokenrelay",
        description="Resumable LLM token streaming over Server-Sent Events on Redis Streams.",
        epilog=settings_help(),
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gateway = commands.add_parser(
        "gateway",
        help="serve the HTTP/SSE API (uvicorn + Starlette)",
        epilog=settings_help(),
        formatter_class=formatter,
    )
    _add_listen_options(gateway)
    gateway.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="gateway processes sharing the port, one per core you give it (default: 1)",
    )
    gateway.add_argument(
        "--demo", action="store_true", help="also serve the demo page at / (single process only)"
    )

    commands.add_parser(
        "worker",
        help="generate: take jobs from Redis and stream tokens into it",
        epilog=settings_help(),
        formatter_class=formatter,
    )

    dev_parser = commands.add_parser(
        "dev",
        help="gateway + worker in one process, with the demo page at /; "
        "an embedded fakeredis unless REDIS_URL is set",
        epilog=settings_help(),
        formatter_class=formatter,
    )
    _add_listen_options(dev_parser)

    stack_parser = commands.add_parser(
        "stack",
        help="run the whole topology as local processes: redis-server, haproxy, gateways, workers",
        epilog=settings_help(),
        formatter_class=formatter,
    )
    stack_parser.add_argument(
        "--gateways", type=_positive_int, default=2, help="gateway processes (default: 2)"
    )
    stack_parser.add_argument(
        "--workers", type=_positive_int, default=2, help="worker processes (default: 2)"
    )
    stack_parser.add_argument(
        "--port", type=_port, default=LB_PORT, help=f"haproxy's port (default: {LB_PORT})"
    )
    stack_parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address haproxy listens on (default: 127.0.0.1; 0.0.0.0 for every interface)",
    )
    stack_parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="run a Redis Cluster of 3 primaries and 3 replicas (on free ports) instead of one",
    )
    stack_parser.add_argument(
        "--redis-port",
        type=_port,
        default=LOCAL_REDIS_PORT,
        help=f"its redis-server's port (default: {LOCAL_REDIS_PORT})",
    )
    stack_parser.add_argument(
        "--gateway-base-port",
        type=_port,
        default=GATEWAY_PORT,
        help=f"gateways listen on the next ports (default {GATEWAY_PORT}: {GATEWAY_PORT + 1}, ...)",
    )

    chat_parser = commands.add_parser(
        "chat", help="ask for an answer and stream it here, resuming across dropped connections"
    )
    chat_parser.add_argument("prompt", help="what to ask")
    chat_parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="a gateway (default: http://127.0.0.1:8000)"
    )
    chat_parser.add_argument(
        "--max-tokens", type=_positive_int, default=None, help="answer length limit"
    )
    keys_command.add_parser(commands)
    return parser


#: Commands that run with access control off unless TOKENRELAY_AUTH says otherwise: local
#: trials (they say so when they start), and commands that serve nothing.
_OPEN_BY_DEFAULT = ("dev", "stack", "chat", "keys")
_OPEN_WARNING = (
    "access control is off (TOKENRELAY_AUTH=off): anyone who can reach this port can start, "
    "read and cancel generations"
)


def _add_listen_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=_port, default=8000, help="port to listen on (default: 8000)"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokenrelay`` console script."""
    args = build_parser().parse_args(argv)
    environ = dict(os.environ)
    if args.command in _OPEN_BY_DEFAULT:
        environ.setdefault("TOKENRELAY_AUTH", "off")
    try:
        settings = Settings.from_env(environ)
    except ConfigError as exc:
        print(f"tokenrelay: configuration error: {exc}", file=sys.stderr)
        return 2
    log_format.configure(settings.log_level)
    if settings.auth == "off" and args.command in ("dev", "stack"):
        _log.warning(_OPEN_WARNING)
    command: Callable[[Settings, argparse.Namespace], int] = _COMMANDS[args.command]
    return command(settings, args)


def _gateway(settings: Settings, args: argparse.Namespace) -> int:
    try:
        settings.check_gateway()
    except ConfigError as exc:
        print(f"tokenrelay: configuration error: {exc}", file=sys.stderr)
        return 2
    return _run_gateway(settings, args)


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    del args
    asyncio.run(_run_worker(settings))
    return 0


def _stack(settings: Settings, args: argparse.Namespace) -> int:
    topology = Topology(
        args.gateways,
        args.workers,
        args.port,
        args.redis_port,
        args.gateway_base_port,
        redis_cluster=args.redis_cluster,
    )
    env = {"TOKENRELAY_AUTH": settings.auth}
    return asyncio.run(stack.run(topology, host=args.host, env=env))


def _chat(settings: Settings, args: argparse.Namespace) -> int:
    del settings
    # Its output is the answer: no library's log lines in it.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return asyncio.run(chat(args.url, args.prompt, args.max_tokens, sys.stdout, sys.stderr))
    except KeyboardInterrupt:
        print("\ntokenrelay chat: interrupted", file=sys.stderr)
        return 130


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(keys_command.run(settings, args))
    except ConfigError as exc:
        print(f"tokenrelay keys: {exc}", file=sys.stderr)
        return 2


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(dev.run(settings, host=args.host, port=args.port))
    return 0


def _run_gateway(settings: Settings, args: argparse.Namespace) -> int:
    common = uvicorn_options(settings, args.host, args.port)
    if args.workers > 1:
        if args.demo:
            print("tokenrelay: --demo needs a single gateway process", file=sys.stderr)
            return 2
        # Each process imports the factory and reads the same environment once; they share
        # a directory for their metrics, so that any of them answers a scrape for all.
        with _metrics_dir():
            uvicorn.run(
                "gateway.serving:app_from_env", factory=True, workers=args.workers, **common
            )
    else:
        app = served(create_app(settings, lambda: RedisConnector(settings), demo=args.demo))
        gc_policy.settle(settings.gc_full_s)
        uvicorn.run(app, **common)
    return 0


@contextlib.contextmanager
def _metrics_dir() -> Iterator[None]:
    """A fresh PROMETHEUS_MULTIPROC_DIR for the processes started meanwhile (unless one is
    set: then it is the operator's to manage)."""
    if os.environ.get(metrics.MULTIPROC_DIR):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="tokenrelay-metrics-") as directory:
        os.environ[metrics.MULTIPROC_DIR] = directory
        try:
            yield
        finally:
            del os.environ[metrics.MULTIPROC_DIR]


async def _run_worker(settings: Settings) -> None:
    gc_policy.settle(settings.gc_full_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await service.serve(settings, RedisConnector(settings), stop)


_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "gateway": _gateway,
    "worker": _worker,
    "stack": _stack,
    "chat": _chat,
    "keys": _keys,
    "dev": _dev,
}
