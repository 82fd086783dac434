"""Baselines behind the same interface: Shared-Bottom, MMoE (Ma et al. 2018) and STAR (Sheng et al. 2021).

They read the same features as MSIT: user, target item, target scene with its context, and the
behaviour history mean-pooled (item + label) — so that a comparison measures the architecture, not
the inputs. Each scene (plus one slot for an unknown scene) has its own tower or weights.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, cast

import torch
from torch import nn

from msit.data.feature_spec import FeatureSpec
from msit.data.schema import FIRST_REAL, HISTORY_ITEM_IDS, HISTORY_LABELS, ITEM_ID, SCENE_ID, scene_id, scene_slots
from msit.model.config import ModelConfig
from msit.model.dropout import Dropout
from msit.model.features import FeatureEmbedder
from msit.model.output import Model, ModelOutput, UserSide, per_candidate
from msit.model.parameters import Part, ScenePart
from msit.model.predictor import mlp


class _Inputs(nn.Module):
    """The user side [user, scene + context, mean of history (item + label)] once per row; per candidate
    [user, item, scene + context, history] -> (M, 4d) and the scene slot (M,)."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, item_table, item_text):
        super().__init__()
        self.embed = FeatureEmbedder(cfg, spec, item_table, item_text)
        self.label = nn.Embedding(2, cfg.embed_dim)
        self.n_scenes = len(spec.scenarios)

    def encode_user(self, batch: dict[str, torch.Tensor]) -> UserSide:
        items = batch[HISTORY_ITEM_IDS]
        real = (items != 0).unsqueeze(-1).float()
        past = self.embed.item_repr(items) + self.label(batch[HISTORY_LABELS].clamp(0, 1))
        return {
            "user": self.embed.user_repr(batch),
            "scene": self.embed.scene(batch[SCENE_ID]) + self.embed.context_repr(batch),
            "history": (past * real).sum(1) / real.sum(1).clamp(min=1.0),
            "slot": scene_slots(batch[SCENE_ID], self.n_scenes),  # an unknown scene: the last slot's tower
            SCENE_ID: batch[SCENE_ID],
        }

    def per_candidate(self, user: UserSide, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        C = item_ids.shape[1]
        x = torch.cat(
            [
                per_candidate(user["user"], C),
                self.embed.item_repr(item_ids.flatten()),
                per_candidate(user["scene"], C),
                per_candidate(user["history"], C),
            ],
            -1,
        )
        return x, per_candidate(user["slot"], C)


class _Baseline(Model):
    """The interface every family shares (`msit.model.output`); a baseline defines `encode_user` and `logits`,
    and adds its own per-scene parts to the parts fine-tuning trains (`head_parts`, `scene_parts`)."""

    inputs: _Inputs

    def head_parts(self) -> dict[str, Part]:
        """What fine-tuning's head mode trains whole: the scene embedding and the family's per-scene parts."""
        return {"scene embedding": self.inputs.embed.scene}

    def scene_parts(self) -> dict[str, ScenePart]:
        """The per-scene parts, whose tuned scenes' rows (or towers) fine-tuning's scene mode trains."""
        return {"scene embedding": ScenePart(self.inputs.embed.scene)}

    def forward(self, batch: dict[str, torch.Tensor], explain: bool = False) -> ModelOutput:
        return self.score(self.encode_user(batch), batch[ITEM_ID][:, None], explain).one_candidate_each()

    def encode_user(self, batch: dict[str, torch.Tensor]) -> UserSide:
        return self.inputs.encode_user(batch)

    def score(self, user: UserSide, item_ids: torch.Tensor, explain: bool = False) -> ModelOutput:
        x, slots = self.inputs.per_candidate(user, item_ids)
        return ModelOutput(self.logits(x, slots, user, item_ids.shape[1]).view(item_ids.shape))

    def logits(self, x: torch.Tensor, slots: torch.Tensor, user: UserSide, candidates: int) -> torch.Tensor:
        raise NotImplementedError


class _Towers(nn.Module):
    """One small MLP tower per scene slot, evaluated for every row and gathered by slot."""

    def __init__(self, n_slots: int, width: int, dropout: float):
        super().__init__()
        self.towers = nn.ModuleList(mlp([width, max(width // 2, 1), 1], dropout) for _ in range(n_slots))

    def scene_parts(self) -> dict[str, ScenePart]:
        """Tower s belongs to the scene of slot s (the last, for unknown scenes, to no real id)."""
        return {f"tower {slot}": ScenePart(tower, scene_id=scene_id(slot)) for slot, tower in enumerate(self.towers)}

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        every = torch.cat([tower(x) for tower in self.towers], dim=-1)  # (B, slots)
        return every.gather(1, slots[:, None])[:, 0]


class SharedBottom(_Baseline):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, item_table=None, item_text=None, scene_text=None):
        super().__init__()
        self.history_length = cfg.history_length  # N: the window width its batches are cut at
        self.inputs = _Inputs(cfg, spec, item_table, item_text)
        self.bottom = nn.Sequential(mlp([4 * cfg.embed_dim, *cfg.mlp_dims], cfg.dropout), nn.GELU())
        self.towers = _Towers(len(spec.scenarios) + 1, cfg.mlp_dims[-1], cfg.dropout)

    def head_parts(self) -> dict[str, Part]:
        return {**super().head_parts(), "towers": self.towers}

    def scene_parts(self) -> dict[str, ScenePart]:
        return {**super().scene_parts(), **self.towers.scene_parts()}

    def logits(self, x: torch.Tensor, slots: torch.Tensor, user: UserSide, candidates: int) -> torch.Tensor:
        return self.towers(self.bottom(x), slots)


class MMoE(_Baseline):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, item_table=None, item_text=None, scene_text=None):
        super().__init__()
        n_slots, width = len(spec.scenarios) + 1, cfg.mlp_dims[-1]
        self.history_length = cfg.history_length  # N: the window width its batches are cut at
        self.inputs = _Inputs(cfg, spec, item_table, item_text)
        self.experts = nn.ModuleList(
            nn.Sequential(mlp([4 * cfg.embed_dim, *cfg.mlp_dims], cfg.dropout), nn.GELU())
            for _ in range(cfg.num_experts)
        )
        self.gates = nn.Linear(4 * cfg.embed_dim, n_slots * cfg.num_experts)  # one softmax gate per scene
        self.towers = _Towers(n_slots, width, cfg.dropout)
        self.n_experts = cfg.num_experts

    def head_parts(self) -> dict[str, Part]:
        return {**super().head_parts(), "gates": self.gates, "towers": self.towers}

    def scene_parts(self) -> dict[str, ScenePart]:  # the gates' rows: num_experts per scene slot
        return {
            **super().scene_parts(),
            "gates": ScenePart(self.gates, FIRST_REAL, self.n_experts),
            **self.towers.scene_parts(),
        }

    def logits(self, x: torch.Tensor, slots: torch.Tensor, user: UserSide, candidates: int) -> torch.Tensor:
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # (B, E, w)
        gates = self.gates(x).view(len(x), -1, self.n_experts)  # (B, slots, E)
        gate = torch.softmax(gates.gather(1, slots[:, None, None].expand(-1, 1, self.n_experts))[:, 0], -1)
        return self.towers((gate[..., None] * experts).sum(1), slots)


class _StarLinear(nn.Module):
    """STAR's star-topology layer: W = W_shared ⊙ W_scene, b = b_shared + b_scene. Applied to rows grouped by
    scene slot: one matrix product per slot with that slot's W, instead of a W built for every row."""

    # W_scene is a factor of the matrix, decayed as the matrix is; b_scene is a bias (one row per slot).
    parameter_kinds: ClassVar[dict[str, str]] = {"scene_weight": "matmul", "scene_bias": "bias"}

    def __init__(self, n_slots: int, n_in: int, n_out: int):
        super().__init__()
        self.shared = nn.Linear(n_in, n_out)
        self.scene_weight = nn.Parameter(torch.ones(n_slots, n_in, n_out))
        self.scene_bias = nn.Parameter(torch.zeros(n_slots, n_out))

    def forward(self, groups: list[torch.Tensor], slots: list[int]) -> list[torch.Tensor]:
        weight = self.shared.weight.t()[None] * self.scene_weight  # (slots, in, out): a few, not one per row
        bias = self.shared.bias + self.scene_bias
        return [x @ weight[s] + bias[s] for x, s in zip(groups, slots, strict=True)]


class _PartitionedNorm(nn.Module):
    """STAR's partitioned normalisation: batch statistics, then shared x per-scene scale and shift."""

    parameter_kinds: ClassVar[dict[str, str]] = {
        "gamma": "norm",
        "beta": "norm",
        "scene_gamma": "norm",
        "scene_beta": "norm",
    }

    def __init__(self, n_slots: int, width: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(width, affine=False)
        self.gamma, self.beta = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.scene_gamma = nn.Parameter(torch.ones(n_slots, width))
        self.scene_beta = nn.Parameter(torch.zeros(n_slots, width))

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * (self.gamma * self.scene_gamma[slots]) + self.beta + self.scene_beta[slots]


class STAR(_Baseline):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, item_table=None, item_text=None, scene_text=None):
        super().__init__()
        n_slots, d = len(spec.scenarios) + 1, cfg.embed_dim
        self.history_length = cfg.history_length  # N: the window width its batches are cut at
        self.inputs = _Inputs(cfg, spec, item_table, item_text)
        self.norm = _PartitionedNorm(n_slots, 4 * d)
        sizes = [4 * d, *cfg.mlp_dims, 1]
        self.layers = nn.ModuleList(_StarLinear(n_slots, a, b) for a, b in itertools.pairwise(sizes))
        self.dropout = Dropout(cfg.dropout)
        self.auxiliary = mlp([2 * d, d, 1], cfg.dropout)  # the auxiliary network on scene + context

    def _per_scene(self) -> dict[str, nn.Parameter]:
        """The star weights: each parameter's rows are one per scene slot."""
        parts = {"norm scene scale": self.norm.scene_gamma, "norm scene shift": self.norm.scene_beta}
        for i, layer in enumerate(cast(list[_StarLinear], self.layers)):
            parts |= {f"layer {i} scene weight": layer.scene_weight, f"layer {i} scene bias": layer.scene_bias}
        return parts

    def head_parts(self) -> dict[str, Part]:
        return {**super().head_parts(), **self._per_scene(), "auxiliary": self.auxiliary}

    def scene_parts(self) -> dict[str, ScenePart]:
        return {**super().scene_parts(), **{name: ScenePart(p, FIRST_REAL) for name, p in self._per_scene().items()}}

    def logits(self, x: torch.Tensor, slots: torch.Tensor, user: UserSide, candidates: int) -> torch.Tensor:
        # Rows sorted by slot once, for every layer; one count per slot read back (the only device sync).
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=self.norm.scene_gamma.shape[0]).tolist()
        present = [s for s, n in enumerate(counts) if n]
        if not present:
            return x.new_zeros(0)
        groups = list(torch.split(self.norm(x, slots)[order], [counts[s] for s in present]))
        for i, layer in enumerate(self.layers):
            groups = layer(groups, present)
            if i < len(self.layers) - 1:
                groups = [self.dropout(nn.functional.gelu(h)) for h in groups]
        out = torch.empty(len(x), device=x.device, dtype=groups[0].dtype)
        out[order] = torch.cat(groups)[:, 0]
        aux = self.auxiliary(torch.cat([user["scene"], self.inputs.embed.scene(user[SCENE_ID])], -1))[:, 0]
        return out + per_candidate(aux, candidates)


__all__ = ["MMoE", "STAR", "SharedBottom"]
