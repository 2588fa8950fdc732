"""The harness's compiled programs (C, in ``bench/c/``), built with gcc when first needed."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

_SOURCES = Path(__file__).parent / "c"
_BUILD = Path.home() / ".cache" / "tokenrelay-bench"


def program(name: str) -> Path:
    """The path of the built program ``name`` (``loadgen`` or ``floor``), built if out of date.

    The binary's name carries a hash of its source, so an edited source is always rebuilt.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("the benchmark builds its load generator with gcc: install gcc")
    source = _SOURCES / f"{name}.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = _BUILD / f"{name}-{digest}"
    if not binary.exists():
        _BUILD.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".tmp")
        subprocess.run(
            [gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(partial), str(source)],
            check=True,
        )
        partial.rename(binary)
    return binary


_NODE_SOURCES = Path(__file__).parent / "node"


def node_script(name: str, sources_dir: Path = _NODE_SOURCES) -> Path:
    """The path of ``<sources_dir>/<name>`` (``bench/node`` by default) in a directory with
    its npm packages installed (its ``package-lock.json``, installed once per version of the
    sources)."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError(f"{name} needs Node.js and npm")
    sources = sorted(sources_dir.glob("*.*"))
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    home = _BUILD / f"node-{digest.hexdigest()[:12]}"
    if not home.exists():
        _BUILD.mkdir(parents=True, exist_ok=True)
        # A directory of this caller's own: another process may be installing the same.
        partial = Path(tempfile.mkdtemp(prefix=f"{home.name}.", dir=_BUILD))
        try:
            for path in sources:
                shutil.copy(path, partial / path.name)
            subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=partial,
                check=True,
            )
            try:
                partial.rename(home)
            except OSError:
                if not home.exists():
                    raise  # not another process's finished install: a real failure
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return home / name
