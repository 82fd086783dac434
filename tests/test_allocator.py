"""msit.allocator: after keep_freed_memory, MSIT's training steps no longer fault in fresh pages for the
tensors they reallocate every step. Each check runs in a fresh interpreter, so that neither the test process's
state nor its environment (glibc's MALLOC_* variables) decides the outcome."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from msit.allocator import GLIBC_VARIABLES

# Training steps at the benchmark's shape (batch 1,024, history 50, d 32): page faults per step in steady state
# (after warm-up steps), before and after keep_freed_memory.
PROGRAM = """
import resource, torch
from model_helpers import item_table, random_batch, tiny_spec
from msit.allocator import keep_freed_memory
from msit.model import ModelConfig, build_model
from msit.training.trainer import TrainConfig, make_optimizer, train_step

torch.manual_seed(0)
torch.set_num_threads(1)
model = build_model(ModelConfig(embed_dim=32, history_length=50), tiny_spec(), item_table())
optimizer = make_optimizer(model, TrainConfig())
batch = random_batch(1024, width=50)

def faults_per_step(steps=8):  # 8 steps: the heap can still grow once in a while after warm-up
    for _ in range(4):  # warm-up
        train_step(model, batch, optimizer)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        train_step(model, batch, optimizer)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // steps

untuned = faults_per_step()
tuned = keep_freed_memory()
print(untuned, tuned, faults_per_step())
"""


def run(env_extra: dict[str, str]) -> tuple[int, str, int]:
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_VARIABLES and k != "MSIT_KEEP_FREED_MEMORY"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], env=env | env_extra, capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), out[1], int(out[2])


glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)


@glibc_only
def test_freed_memory_is_kept_between_steps() -> None:
    untuned, tuned, faults = run({})
    assert tuned == "True"
    assert untuned > 1_000  # glibc trims the freed activations and faults them in again each step
    assert faults < untuned / 10


@glibc_only
def test_the_environment_can_opt_out() -> None:
    untuned, tuned, faults = run({"MSIT_KEEP_FREED_MEMORY": "0"})
    assert tuned == "False"
    assert faults > untuned / 2  # malloc left as it was
    _, tuned, _ = run({"MALLOC_TRIM_THRESHOLD_": "131072"})  # the user tuned glibc themselves
    assert tuned == "False"
