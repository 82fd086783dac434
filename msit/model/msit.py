"""MSIT: multi-scenario interest transfer (../shared/MODEL.md), forward pass top to bottom.

In two halves (`msit.model.output`): `encode_user` once per user side, `score` once per candidate."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from msit.data.feature_spec import FeatureSpec
from msit.data.schema import FIRST_REAL, ITEM_ID, SCENE_ID, scene_slots
from msit.model.config import ModelConfig
from msit.model.features import FeatureEmbedder
from msit.model.fusion import Fusion
from msit.model.interest import InterestNetwork
from msit.model.output import Model, ModelOutput, UserSide, per_candidate
from msit.model.parameters import Part, ScenePart
from msit.model.predictor import Predictor
from msit.model.scene import SceneEncoder
from msit.model.transfer import InterestTransfer


class MSIT(Model):
    def __init__(
        self,
        cfg: ModelConfig,
        spec: FeatureSpec,
        item_table: dict[str, np.ndarray] | None = None,
        item_text: np.ndarray | None = None,
        scene_text: np.ndarray | None = None,
    ):
        super().__init__()
        self.cfg, self.n_scenes = cfg, len(spec.scenarios)
        self.history_length = cfg.history_length
        self.transfer_on = cfg.family == "msit"
        self.embed = FeatureEmbedder(cfg, spec, item_table, item_text)
        self.interest = InterestNetwork(cfg, self.n_scenes, self.history_length)
        self.scenes = SceneEncoder(cfg, self.n_scenes, scene_text)
        self.fusion = Fusion(cfg)
        self.transfer = InterestTransfer(cfg, self.n_scenes) if self.transfer_on else None
        self.predictor = Predictor(cfg, n_inputs=4, scene_vocab=spec.fields["scene_id"].vocab)

    def head_parts(self) -> dict[str, Part]:
        """The scene-specific parts of MODEL.md, which fine-tuning's head mode trains whole."""
        parts: dict[str, Part] = {
            "scene embedding": self.embed.scene,
            "empty interest": self.interest.empty,
            "predictor": self.predictor,
        }
        if self.scenes.text is not None:
            parts["scene text projection"] = self.scenes.text
        if self.transfer is not None:
            parts["transfer"] = self.transfer
        return parts

    def scene_parts(self) -> dict[str, ScenePart]:
        """The per-scene tables, whose tuned scenes' rows fine-tuning's scene mode trains."""
        parts = {
            "scene embedding": ScenePart(self.embed.scene),
            "empty interest": ScenePart(self.interest.empty, FIRST_REAL),
        }  # by slot: slot 0 is id FIRST_REAL
        if self.predictor.scene_bias is not None:
            parts["scene bias"] = ScenePart(self.predictor.scene_bias)
        if self.transfer is not None and self.transfer.pair_bias is not None:
            parts["transfer pair bias"] = ScenePart(self.transfer.pair_bias, FIRST_REAL)  # by target slot
        return parts

    def forward(self, batch: dict[str, torch.Tensor], explain: bool = False) -> ModelOutput:
        """One candidate per row, the row's own item: logits (B,), transfer (B, S), behaviour (B, S, N)."""
        return self.score(self.encode_user(batch), batch[ITEM_ID][:, None], explain).one_candidate_each()

    def encode_user(self, batch: dict[str, torch.Tensor]) -> UserSide:
        return {
            **self.interest.encode(self.embed, batch),  # the encoded history window, as keys and values
            "user": self.embed.user_repr(batch),  # (R, d)
            "target_scene": self.scenes.target(self.embed, batch),  # g^t (R, d), with its context
            SCENE_ID: batch[SCENE_ID],
        }  # (R,)

    def score(self, user: UserSide, item_ids: torch.Tensor, explain: bool = False) -> ModelOutput:
        """item_ids (R, C): C candidates for each user-side row."""
        R, C = item_ids.shape
        item = self.embed.item_repr(item_ids)  # (R, C, d) candidate items
        interest, behaviour_attention = self.interest.pool(user, item, explain)  # h^s (R, C, S, d), (R, C, S, N)
        fused = self.fusion(interest, self.scenes.every_scene(self.embed)).flatten(0, 1)  # f^s (M = R C, S, d)
        item, target_scene = item.flatten(0, 1), per_candidate(user["target_scene"], C)  # (M, d) each
        scene_ids = per_candidate(user[SCENE_ID], C)  # (M,)
        slots = scene_slots(scene_ids, self.n_scenes)  # (M,): n_scenes for a scene the model does not know

        if self.transfer is not None:  # built exactly when transfer_on
            transferred, transfer_attention = self.transfer(fused, target_scene, item, slots)  # h^t, (M, S)
        else:  # ablation: only the target scene's own interest (none for an unknown scene), no transfer
            known = slots < self.n_scenes
            own_slot = torch.where(known, slots, torch.zeros_like(slots))
            own = fused[torch.arange(len(slots), device=slots.device), own_slot]
            transferred = torch.where(known[:, None], own, torch.zeros_like(own))
            transfer_attention = nn.functional.one_hot(own_slot, self.n_scenes).float()

        logits = self.predictor([transferred, per_candidate(user["user"], C), item, target_scene], scene_ids)
        return ModelOutput(
            logits.view(R, C),
            transfer_attention.view(R, C, -1),
            behaviour_attention,
            self._attention_prior_kl(transfer_attention) if self.transfer_on else None,
        )

    def _attention_prior_kl(self, attention: torch.Tensor) -> torch.Tensor | None:
        """λ · KL(attention || uniform over scenes): keeps the transfer attention from collapsing."""
        if self.cfg.transfer_kl_weight == 0:
            return None
        p = attention.clamp(min=1e-8)
        kl = (p * (p.log() + math.log(self.n_scenes))).sum(-1).mean()
        return self.cfg.transfer_kl_weight * kl
