"""Where a result came from: every results JSON carries `stamp(device)` (the one definition of these fields).

    commit       the checked-out commit (git rev-parse HEAD)
    tree_clean   no tracked file differs from that commit (untracked files, like results/, do not count)
    device       "CPU: <model name>" or the CUDA device's name
    command      the command line that wrote the file
    cores, load_average   how busy the machine was when the run started (os.getloadavg, 1/5/15 min)
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return f"CPU: {cpu_name()}"


def command_line() -> str:
    script = Path(sys.argv[0])
    shown = script.resolve().relative_to(ROOT) if script.resolve().is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def stamp(device: str = "cpu") -> dict:
    """The provenance fields of a results file, read now (call it when the run starts: the load is the start's)."""
    return {"commit": git("rev-parse", "HEAD"),
            "tree_clean": git("status", "--porcelain", "--untracked-files=no") == "",
            "device": device_name(device), "command": command_line(), "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
