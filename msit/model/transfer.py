"""InterestTransfer: L layers of multi-head attention from the target (scene + item) over the fused
interests of every scene. Its attention weights say how much each source scene contributed.

Beyond MODEL.md, `transfer_pair_bias: true` gives each layer a learned bias per (target scene, head, source
scene) on the attention logits: a prior of which scenes inform which, that the content-based logits then move
per user and item (like a relative-position bias, with scene pairs for positions)."""

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

    def forward(
        self, query: torch.Tensor, fused: torch.Tensor, pair_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # query (M, d), fused (M, S, d), pair_bias (M, heads, S) -> new query (M, d), weights (M, S) averaged over
        # heads. One query over a few scenes: plain matrix products (the weights are needed, and there is nothing
        # for a fused kernel to save).
        M, S, d = fused.shape
        h, dh = self.heads, d // self.heads
        q = self.query(query).view(M, h, 1, dh)
        k, v = self.key_value(fused).view(M, S, 2, h, dh).permute(2, 0, 3, 1, 4)  # (M, heads, S, dh) each
        logits = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (M, heads, 1, S)
        if pair_bias is not None:
            logits = logits + pair_bias[:, :, None, :]
        weights = torch.softmax(logits, dim=-1)
        attended = self.out((weights @ v).reshape(M, d))
        query = self.norm1(query + self.dropout(attended))
        return self.norm2(query + self.ffn(query)), weights[:, :, 0].mean(1)


class PairBias(nn.Module):
    """A learned bias on each transfer layer's logits per (target slot, head, source scene); zero at the start.
    Row S is an unknown target scene's (scene_slots)."""

    parameter_kinds: ClassVar[dict[str, str]] = {"table": "table"}

    def __init__(self, cfg: ModelConfig, n_scenes: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(n_scenes + 1, cfg.transfer_layers, cfg.transfer_heads, n_scenes))

    def forward(self, target_slot: torch.Tensor) -> torch.Tensor:
        return self.table[target_slot]  # (M, layers, heads, S)


class InterestTransfer(nn.Module):
    parameter_kinds: ClassVar[dict[str, str]] = {"is_target": "bias"}  # added to the target scene's key

    def __init__(self, cfg: ModelConfig, n_scenes: int):
        super().__init__()
        d = cfg.embed_dim
        self.query = nn.Linear(2 * d, d)
        self.is_target = nn.Parameter(torch.zeros(d))  # marks the target scene among the keys
        self.pair_bias = PairBias(cfg, n_scenes) if cfg.transfer_pair_bias else None
        self.layers = nn.ModuleList(TransferLayer(cfg) for _ in range(cfg.transfer_layers))

    def forward(
        self, fused: torch.Tensor, target_scene: torch.Tensor, target_item: torch.Tensor, target_slot: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # fused (M, S, d); target_scene g^t, target_item (M, d); target_slot (M,): S for an unknown scene (scene_slots)
        S = fused.shape[1]
        is_target = (torch.arange(S, device=fused.device)[None, :] == target_slot[:, None]).to(fused.dtype)
        keys = fused + is_target[..., None] * self.is_target
        query = self.query(torch.cat([target_scene, target_item], dim=-1))
        pair_bias = self.pair_bias(target_slot) if self.pair_bias is not None else None  # (M, layers, heads, S)
        for i, layer in enumerate(self.layers):
            query, weights = layer(query, keys, pair_bias[:, i] if pair_bias is not None else None)
        return query, weights  # transferred interest h^t (M, d), transfer attention (M, S)
