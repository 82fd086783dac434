"""Fusion: interest h^s and scene awareness g^s become one fused interest f^s per scene."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from msit.model.config import ModelConfig
from msit.model.dropout import Dropout
from msit.model.interest import attention_projections


class Fusion(nn.Module):
    """`sum`: h + g. `concat`: MLP([h; g]). `gate`: a sigmoid gate computed from the scene, mixing h
    and g. `attention`: self-attention over the parts [h, g] (dropout on its output), then their mean."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.kind, self.heads = cfg.embed_dim, cfg.fusion, cfg.transfer_heads
        if self.kind == "concat":
            self.mlp = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d))
        elif self.kind == "gate":
            self.gate = nn.Linear(d, d)
        elif self.kind == "attention":
            (self.qkv,) = attention_projections(d, (3 * d,))
            self.out = nn.Linear(d, d)
            nn.init.zeros_(self.out.bias)
            self.dropout = Dropout(cfg.dropout)
            self.norm = nn.LayerNorm(d)

    def forward(self, interest: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
        # interest h^s (..., S, d); scene g^s (S, d) -> f^s (..., S, d)
        if self.kind == "sum":
            return interest + scene
        if self.kind == "concat":
            return self.mlp(torch.cat([interest, scene.expand_as(interest)], dim=-1))
        if self.kind == "gate":
            gate = torch.sigmoid(self.gate(scene))
            return gate * interest + (1 - gate) * scene
        parts = torch.stack([interest, scene.expand_as(interest)], dim=-2)  # (..., S, 2, d)
        d = parts.shape[-1]
        q, k, v = self.qkv(parts).unflatten(-1, (3, self.heads, d // self.heads)).movedim(-3, 0).transpose(-2, -3)
        mixed = F.scaled_dot_product_attention(q, k, v)  # (..., S, heads, 2, d / heads)
        mixed = self.out(mixed.transpose(-2, -3).flatten(-2))  # (..., S, 2, d)
        return self.norm(parts + self.dropout(mixed)).mean(-2)
