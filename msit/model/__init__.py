"""Models: MSIT and the baselines, all plain PyTorch modules with one interface:
`model(batch) -> ModelOutput`, where `batch` holds event columns and history windows as tensors
(`msit.data.prepared.model_batch`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msit.data.feature_spec import FeatureSpec
from msit.model.baselines import STAR, MMoE, SharedBottom
from msit.model.config import FAMILIES, FUSIONS, ModelConfig
from msit.model.features import load_item_table
from msit.model.msit import MSIT
from msit.model.output import Model, ModelOutput

_CLASSES = {"msit": MSIT, "msit_no_transfer": MSIT, "shared_bottom": SharedBottom, "mmoe": MMoE, "star": STAR}


def build_model(
    cfg: ModelConfig,
    spec: FeatureSpec,
    item_table: dict[str, np.ndarray] | None = None,
    item_text: np.ndarray | None = None,
    scene_text: np.ndarray | None = None,
) -> Model:
    """The model of `cfg.family`. Without `item_table`, item buffers start at zero (to be loaded)."""
    return _CLASSES[cfg.family](cfg, spec, item_table, item_text, scene_text)


def build_for_data(cfg: ModelConfig, prepared_dir: str | Path, spec: FeatureSpec) -> Model:
    """The model for a prepared directory: its item table, and its cached text embeddings if `cfg.use_text`."""
    item_text = scene_text = None
    if cfg.use_text:
        from msit.text import embed_scene_descriptions, load_item_text_embeddings

        item_text = load_item_text_embeddings(prepared_dir, spec.fields["item_id"].vocab)
        if spec.source.get("spec", {}).get("scene_descriptions"):
            scene_text = embed_scene_descriptions(prepared_dir)
    return build_model(cfg, spec, load_item_table(prepared_dir, spec), item_text, scene_text)


__all__ = [
    "FAMILIES",
    "FUSIONS",
    "Model",
    "ModelConfig",
    "ModelOutput",
    "build_for_data",
    "build_model",
    "load_item_table",
]
