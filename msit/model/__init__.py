"""Models: MSIT and the baselines, all plain PyTorch modules with one interface:
`model(batch) -> ModelOutput`, where `batch` holds the prepared shard columns as tensors."""

from __future__ import annotations

import numpy as np
from torch import nn

from msit.data.feature_spec import FeatureSpec
from msit.model.baselines import STAR, MMoE, SharedBottom
from msit.model.config import FAMILIES, FUSIONS, ModelConfig
from msit.model.features import batch_columns, load_item_table
from msit.model.msit import MSIT
from msit.model.output import ModelOutput

_CLASSES = {"msit": MSIT, "msit_no_transfer": MSIT, "shared_bottom": SharedBottom, "mmoe": MMoE, "star": STAR}


def build_model(cfg: ModelConfig, spec: FeatureSpec, item_table: dict[str, np.ndarray] | None = None,
                item_text: np.ndarray | None = None, scene_text: np.ndarray | None = None) -> nn.Module:
    """The model of `cfg.family`. Without `item_table`, item buffers start at zero (to be loaded)."""
    return _CLASSES[cfg.family](cfg, spec, item_table, item_text, scene_text)


__all__ = ["FAMILIES", "FUSIONS", "ModelConfig", "ModelOutput", "build_model", "batch_columns", "load_item_table"]
