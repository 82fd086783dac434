"""Fine-tuning: a new model that starts from a trained model directory, on newer or wider logs.

The logs are prepared with the model's encoding grown (`msit data prepare LOGS --encoding-from MODEL
--extend-vocab`): every id and scene the model knows keeps its index and new ones are appended. So
each learned table is copied row for row into the new model's larger one, and only new rows start
fresh. Three modes, from the cheapest:

    scene  only the rows that belong to the fine-tuned scenes (their scene embedding, empty interest,
           scene bias; a baseline's towers and star weights of those scenes) and the fresh rows of
           grown id tables train. Nothing the other scenes use changes, so their scores stay as they
           were. For onboarding a new scene or lifting a sparse one.
    head   the scene-specific parts of MODEL.md train whole (scene embeddings, transfer layers,
           predictor; a baseline's per-scene towers and weights), plus fresh id rows. More capacity,
           but the transfer layers and predictor are shared, so other scenes' scores move too.
    full   every parameter trains: a periodic refresh on a newer window of logs.

No Ray here: Ray Train's loop calls `start_from` on each worker, and so can a unit test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from msit.data.feature_spec import FeatureSpec
from msit.data.schema import scene_id
from msit.errors import ConfigError, MsitError
from msit.model.model_dir import WEIGHTS_FILE, load_model_spec, load_weights
from msit.model.output import Model
from msit.model.parameters import declared_names

MODES = ("scene", "head", "full")


@dataclass
class FinetuneSpec:
    from_model: str  # the trained model directory to start from
    mode: str = "scene"  # one of MODES

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"finetune.mode must be one of {list(MODES)}, got {self.mode!r}")


@dataclass
class StartSummary:
    copied: int  # tensors copied whole
    grown: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (learned rows, rows now)
    trainable: int = 0  # parameters (scalars) that train
    frozen: int = 0  # parameters that do not, frozen rows of partly trained tables included

    def lines(self) -> list[str]:
        grown = ", ".join(f"{name} {old:,}->{new:,}" for name, (old, new) in self.grown.items()) or "none"
        return [
            f"copied {self.copied} tensors; grown tables (learned rows -> rows): {grown}",
            f"{self.trainable:,} parameters train, {self.frozen:,} are frozen",
        ]


def check_encoding_extends(model_dir: str | Path, data_spec: FeatureSpec, data_dir: str | Path) -> None:
    """The data must encode every value the model knows at the model's index: its vocabularies must
    start with the model's. (The history length is the model's own, windows are cut per batch: any
    prepared data serves it.)"""
    model_spec = load_model_spec(model_dir)
    for name, values in model_spec.vocabularies.items():
        if data_spec.vocabularies.get(name, [])[: len(values)] != values:
            raise MsitError(
                f"{data_dir} does not extend the encoding of {model_dir} (vocabulary {name!r} differs); "
                f"prepare the logs with `msit data prepare LOGS --encoding-from {model_dir} "
                "--extend-vocab`"
            )


def start_from(
    model: Model, spec: FinetuneSpec, data_spec: FeatureSpec, scenes: list[str] | None = None
) -> StartSummary:
    """Load the learned weights of `spec.from_model` into `model` (built for `data_spec`, the extended
    encoding) and freeze what the mode does not train. `scenes`: the scenes scene mode fine-tunes
    (default: the scenes new to the model). The parts that train are those the model's family declares
    (`head_parts`, `scene_parts`), found by what they are, not by parameter names."""
    summary = transplant(model, load_weights(Path(spec.from_model) / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    # Rows that train, per parameter (a parameter not named here is frozen). Fresh rows of grown
    # tables always train: nothing was learned for the ids they stand for.
    rows = {name: _rows_from(params[name], old) for name, (old, _) in summary.grown.items()}
    if spec.mode == "full":
        rows = {name: _rows_from(p, 0) for name, p in params.items()}
    elif spec.mode == "head":
        for names in declared_names(model, model.head_parts(), "head part").values():
            rows |= {name: _rows_from(params[name], 0) for name in names}
    else:
        ids = scenes_to_tune(spec.from_model, data_spec, scenes)
        scene_parts = model.scene_parts()
        found = declared_names(model, {label: part.part for label, part in scene_parts.items()}, "scene part")
        for label, names in found.items():
            for name in names:
                mask = scene_parts[label].rows(params[name], ids)
                rows[name] = rows[name] | mask if name in rows else mask
    train_only(model, rows)
    for name, p in params.items():
        trained = int(rows[name].sum()) * (p[0].numel() if p.ndim else 1) if name in rows else 0
        summary.trainable += trained
        summary.frozen += p.numel() - trained
    return summary


def scenes_to_tune(model_dir: str | Path, data_spec: FeatureSpec, scenes: list[str] | None) -> list[int]:
    """Scene ids whose rows scene mode trains: `scenes`, or else the scenes new to the model."""
    if scenes:
        return data_spec.scene_ids(scenes)
    ids = [scene_id(slot) for slot in range(len(load_model_spec(model_dir).scenarios), len(data_spec.scenarios))]
    if not ids:
        raise ConfigError(
            f"scene mode has no scene to fine-tune: the data has no scene new to {model_dir}; "
            "name the scenes to fine-tune (--scenes) or use --mode head or full"
        )
    return ids


def _rows_from(p: torch.Tensor, first: int) -> torch.Tensor:
    """A mask over the leading dimension of `p` (one row for a scalar), True from row `first` on."""
    mask = torch.zeros(p.shape[0] if p.ndim else 1, dtype=torch.bool)
    mask[first:] = True
    return mask


def train_only(model: nn.Module, rows: dict[str, torch.Tensor]) -> None:
    """Freeze every parameter but the given rows. A partly trained parameter gets its other rows'
    gradient zeroed; with AdamW and no weight decay on it (`make_optimizer` checks `trained_rows`),
    a row whose gradient is always zero never moves."""
    for name, p in model.named_parameters():
        mask = rows.get(name)
        if mask is None or not mask.any():
            p.requires_grad_(False)
        elif not mask.all():
            p.trained_rows = mask  # type: ignore[attr-defined]  # our tag on the Parameter: make_optimizer reads it
            p.register_hook(partial(_mask_rows, mask=mask))


def _mask_rows(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grad * mask.to(grad.device, grad.dtype).view(-1, *([1] * (grad.ndim - 1)))


@torch.no_grad()
def transplant(model: nn.Module, learned: dict[str, torch.Tensor]) -> StartSummary:
    """Copy `learned` weights into `model`: equal shapes whole, grown tables (more rows, the same row
    shape) into their leading rows. Buffers (the item feature table) stay as built from the new data."""
    buffers = {name for name, _ in model.named_buffers()}
    state = model.state_dict()
    missing = sorted(set(learned) - set(state) - buffers)
    if missing:
        raise MsitError(f"the model to start from has weights this architecture lacks: {missing[:5]}")
    summary = StartSummary(copied=0)
    for name, target in state.items():
        source = learned.get(name)
        if source is None or name in buffers:
            continue  # a part the old model did not have (a new scene's tower) starts fresh
        if source.shape == target.shape:
            target.copy_(source)
            summary.copied += 1
        elif source.ndim and source.shape[1:] == target.shape[1:] and source.shape[0] < target.shape[0]:
            target[: source.shape[0]].copy_(source)
            summary.grown[name] = (source.shape[0], target.shape[0])
        else:
            raise MsitError(f"cannot start {name} of shape {tuple(target.shape)} from shape {tuple(source.shape)}")
    return summary
