"""Measuring with another commit's code, for the benchmarks that compare before and after in one run: that
commit in a temporary git worktree, and a subprocess whose imports come from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from provenance import git


@contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """The code of `rev`, checked out into a temporary worktree for the duration."""
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "before"
        git("worktree", "add", "--detach", str(worktree), rev)
        try:
            yield worktree
        finally:
            git("worktree", "remove", "--force", str(worktree))


def run_json(code: Path, script: Path, args: list[str], what: str) -> dict:
    """`script args` in a subprocess importing msit (and benchmarks/) from `code`, one torch thread; the JSON
    object its last output line holds. The script puts PYTHONPATH first on sys.path (`use_code_on_path`)."""
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{code / 'benchmarks'}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), *args], cwd=code, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{what} with the code at {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def use_code_on_path() -> None:
    """In the subprocess: that side's msit and benchmarks first, before this checkout's script directory."""
    sys.path[:0] = os.environ["PYTHONPATH"].split(os.pathsep)
