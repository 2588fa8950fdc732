"""The systems measured side by side (``ALL``), tokenrelay's gateway among them, of this checkout
or of another git ref (checked out in a worktree, so any change can be measured beside main in
the same run)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from bench.peers import Floor, Naive, Nchan, ResumableStream
from bench.servers import SERVER_CORE, Running, System, on_redis
from shared.settings import Settings

_WORKTREES = Path.home() / ".cache" / "tokenrelay-bench"
_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Tokenrelay:
    """tokenrelay's gateway (one process) on a private Redis, fed through this checkout's
    worker path; the gateway of this checkout, or of git ``ref`` (see :func:`worktree`)."""

    coalesce_ms: float = 0.0
    name: str = "tokenrelay"
    workers: int = 1
    pinned: bool = True
    ref: str | None = None
    #: On a 3+3 Redis Cluster instead of one Redis; ``durable``: reading from its replicas.
    cluster: bool = False
    durable: bool = False

    def start(self, streams: int) -> contextlib.AbstractAsyncContextManager[Running]:
        argv = [sys.executable, "-m", "tokenrelay", "gateway"]
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        return on_redis(
            argv,
            f"the tokenrelay gateway of {self.ref or 'this checkout'}",
            "/chat/stream/",
            streams=streams,
            pin=SERVER_CORE if self.pinned else None,
            coalesce_ms=self.coalesce_ms,
            cwd=None if self.ref is None else worktree(self.ref),
            cluster=self.cluster,
            env={"TOKENRELAY_READ_FROM_REPLICAS": "1"} if self.durable else None,
        )


def worktree(ref: str) -> Path:
    """A checkout of ``ref`` (a git worktree, made once per commit) whose gateway the benchmark
    runs with this checkout's Python environment."""
    commit = resolve(ref)
    path = _WORKTREES / f"ref-{commit[:12]}"
    if not path.exists():
        _WORKTREES.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "-C", str(_ROOT), "worktree", "add", "--detach", str(path), commit],
            check=True,
            capture_output=True,
        )
    return path


def resolve(ref: str) -> str:
    """The commit ``ref`` names in this checkout."""
    return subprocess.run(
        ["git", "-C", str(_ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def with_ref(names: list[str], ref: str) -> list[str]:
    """``names``, each tokenrelay system followed by the same system at ``ref`` (registered
    in :data:`ALL`)."""
    out = []
    for name in names:
        out.append(name)
        system = ALL.get(name)
        if isinstance(system, Tokenrelay) and system.ref is None:
            at = f"{name}@{ref}"
            ALL.setdefault(at, replace(system, name=at, ref=ref))
            out.append(at)
    return out


ALL: dict[str, System] = {
    "tokenrelay": Tokenrelay(),
    # The worker's default coalescing window (TOKENRELAY_COALESCE_MS).
    "tokenrelay+coalescing": Tokenrelay(
        coalesce_ms=Settings.from_env({}).coalesce_ms, name="tokenrelay+coalescing"
    ),
    # The same on a Redis Cluster of 3 primaries and 3 replicas; and in durable mode there.
    "tokenrelay-cluster": Tokenrelay(name="tokenrelay-cluster", cluster=True),
    "tokenrelay-cluster-durable": Tokenrelay(
        name="tokenrelay-cluster-durable", cluster=True, durable=True
    ),
    "naive": Naive(),
    "nchan": Nchan(),
    "floor": Floor(),
    "resumable-stream": ResumableStream(),
}
