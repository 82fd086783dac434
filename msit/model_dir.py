"""The one way to save and load a model directory: what training exports and what evaluation, tuning
and serving load unchanged.

    model.safetensors    weights and buffers (the item table too); never pickle
    model.json           model config, training info and metrics
    feature_spec.json    the encoding of the data the model was trained on
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from msit import __version__
from msit.config import from_dict
from msit.data.feature_spec import FEATURE_SPEC_FILE, FeatureSpec
from msit.errors import MsitError
from msit.model import ModelConfig, build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    spec: FeatureSpec
    info: dict


def save_model_dir(directory: str | Path, model: nn.Module, config: ModelConfig, spec: FeatureSpec,
                   info: dict | None = None) -> Path:
    """Write the three files into a staging folder, then move it into place: readers never see half a model."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(staging / WEIGHTS_FILE))
    meta = {"format_version": FORMAT_VERSION, "msit_version": __version__, "model": asdict(config),
            "feature_spec_fingerprint": spec.fingerprint(), "info": info or {}}
    (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=1, default=float))
    spec.save(staging)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, directory)
    return directory


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    directory = Path(directory)
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE, FEATURE_SPEC_FILE) if not (directory / f).is_file()]
    if missing:
        raise MsitError(f"{directory} is not a msit model directory: missing {missing}")
    meta = _read_meta(directory)
    config = from_dict(ModelConfig, meta["model"], where=str(directory / CONFIG_FILE))
    spec = FeatureSpec.load(directory)
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    scene_text = state.get("scenes.scene_text")
    model = build_model(config, spec, scene_text=None if scene_text is None else np.zeros(tuple(scene_text.shape)))
    model.load_state_dict(state, strict=True)
    return LoadedModel(model.to(device).eval(), config, spec, meta.get("info", {}))


def load_model_config(directory: str | Path) -> ModelConfig:
    """The model config of a model directory, without loading its weights."""
    return from_dict(ModelConfig, _read_meta(Path(directory))["model"], where=str(Path(directory) / CONFIG_FILE))


def _read_meta(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise MsitError(f"{directory} is not a msit model directory: no {CONFIG_FILE}")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise MsitError(f"{path}: model format {meta.get('format_version')} is not supported")
    return meta


def check_data_encoding(model_dir: str | Path, model_spec: FeatureSpec, data_dir: str | Path) -> None:
    """The data must be encoded with the model's vocabularies, or ids would silently mean other things."""
    if FeatureSpec.load(data_dir).fingerprint() != model_spec.fingerprint():
        raise MsitError(f"{data_dir} was encoded with other vocabularies than the model {model_dir}; "
                        f"prepare the logs with `msit data prepare LOGS --encoding-from {model_dir}`")
