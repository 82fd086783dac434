"""Baselines behind the same interface: Shared-Bottom, MMoE (Ma et al. 2018) and STAR (Sheng et al. 2021).

They read the same features as MSIT: user, target item, target scene with its context, and the
behaviour history mean-pooled (item + label) — so that a comparison measures the architecture, not
the inputs. Each scene (plus one slot for an unknown scene) has its own tower or weights.
"""

from __future__ import annotations

import torch
from torch import nn

from msit.data.feature_spec import FeatureSpec
from msit.model.config import ModelConfig
from msit.model.features import FeatureEmbedder
from msit.model.msit import target_slots
from msit.model.output import ModelOutput
from msit.model.predictor import mlp


class _Inputs(nn.Module):
    """[user, item, scene + context, mean of history (item + label)] -> (B, 4d), and the scene slot."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, item_table, item_text):
        super().__init__()
        self.embed = FeatureEmbedder(cfg, spec, item_table, item_text)
        self.label = nn.Embedding(2, cfg.embed_dim)
        self.n_scenes = len(spec.scenarios)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        items = batch["history_item_ids"]
        real = (items != 0).unsqueeze(-1).float()
        past = self.embed.item_repr(items) + self.label(batch["history_labels"].clamp(0, 1))
        history = (past * real).sum(1) / real.sum(1).clamp(min=1.0)
        scene = self.embed.scene(batch["scene_id"]) + self.embed.context_repr(batch)
        x = torch.cat([self.embed.user_repr(batch), self.embed.item_repr(batch["item_id"]), scene, history], -1)
        slots = target_slots(batch["scene_id"], self.n_scenes)
        return x, torch.where(slots >= 0, slots, torch.full_like(slots, self.n_scenes))  # unknown -> last slot


class _Towers(nn.Module):
    """One small MLP tower per scene slot, evaluated for every row and gathered by slot."""

    def __init__(self, n_slots: int, width: int, dropout: float):
        super().__init__()
        self.towers = nn.ModuleList(mlp([width, max(width // 2, 1), 1], dropout) for _ in range(n_slots))

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        every = torch.cat([tower(x) for tower in self.towers], dim=-1)  # (B, slots)
        return every.gather(1, slots[:, None])[:, 0]


class SharedBottom(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, item_table=None, item_text=None, scene_text=None):
        super().__init__()
        self.history_length = cfg.history_length  # N: the window width its batches are cut at
        self.inputs = _Inputs(cfg, spec, item_table, item_text)
        self.bottom = nn.Sequential(mlp([4 * cfg.embed_dim, *cfg.mlp_dims], cfg.dropout), nn.GELU())
        self.towers = _Towers(len(spec.scenarios) + 1, cfg.mlp_dims[-1], cfg.dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        x, slots = self.inputs(batch)
        return ModelOutput(self.towers(self.bottom(x), slots))


class MMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, item_table=None, item_text=None, scene_text=None):
        super().__init__()
        n_slots, width = len(spec.scenarios) + 1, cfg.mlp_dims[-1]
        self.history_length = cfg.history_length  # N: the window width its batches are cut at
        self.inputs = _Inputs(cfg, spec, item_table, item_text)
        self.experts = nn.ModuleList(nn.Sequential(mlp([4 * cfg.embed_dim, *cfg.mlp_dims], cfg.dropout), nn.GELU())
                                     for _ in range(cfg.num_experts))
        self.gates = nn.Linear(4 * cfg.embed_dim, n_slots * cfg.num_experts)  # one softmax gate per scene
        self.towers = _Towers(n_slots, width, cfg.dropout)
        self.n_experts = cfg.num_experts

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        x, slots = self.inputs(batch)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # (B, E, w)
        gates = self.gates(x).view(len(x), -1, self.n_experts)  # (B, slots, E)
        gate = torch.softmax(gates.gather(1, slots[:, None, None].expand(-1, 1, self.n_experts))[:, 0], -1)
        return ModelOutput(self.towers((gate[..., None] * experts).sum(1), slots))


class _StarLinear(nn.Module):
    """STAR's star-topology layer: W = W_shared ⊙ W_scene, b = b_shared + b_scene."""

    def __init__(self, n_slots: int, n_in: int, n_out: int):
        super().__init__()
        self.shared = nn.Linear(n_in, n_out)
        self.scene_weight = nn.Parameter(torch.ones(n_slots, n_in, n_out))
        self.scene_bias = nn.Parameter(torch.zeros(n_slots, n_out))

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        weight = self.shared.weight.t()[None] * self.scene_weight[slots]  # (B, in, out)
        return torch.einsum("bi,bio->bo", x, weight) + self.shared.bias + self.scene_bias[slots]


class _PartitionedNorm(nn.Module):
    """STAR's partitioned normalisation: batch statistics, then shared x per-scene scale and shift."""

    def __init__(self, n_slots: int, width: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(width, affine=False)
        self.gamma, self.beta = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.scene_gamma = nn.Parameter(torch.ones(n_slots, width))
        self.scene_beta = nn.Parameter(torch.zeros(n_slots, width))

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * (self.gamma * self.scene_gamma[slots]) + self.beta + self.scene_beta[slots]


class STAR(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, item_table=None, item_text=None, scene_text=None):
        super().__init__()
        n_slots, d = len(spec.scenarios) + 1, cfg.embed_dim
        self.history_length = cfg.history_length  # N: the window width its batches are cut at
        self.inputs = _Inputs(cfg, spec, item_table, item_text)
        self.norm = _PartitionedNorm(n_slots, 4 * d)
        sizes = [4 * d, *cfg.mlp_dims, 1]
        self.layers = nn.ModuleList(_StarLinear(n_slots, a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.dropout = nn.Dropout(cfg.dropout)
        self.auxiliary = mlp([2 * d, d, 1], cfg.dropout)  # the auxiliary network on scene + context

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        x, slots = self.inputs(batch)
        h = self.norm(x, slots)
        for i, layer in enumerate(self.layers):
            h = layer(h, slots)
            if i < len(self.layers) - 1:
                h = self.dropout(nn.functional.gelu(h))
        scene = x[:, 2 * x.shape[1] // 4: 3 * x.shape[1] // 4]
        aux = self.auxiliary(torch.cat([scene, self.inputs.embed.scene(batch["scene_id"])], -1))[:, 0]
        return ModelOutput(h[:, 0] + aux)


__all__ = ["MMoE", "STAR", "SharedBottom"]
