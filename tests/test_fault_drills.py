"""benchmarks/fault_drills.py's command line (the drills themselves are a benchmark, not a test: minutes each)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fault_drills.py"


def test_help_names_every_drill():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    for name in (
        "train_rank0_kill",
        "train_rank1_kill",
        "driver_kill",
        "node_kill_train",
        "node_kill_serve",
        "serve_replica_kill",
        "serve_broken_model",
        "serve_poison",
    ):
        assert name in done.stdout


def test_an_unknown_drill_is_refused_before_anything_runs():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "serve_poison,nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown drill(s) nope; known: train_rank0_kill," in done.stderr
