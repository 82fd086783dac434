"""SceneEncoder: scene awareness g^s, from the scene's embedding, context and description."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from msit.data.schema import SCENE_ID, known_scene_ids
from msit.model.config import ModelConfig
from msit.model.features import FeatureEmbedder


class SceneEncoder(nn.Module):
    scene_ids: torch.Tensor  # buffers
    scene_text: torch.Tensor

    def __init__(self, cfg: ModelConfig, n_scenes: int, scene_text: np.ndarray | None = None):
        super().__init__()
        self.register_buffer("scene_ids", known_scene_ids(n_scenes), persistent=False)  # slot s -> its id
        self.text: nn.Linear | None = None
        if scene_text is not None:  # frozen embeddings of scene descriptions, (scene vocab, text_dim)
            self.register_buffer("scene_text", torch.as_tensor(scene_text).float())
            self.text = nn.Linear(self.scene_text.shape[1], cfg.embed_dim)

    def _scene(self, embed: FeatureEmbedder, ids: torch.Tensor) -> torch.Tensor:
        out = embed.scene(ids)
        return out + self.text(self.scene_text[ids]) if self.text is not None else out

    def every_scene(self, embed: FeatureEmbedder) -> torch.Tensor:  # (S, d): g^s of each source scene
        return self._scene(embed, self.scene_ids)

    def target(self, embed: FeatureEmbedder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._scene(embed, batch[SCENE_ID]) + embed.context_repr(batch)  # (R, d): g^t with context
