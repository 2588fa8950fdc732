"""What a benchmark run records about itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.__main__ import _build


def _git(cwd: Path, *argv: str) -> str:
    done = subprocess.run(["git", *argv], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_build_names_the_commit_and_whether_the_code_had_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("one")
    _git(tmp_path, "add", "f")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.chdir(tmp_path)
    assert _build() == {"commit": _git(tmp_path, "rev-parse", "HEAD"), "changed": False}
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("a run")
    _git(tmp_path, "add", "docs")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    (tmp_path / "docs" / "results.md").write_text("the next run")
    assert _build() == {"commit": _git(tmp_path, "rev-parse", "HEAD"), "changed": False}
    (tmp_path / "f").write_text("two")
    assert _build() == {"commit": _git(tmp_path, "rev-parse", "HEAD"), "changed": True}


def test_outside_a_checkout_the_build_is_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert _build() is None
