"""Fusion: interest h^s and scene awareness g^s become one fused interest f^s per scene."""

from __future__ import annotations

import torch
from torch import nn

from msit.model.config import ModelConfig


class Fusion(nn.Module):
    """`sum`: h + g. `concat`: MLP([h; g]). `gate`: a sigmoid gate computed from the scene, mixing h
    and g. `attention`: self-attention over the parts [h, g], then their mean."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.kind = cfg.embed_dim, cfg.fusion
        if self.kind == "concat":
            self.mlp = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d))
        elif self.kind == "gate":
            self.gate = nn.Linear(d, d)
        elif self.kind == "attention":
            self.attention = nn.MultiheadAttention(d, cfg.transfer_heads, dropout=cfg.dropout, batch_first=True)
            self.norm = nn.LayerNorm(d)

    def forward(self, interest: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:  # (B, S, d) x2 -> (B, S, d)
        if self.kind == "sum":
            return interest + scene
        if self.kind == "concat":
            return self.mlp(torch.cat([interest, scene], dim=-1))
        if self.kind == "gate":
            gate = torch.sigmoid(self.gate(scene))
            return gate * interest + (1 - gate) * scene
        B, S, d = interest.shape
        parts = torch.stack([interest, scene], dim=2).reshape(B * S, 2, d)
        mixed, _ = self.attention(parts, parts, parts, need_weights=False)
        return self.norm(parts + mixed).mean(1).reshape(B, S, d)
