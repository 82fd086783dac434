"""InterestNetwork: the user's interest in each scene, h^s, from their behaviour history.

Split in two like the model (`msit.model.output`): `encode` runs once per user side (the history
tokens and their Transformer encoder, the pooling's keys and values), `pool` once per candidate
(attention pooling with the candidate as query)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from msit.data.schema import HISTORY_ITEM_IDS, HISTORY_LABELS, HISTORY_SCENE_IDS, HISTORY_TIME_GAPS, known_scene_ids
from msit.model.config import ModelConfig
from msit.model.dropout import Dropout
from msit.model.features import FeatureEmbedder
from msit.model.output import UserSide

NEG = -1e9  # finite "minus infinity": a scene with no history gives uniform (then discarded) weights, never NaN


def time_gap_buckets(gaps: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Seconds -> log2 buckets: 1 s, 2 s, 4 s, ... (the last bucket holds everything older)."""
    return torch.log2(gaps.float().clamp(min=0) + 1).floor().long().clamp(max=n_buckets - 1)


def attention_projections(d: int, widths: tuple[int, ...]) -> list[nn.Linear]:
    """An attention layer's input projections (query, key, value: d -> each width), initialised as torch's
    MultiheadAttention initialises its one stacked matrix: Xavier over all of them together, zero bias."""
    stacked = torch.empty(sum(widths), d)
    nn.init.xavier_uniform_(stacked)
    layers = []
    for weight in stacked.split(list(widths)):
        layer = nn.Linear(d, len(weight))
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.zero_()
        layers.append(layer)
    return layers


class HistoryEncoderLayer(nn.Module):
    """A pre-norm Transformer encoder layer on fused attention (`scaled_dot_product_attention`). Dropout acts
    on the attention's output and in and after the feed-forward, as in torch's TransformerEncoderLayer, but not
    on the B x heads x N x N attention probabilities."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # Three projections, not one of width 3d split in three: the split's views would be copied for the
        # fused kernel, and its gradient stacked back.
        self.query, self.key, self.value = attention_projections(d, (d, d, d))
        self.out = nn.Linear(d, d)
        nn.init.zeros_(self.out.bias)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), Dropout(dropout), nn.Linear(2 * d, d))
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # x (B, N, d); allowed (B, 1, N, N): True where a token may attend to another, shared by every head
        B, N, d = x.shape
        normed = self.norm1(x)
        q, k, v = (
            project(normed).view(B, N, self.heads, -1).transpose(1, 2)  # (B, heads, N, d / heads)
            for project in (self.query, self.key, self.value)
        )
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, heads, N, d / heads)
        x = x + self.dropout(self.out(attended.transpose(1, 2).reshape(B, N, d)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class InterestNetwork(nn.Module):
    """History tokens (item + scene + label + time gap + position) go through a Transformer encoder
    in which a token attends only to tokens of its own scene; then, per scene, attention pooling with
    the target item as query gives one interest vector. A scene with no history gets a learned
    "empty" vector."""

    scene_ids: torch.Tensor  # a buffer

    # one row per scene slot, looked up for a scene with no history
    parameter_kinds: ClassVar[dict[str, str]] = {"empty": "table"}

    def __init__(self, cfg: ModelConfig, n_scenes: int, history_length: int):
        super().__init__()
        d, self.heads = cfg.embed_dim, cfg.interest_heads
        self.label = nn.Embedding(2, d)
        self.gap = nn.Embedding(cfg.gap_buckets, d)
        self.position = nn.Embedding(history_length, d)
        self.gap_buckets = cfg.gap_buckets
        self.encoder = nn.ModuleList(
            HistoryEncoderLayer(d, cfg.interest_heads, cfg.dropout) for _ in range(cfg.interest_layers)
        )
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        # Evidence per scene (log events, log positives, smoothed positive rate): how much the scene's history
        # says and which way, which attention pooling (a weighted mean) cannot express.
        self.evidence = nn.Linear(3, d) if cfg.scene_evidence else None
        self.empty = nn.Parameter(torch.zeros(n_scenes, d))
        nn.init.normal_(self.empty, std=0.02)
        self.register_buffer("scene_ids", known_scene_ids(n_scenes), persistent=False)  # slot s -> its id

    def encode(self, embed: FeatureEmbedder, batch: dict[str, torch.Tensor]) -> UserSide:
        """The encoded history of each row, as the pooling's keys and values, and which scene each event is in."""
        items, scenes = batch[HISTORY_ITEM_IDS], batch[HISTORY_SCENE_IDS]  # (R, N)
        R, N = items.shape
        # scene + label + time gap of each token as one lookup in the small table of their sums (one gather and
        # one gradient scatter over the R x N tokens instead of three).
        G = self.gap_buckets
        context = (
            embed.scene.weight[:, None, None] + self.label.weight[None, :, None] + self.gap.weight[None, None]
        ).flatten(0, 2)  # (scenes x 2 x G, d)
        index = (scenes * 2 + batch[HISTORY_LABELS].clamp(0, 1)) * G + time_gap_buckets(batch[HISTORY_TIME_GAPS], G)
        tokens = embed.item_repr(items) + F.embedding(index, context) + self.position.weight[:N]

        # Self-attention within a scene only (padding is scene 0, so it never mixes with real tokens);
        # every token may attend to itself, so that no row is fully masked. One mask for every head and layer.
        allowed = (scenes[:, :, None] == scenes[:, None, :]) | torch.eye(N, dtype=torch.bool, device=items.device)
        encoded = tokens
        for layer in self.encoder:
            encoded = layer(encoded, allowed[:, None])  # (R, N, d)

        h, dh = self.heads, tokens.shape[-1] // self.heads
        in_scene = (scenes[:, None, :] == self.scene_ids[None, :, None]) & (items != 0)[:, None, :]  # (R, S, N)
        user: UserSide = {
            "history_keys": self.key(encoded).view(R, N, h, dh).transpose(1, 2),  # (R, heads, N, dh)
            "history_values": self.value(encoded).view(R, N, h, dh).transpose(1, 2),
            "history_in_scene": in_scene,
        }
        if self.evidence is not None:
            events = in_scene.sum(-1).to(tokens.dtype)  # (R, S)
            positives = (in_scene & (batch[HISTORY_LABELS] == 1)[:, None, :]).sum(-1).to(tokens.dtype)
            counts = torch.stack([events.log1p(), positives.log1p(), (positives + 1) / (events + 2) - 0.5], -1)
            user["history_evidence"] = self.evidence(counts)  # (R, S, d)
        return user

    def pool(
        self,
        user: UserSide,
        target_item: torch.Tensor,
        explain: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target attention per scene: query = the candidate, keys = that scene's real history tokens.
        target_item (R, C, d) -> interest h^s (R, C, S, d); behaviour attention (R, C, S, N) if `explain`."""
        keys, values, in_scene = user["history_keys"], user["history_values"], user["history_in_scene"]
        R, C, d = target_item.shape
        h, dh = self.heads, d // self.heads
        q = self.query(target_item).view(R, C, h, dh).transpose(1, 2)  # (R, heads, C, dh)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(dh)  # (R, heads, C, N)
        S = in_scene.shape[1]
        scores = scores[:, :, None].masked_fill(~in_scene[:, None, :, None, :], NEG)  # (R, heads, S, C, N)
        has_history = in_scene.any(-1)  # (R, S)
        weights = torch.softmax(scores, dim=-1) * has_history[:, None, :, None, None]
        # One matrix product per (row, head) over every scene and candidate: (S C, N) @ (N, dh).
        pooled = (weights.view(R, h, S * C, -1) @ values).view(R, h, S, C, dh)
        pooled = pooled.permute(0, 3, 2, 1, 4).reshape(R, C, S, d)  # (R, C, S, d)
        interest = torch.where(has_history[:, None, :, None], self.out(pooled), self.empty)
        if "history_evidence" in user:
            interest = interest + user["history_evidence"][:, None]
        behaviour = weights.mean(1).transpose(1, 2) if explain else None  # (R, C, S, N)
        return interest, behaviour
