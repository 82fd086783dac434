"""MSIT: multi-scenario interest transfer (../shared/MODEL.md), forward pass top to bottom."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from msit.data.feature_spec import FeatureSpec
from msit.model.config import ModelConfig
from msit.model.features import FeatureEmbedder
from msit.model.fusion import Fusion
from msit.model.interest import InterestNetwork
from msit.model.output import ModelOutput
from msit.model.predictor import Predictor
from msit.model.scene import SceneEncoder
from msit.model.transfer import InterestTransfer


def target_slots(scene_ids: torch.Tensor, n_scenes: int) -> torch.Tensor:
    """Scene id -> slot among the S known scenes (id 2 is slot 0); -1 for padding or an unknown scene."""
    slots = scene_ids - 2
    return torch.where((slots >= 0) & (slots < n_scenes), slots, torch.full_like(slots, -1))


class MSIT(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, item_table: dict[str, np.ndarray] | None = None,
                 item_text: np.ndarray | None = None, scene_text: np.ndarray | None = None):
        super().__init__()
        self.cfg, self.n_scenes = cfg, len(spec.scenarios)
        self.history_length = cfg.history_length
        self.transfer_on = cfg.family == "msit"
        self.embed = FeatureEmbedder(cfg, spec, item_table, item_text)
        self.interest = InterestNetwork(cfg, self.n_scenes, self.history_length)
        self.scenes = SceneEncoder(cfg, self.n_scenes, scene_text)
        self.fusion = Fusion(cfg)
        self.transfer = InterestTransfer(cfg) if self.transfer_on else None
        self.predictor = Predictor(cfg, n_inputs=4, scene_vocab=spec.fields["scene_id"].vocab_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        item = self.embed.item_repr(batch["item_id"])  # (B, d) target item
        user = self.embed.user_repr(batch)  # (B, d)
        slots = target_slots(batch["scene_id"], self.n_scenes)  # (B,)

        interest, behaviour_attention = self.interest(self.embed, batch, item)  # h^s (B, S, d), (B, S, N)
        scene, target_scene = self.scenes(self.embed, batch)  # g^s (B, S, d), g^t (B, d)
        fused = self.fusion(interest, scene)  # f^s (B, S, d)

        if self.transfer_on:
            transferred, transfer_attention = self.transfer(fused, target_scene, item, slots)  # h^t, (B, S)
        else:  # ablation: only the target scene's own interest, no transfer
            own = fused[torch.arange(len(slots)), slots.clamp(min=0)]
            transferred = torch.where((slots >= 0)[:, None], own, torch.zeros_like(own))
            transfer_attention = nn.functional.one_hot(slots.clamp(min=0), self.n_scenes).float()

        logits = self.predictor([transferred, user, item, target_scene], batch["scene_id"])
        return ModelOutput(logits, transfer_attention, behaviour_attention,
                           self._attention_prior_kl(transfer_attention) if self.transfer_on else None)

    def _attention_prior_kl(self, attention: torch.Tensor) -> torch.Tensor | None:
        """λ · KL(attention || uniform over scenes): keeps the transfer attention from collapsing."""
        if self.cfg.transfer_kl_weight == 0:
            return None
        p = attention.clamp(min=1e-8)
        kl = (p * (p.log() + math.log(self.n_scenes))).sum(-1).mean()
        return self.cfg.transfer_kl_weight * kl

