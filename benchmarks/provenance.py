"""Where a result came from: every results JSON carries `stamp(device)` (the one definition of these fields).

    commit       the checked-out commit (git rev-parse HEAD)
    tree_clean   no tracked file differs from that commit (untracked files, like results/, do not count)
    device       "CPU: <model name>" or the CUDA device's name
    command      the command line that wrote the file
    cores, load_average   how busy the machine was when the run started (os.getloadavg, 1/5/15 min)

A script that also records the load at the end names it `load_average_end`. A file that keeps parts of an
earlier file (a resumed run, a run of some parts) keeps each part's commit beside it: the top-level stamp is
the run that wrote the file.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("commit", "tree_clean", "device", "command", "cores", "load_average")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    return next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return f"CPU: {cpu_name()}"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def command_line() -> str:
    script = Path(sys.argv[0])
    shown = script.resolve().relative_to(ROOT) if script.resolve().is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def stamp(device: str = "cpu") -> dict:
    """The provenance fields of a results file, read now (call it when the run starts: the load is the start's)."""
    return {
        "commit": git("rev-parse", "HEAD"),
        "tree_clean": git("status", "--porcelain", "--untracked-files=no") == "",
        "device": device_name(device),
        "command": command_line(),
        "cores": os.cpu_count(),
        "load_average": load_average(),
    }


def stamp_of(report: dict) -> dict:
    """The stamp fields an earlier results file holds (those it has), to keep beside a part taken from it."""
    return {key: report[key] for key in KEYS if key in report}
