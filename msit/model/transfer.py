"""InterestTransfer: L layers of multi-head attention from the target (scene + item) over the fused
interests of every scene. Its attention weights say how much each source scene contributed."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from msit.model.config import ModelConfig
from msit.model.dropout import Dropout
from msit.model.interest import attention_projections


class TransferLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.heads = cfg.embed_dim, cfg.transfer_heads
        self.query, self.key_value = attention_projections(d, (d, 2 * d))
        self.out = nn.Linear(d, d)
        nn.init.zeros_(self.out.bias)
        # Dropout on the attention's output, not on its weights: the weights are the explanation (and the
        # KL regulariser's input), and must stay a distribution over scenes while training too.
        self.dropout = Dropout(cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), Dropout(cfg.dropout), nn.Linear(2 * d, d))

    def forward(self, query: torch.Tensor, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # query (M, d), fused (M, S, d) -> new query (M, d), weights (M, S) averaged over heads. One query over a
        # few scenes: plain matrix products (the weights are needed, and there is nothing for a fused kernel to save).
        M, S, d = fused.shape
        h, dh = self.heads, d // self.heads
        q = self.query(query).view(M, h, 1, dh)
        k, v = self.key_value(fused).view(M, S, 2, h, dh).permute(2, 0, 3, 1, 4)  # (M, heads, S, dh) each
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)  # (M, heads, 1, S)
        attended = self.out((weights @ v).reshape(M, d))
        query = self.norm1(query + self.dropout(attended))
        return self.norm2(query + self.ffn(query)), weights[:, :, 0].mean(1)


class InterestTransfer(nn.Module):
    parameter_kinds: ClassVar[dict[str, str]] = {"is_target": "bias"}  # added to the target scene's key

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.embed_dim
        self.query = nn.Linear(2 * d, d)
        self.is_target = nn.Parameter(torch.zeros(d))  # marks the target scene among the keys
        self.layers = nn.ModuleList(TransferLayer(cfg) for _ in range(cfg.transfer_layers))

    def forward(
        self, fused: torch.Tensor, target_scene: torch.Tensor, target_item: torch.Tensor, target_slot: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # fused (M, S, d); target_scene g^t, target_item (M, d); target_slot (M,): S for an unknown scene (scene_slots)
        S = fused.shape[1]
        is_target = (torch.arange(S, device=fused.device)[None, :] == target_slot[:, None]).to(fused.dtype)
        keys = fused + is_target[..., None] * self.is_target
        query = self.query(torch.cat([target_scene, target_item], dim=-1))
        for layer in self.layers:
            query, weights = layer(query, keys)
        return query, weights  # transferred interest h^t (M, d), transfer attention (M, S)
