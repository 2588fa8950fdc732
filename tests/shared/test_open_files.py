"""The open-file limit (shared.open_files): raised to the hard limit, in the process and in what
it starts."""

from __future__ import annotations

import resource
import subprocess
import sys

_LOW = 256


def _lowered() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_LOW, hard))


def _run(code: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=_lowered,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.split()


def test_the_soft_limit_is_raised_to_the_hard_one_and_children_inherit_it() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > _LOW, "the hard limit of this machine is too low to test raising to it"
    code = (
        "import resource, subprocess, sys\n"
        "from shared import open_files\n"
        "limit = open_files.raise_limit()\n"
        "child = subprocess.run(['sh', '-c', 'ulimit -Sn'], capture_output=True, text=True)\n"
        "print(limit.before, limit.after, limit.hard, child.stdout.strip())\n"
    )
    before, after, reported_hard, child = _run(code)
    assert (int(before), int(after), int(reported_hard)) == (_LOW, hard, hard)
    assert int(child) == hard


def test_a_limit_already_at_the_hard_one_is_left_alone() -> None:
    code = (
        "import resource\n"
        "from shared import open_files\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n"
        "limit = open_files.raise_limit()\n"
        "print(limit.before == limit.after == hard)\n"
    )
    assert _run(code) == ["True"]
