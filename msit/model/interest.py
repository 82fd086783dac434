"""InterestNetwork: the user's interest in each scene, h^s, from their behaviour history."""

from __future__ import annotations

import math

import torch
from torch import nn

from msit.model.config import ModelConfig
from msit.model.features import FeatureEmbedder

NEG = -1e9  # finite "minus infinity": a scene with no history gives uniform (then discarded) weights, never NaN


def time_gap_buckets(gaps: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Seconds -> log2 buckets: 1 s, 2 s, 4 s, ... (the last bucket holds everything older)."""
    return torch.log2(gaps.float().clamp(min=0) + 1).floor().long().clamp(max=n_buckets - 1)


class InterestNetwork(nn.Module):
    """History tokens (item + scene + label + time gap + position) go through a Transformer encoder
    in which a token attends only to tokens of its own scene; then, per scene, attention pooling with
    the target item as query gives one interest vector. A scene with no history gets a learned
    "empty" vector."""

    def __init__(self, cfg: ModelConfig, n_scenes: int, history_length: int):
        super().__init__()
        d, self.heads = cfg.embed_dim, cfg.interest_heads
        self.label = nn.Embedding(2, d)
        self.gap = nn.Embedding(cfg.gap_buckets, d)
        self.position = nn.Embedding(history_length, d)
        self.gap_buckets = cfg.gap_buckets
        layer = nn.TransformerEncoderLayer(d, cfg.interest_heads, dim_feedforward=2 * d, dropout=cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.interest_layers, enable_nested_tensor=False)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.empty = nn.Parameter(torch.zeros(n_scenes, d))
        nn.init.normal_(self.empty, std=0.02)
        self.register_buffer("scene_ids", torch.arange(n_scenes) + 2, persistent=False)  # slot s <-> scene id s+2

    def forward(self, embed: FeatureEmbedder, batch: dict[str, torch.Tensor], target_item: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        items, scenes = batch["history_item_ids"], batch["history_scene_ids"]  # (B, N)
        B, N = items.shape
        real = items != 0  # (B, N) padding is item 0
        tokens = (embed.item_repr(items) + embed.scene(scenes) + self.label(batch["history_labels"].clamp(0, 1))
                  + self.gap(time_gap_buckets(batch["history_time_gaps"], self.gap_buckets))
                  + self.position(torch.arange(N, device=items.device)))

        # Self-attention within a scene only (padding is scene 0, so it never mixes with real tokens);
        # every token may attend to itself, so that no row is fully masked.
        blocked = (scenes[:, :, None] != scenes[:, None, :]) & ~torch.eye(N, dtype=torch.bool, device=items.device)
        encoded = self.encoder(tokens, mask=blocked.repeat_interleave(self.heads, dim=0))  # (B, N, d)

        # Target attention per scene: query = target item, keys = that scene's real history tokens.
        h, dh = self.heads, tokens.shape[-1] // self.heads
        q = self.query(target_item).view(B, h, dh)
        k = self.key(encoded).view(B, N, h, dh)
        v = self.value(encoded).view(B, N, h, dh)
        scores = torch.einsum("bhd,bnhd->bhn", q, k) / math.sqrt(dh)  # (B, H, N)
        in_scene = (scenes[:, None, :] == self.scene_ids[None, :, None]) & real[:, None, :]  # (B, S, N)
        scores = scores[:, None].masked_fill(~in_scene[:, :, None], NEG)  # (B, S, H, N)
        has_history = in_scene.any(-1)  # (B, S)
        weights = torch.softmax(scores, dim=-1) * has_history[:, :, None, None]
        pooled = self.out(torch.einsum("bshn,bnhd->bshd", weights, v).reshape(B, -1, h * dh))  # (B, S, d)
        interest = torch.where(has_history[..., None], pooled, self.empty[None])
        return interest, weights.mean(2)  # (B, S, d), behaviour attention (B, S, N)
