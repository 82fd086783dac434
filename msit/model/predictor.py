"""Predictor: an MLP over [h^t, user, item, g^t] gives the logit, plus an optional per-scene bias."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from msit.model.config import ModelConfig
from msit.model.dropout import Dropout


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    """Linear layers with GELU and dropout between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.GELU(), Dropout(dropout)]
    return nn.Sequential(*layers)


class Predictor(nn.Module):
    def __init__(self, cfg: ModelConfig, n_inputs: int, scene_vocab: int):
        super().__init__()
        self.mlp = mlp([n_inputs * cfg.embed_dim, *cfg.mlp_dims, 1], cfg.dropout)
        self.scene_bias = nn.Embedding(scene_vocab, 1) if cfg.scene_bias else None
        if self.scene_bias is not None:
            nn.init.zeros_(self.scene_bias.weight)

    def forward(self, parts: list[torch.Tensor], scene_ids: torch.Tensor) -> torch.Tensor:  # -> (B,)
        logits = self.mlp(torch.cat(parts, dim=-1))[:, 0]
        return logits + self.scene_bias(scene_ids)[:, 0] if self.scene_bias is not None else logits
