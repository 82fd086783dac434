"""InterestTransfer: L layers of multi-head attention from the target (scene + item) over the fused
interests of every scene. Its attention weights say how much each source scene contributed."""

from __future__ import annotations

import torch
from torch import nn

from msit.model.config import ModelConfig


class TransferLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.embed_dim
        # Dropout on the attention's output, not on its weights: the weights are the explanation (and the
        # KL regulariser's input), and must stay a distribution over scenes while training too.
        self.attention = nn.MultiheadAttention(d, cfg.transfer_heads, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(2 * d, d))

    def forward(self, query: torch.Tensor, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # query (B, 1, d), fused (B, S, d) -> new query (B, 1, d), weights (B, S) averaged over heads
        attended, weights = self.attention(query, fused, fused, need_weights=True, average_attn_weights=True)
        query = self.norm1(query + self.dropout(attended))
        return self.norm2(query + self.ffn(query)), weights[:, 0]


class InterestTransfer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.embed_dim
        self.query = nn.Linear(2 * d, d)
        self.is_target = nn.Parameter(torch.zeros(d))  # marks the target scene among the keys
        self.layers = nn.ModuleList(TransferLayer(cfg) for _ in range(cfg.transfer_layers))

    def forward(self, fused: torch.Tensor, target_scene: torch.Tensor, target_item: torch.Tensor,
                target_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fused (B, S, d); target_scene g^t, target_item (B, d); target_slot (B,) index into S, -1 if unknown
        S = fused.shape[1]
        is_target = (torch.arange(S, device=fused.device)[None, :] == target_slot[:, None]).float()
        keys = fused + is_target[..., None] * self.is_target
        query = self.query(torch.cat([target_scene, target_item], dim=-1))[:, None]
        for layer in self.layers:
            query, weights = layer(query, keys)
        return query[:, 0], weights  # transferred interest h^t (B, d), transfer attention (B, S)
