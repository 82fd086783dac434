"""What every model's forward pass returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B,) engagement logit for the target item in the target scene
    transfer_attention: torch.Tensor | None = None  # (B, S) weight of each source scene; rows sum to 1
    behaviour_attention: torch.Tensor | None = None  # (B, S, N) per scene, weight of each past event
    regularization: torch.Tensor | None = None  # scalar added to the loss (already weighted)
