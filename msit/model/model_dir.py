"""The one way to save and load a model directory: what training exports and what evaluation, tuning
and serving load unchanged.

    model.safetensors    weights and buffers (the item table too); never pickle
    model.json           model config, training info and metrics
    feature_spec.json    the encoding of the data the model was trained on

Every reader goes through `load_model_dir` / `load_model_config` / `load_model_spec`, so a damaged
directory (a truncated or foreign weights file, a model.json that does not parse or lacks keys, a
feature spec that does not parse, weights of other shapes than the config builds) is one line
naming the file and what is wrong, wherever it is read.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from msit import __version__
from msit.config import from_dict
from msit.data.feature_spec import FEATURE_SPEC_FILE, FeatureSpec
from msit.errors import MsitError
from msit.model import Model, ModelConfig, build_model
from msit.output_dir import writing

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
FORMAT_VERSION = 2  # 2: the attention layers of issue 15 (fused, separate q/k/v); 1: before


@dataclass
class LoadedModel:
    model: Model
    config: ModelConfig
    spec: FeatureSpec
    info: dict


def save_model_dir(
    directory: str | Path,
    model: nn.Module,
    config: ModelConfig,
    spec: FeatureSpec,
    info: dict | None = None,
    inputs: typing.Iterable[str | Path] = (),
) -> Path:
    """Export a model directory: written into a staging folder renamed into place (readers see the old
    model or the new one, never half), under a lock. An existing `directory` is replaced only if it is
    a model directory (holds model.json) or empty: exporting never deletes files msit did not write."""
    directory = Path(directory)
    with writing(directory, marker=CONFIG_FILE, overwrite=True, inputs=inputs) as staging:
        write_model_files(staging, model, config, spec, info)
    return directory


def write_model_files(
    directory: Path, model: nn.Module, config: ModelConfig, spec: FeatureSpec, info: dict | None = None
) -> None:
    """The three files, straight into an existing private folder (a checkpoint's fresh temp directory);
    anything others may read goes through `save_model_dir`."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "msit_version": __version__,
        "model": asdict(config),
        "feature_spec_fingerprint": spec.fingerprint(),
        "info": info or {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1, default=float))
    spec.save(directory)


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    directory = Path(directory)
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE, FEATURE_SPEC_FILE) if not (directory / f).is_file()]
    if missing:
        raise MsitError(f"{directory} is not a msit model directory: missing {missing}")
    meta = _read_meta(directory)
    config = _model_config(directory, meta)
    spec = load_model_spec(directory)
    state = load_weights(directory / WEIGHTS_FILE, device)
    scene_text = state.get("scenes.scene_text")
    model = build_model(config, spec, scene_text=None if scene_text is None else np.zeros(tuple(scene_text.shape)))
    load_state_checked(model, state, directory / WEIGHTS_FILE)
    return LoadedModel(model.to(device).eval(), config, spec, meta["info"])


def load_model_config(directory: str | Path) -> ModelConfig:
    """The model config of a model directory, without loading its weights."""
    directory = Path(directory)
    return _model_config(directory, _read_meta(directory))


def load_model_spec(directory: str | Path) -> FeatureSpec:
    """The feature spec of a model directory; a file that does not parse is one line naming it."""
    path = Path(directory) / FEATURE_SPEC_FILE
    try:
        return FeatureSpec.load(directory)
    except MsitError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
        raise MsitError(f"{path} is not a valid feature spec ({_one_line(e)}); re-export the model") from None


def load_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or foreign file is one line naming it."""
    if not path.is_file():
        raise MsitError(f"{path} not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MsitError(
            f"{path} is not a readable safetensors file ({_one_line(e)}): "
            "the file is damaged or truncated; re-export the model"
        ) from None


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """`load_state_dict(strict=True)`, with the mismatches on one line instead of torch's many."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} (the config builds {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = (
        [f"missing {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")] if missing else []
    )
    problems += (
        [f"unexpected {unexpected[:3]}" + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else "")]
        if unexpected
        else []
    )
    problems += (
        [f"shape of {', '.join(shapes[:3])}" + (f" and {len(shapes) - 3} more" if len(shapes) > 3 else "")]
        if shapes
        else []
    )
    if problems:
        raise MsitError(f"{path} does not match the model config beside it ({CONFIG_FILE}): {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _read_meta(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise MsitError(f"{directory} is not a msit model directory: no {CONFIG_FILE}")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise MsitError(f"{path} is not valid JSON ({_one_line(e)}); re-export the model") from None
    if not isinstance(meta, dict):
        raise MsitError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MsitError(
            f"{path}: model format {meta.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION}): the model was exported by another version of msit; "
            "train it again with this one"
        )
    for key, kind in (("model", dict), ("info", dict)):
        if key not in meta:
            raise MsitError(f"{path}: missing key {key!r}")
        if not isinstance(meta[key], kind):
            raise MsitError(f"{path}: {key!r} must be a JSON object, got {type(meta[key]).__name__}")
    return meta


def _model_config(directory: Path, meta: dict) -> ModelConfig:
    where = f"{directory / CONFIG_FILE}: model"
    _check_types(ModelConfig, meta["model"], where)
    return from_dict(ModelConfig, meta["model"], where=where)


def _check_types(cls: type, data: dict, where: str) -> None:
    """JSON types against the dataclass's annotations (int, float, bool, str, tuple[int, ...], X | None):
    `from_dict` checks keys, not types, and a string width would otherwise fail deep inside torch."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in data and not _is_a(data[f.name], hints[f.name]):
            raise MsitError(f"{where}.{f.name}: expected {_type_name(hints[f.name])}, got {data[f.name]!r}")


def _is_a(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:  # tuple[int, ...] arrives as a JSON list
        item = typing.get_args(tp)[0]
        return isinstance(value, list | tuple) and all(_is_a(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "") if typing.get_origin(tp) else tp.__name__


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]


def check_data_encoding(model_dir: str | Path, model_spec: FeatureSpec, data_dir: str | Path) -> None:
    """The data must be encoded with the model's vocabularies, or ids would silently mean other things."""
    data_spec = FeatureSpec.load(data_dir)
    if data_spec.fingerprint() == model_spec.fingerprint():
        return
    differs = []  # the history length is not among them: it is the model's, windows are cut per batch
    fields_differ = sorted(set(data_spec.fields) ^ set(model_spec.fields))
    fields_differ += sorted(
        k for k in set(data_spec.fields) & set(model_spec.fields) if data_spec.fields[k] != model_spec.fields[k]
    )
    if fields_differ:
        differs.append(f"fields {fields_differ[:5]}")
    vocabs = sorted(
        k
        for k in set(data_spec.vocabularies) | set(model_spec.vocabularies)
        if data_spec.vocabularies.get(k) != model_spec.vocabularies.get(k)
    )
    if vocabs:
        differs.append(f"vocabularies {vocabs[:5]}")
    raise MsitError(
        f"{data_dir} was encoded otherwise than the model {model_dir} ({'; '.join(differs) or 'encoding'}"
        f"); prepare the logs with `msit data prepare LOGS --encoding-from {model_dir}`"
    )
