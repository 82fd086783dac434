"""Model directories for the serving tests: one with a numeric context feature, and broken ones for reloads."""

import shutil
from pathlib import Path

import torch

from msit.data.feature_spec import FeatureSpec, FieldInfo
from msit.model import ModelConfig, build_for_data
from msit.model.model_dir import WEIGHTS_FILE, save_model_dir

# A numeric context feature the synthetic logs do not have; serving standardises it with this mean and std.
NUMERIC_CONTEXT, MEAN, STD = "temperature", 20.0, 5.0


def numeric_context_model(prepared: Path, out: Path) -> Path:
    """An (untrained) model over `prepared` whose spec adds the numeric context feature NUMERIC_CONTEXT."""
    spec = FeatureSpec.load(prepared)
    spec.fields[NUMERIC_CONTEXT] = FieldInfo(role="context", type="numeric", mean=MEAN, std=STD)
    config = ModelConfig(embed_dim=8, mlp_dims=(8,))
    torch.manual_seed(0)
    return save_model_dir(out, build_for_data(config, prepared, spec), config, spec)


def corrupt_weights(model_dir: Path, out: Path) -> Path:
    """A copy of `model_dir` whose model.safetensors is garbage: it fails to load."""
    shutil.copytree(model_dir, out)
    (out / WEIGHTS_FILE).write_bytes(b"\x00not a safetensors file" * 10)
    return out


def nan_weights(prepared: Path, out: Path) -> Path:
    """A model directory that loads but cannot score: every weight NaN (only a self-test catches it)."""
    spec = FeatureSpec.load(prepared)
    config = ModelConfig(embed_dim=8, mlp_dims=(8,))
    model = build_for_data(config, prepared, spec)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    return save_model_dir(out, model, config, spec)
