"""The training settings every path shares (`trainer.fit`, the epoch loop, Ray Train, fine-tuning, Tune)."""

from __future__ import annotations

from dataclasses import dataclass

from msit.errors import ConfigError


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 2  # epochs without a better val AUC before stopping
    seed: int = 0
    eval_batch_size: int = 4096
    grad_clip: float = 5.0
    deterministic: bool | None = None  # deterministic kernels; None: on the CPU only (they slow GPU kernels)
    compile: bool = False  # torch.compile the model for training; off by default (docs/benchmarks.md, "Step speed")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(
                f"lr must be > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}"
            )
