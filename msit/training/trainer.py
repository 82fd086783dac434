"""Single-process training without Ray: for tests, debugging and benchmarks.

`fit` runs the epoch loop of `msit.training.train_loop` that Ray Train's workers run too, with the same step
(`train_step`), so both paths train the same way. Seeded and deterministic on CPU.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from msit.allocator import keep_freed_memory
from msit.data.feature_spec import FeatureSpec
from msit.data.prepared import EventSplit
from msit.evaluation.metrics import scene_metrics
from msit.model.output import Model
from msit.model.parameters import parameters_with_kinds
from msit.training.config import TrainConfig
from msit.training.train_loop import EpochLoop, predictions, validation_metrics

Batch = dict[str, torch.Tensor]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed every generator, and ask torch for deterministic kernels or not (bit-identical runs on CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN, a debugging aid that cost ~10% of an MSIT step's
    # CPU time (a profile: fill_ under empty/empty_like, ~700 calls a step); the kernels are deterministic without.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]  # set on a module subclass


def prepare_for_training(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """Keep freed memory in the process (`msit.allocator`), seed, choose deterministic kernels
    (`cfg.deterministic`; by default on the CPU only) and, if `cfg.compile`, compile the model in place (its
    state dict keeps its names)."""
    keep_freed_memory()
    seed_everything(cfg.seed, device.type == "cpu" if cfg.deterministic is None else cfg.deterministic)
    if cfg.compile:
        model.compile()


def select_scenes(data: EventSplit, scene_ids: list[int]) -> EventSplit:
    """The rows of `data` in these scenes."""
    return data.select(torch.isin(data.events["scene_id"].long(), torch.tensor(scene_ids)))


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Binary cross-entropy, plus the model's own regulariser (the transfer-attention KL) if any."""
    output = model(batch)
    loss = nn.functional.binary_cross_entropy_with_logits(output.logits, batch["label"].float())
    return loss + output.regularization if output.regularization is not None else loss


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    grad_clip: float = 5.0,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """One optimizer step; `amp_dtype` (e.g. torch.bfloat16 on GPU) runs the forward pass under autocast."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device_type = batch["label"].device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        loss = loss_fn(model, batch)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict(model: Model, data: EventSplit, batch_size: int = 4096) -> np.ndarray:
    """Probabilities for every row, in order."""
    model.eval()
    device = next(model.parameters()).device
    chunks = [
        torch.sigmoid(model(batch).logits.float()).cpu()
        for batch in data.batches(batch_size, model.history_length, device=device)
    ]
    return torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.float32)


def evaluate(model: Model, data: EventSplit, spec: FeatureSpec, batch_size: int = 4096) -> dict:
    probs = predict(model, data, batch_size)
    events = data.events
    return scene_metrics(
        events["label"].numpy(), probs, events["scene_id"].numpy(), events["user_id"].numpy(), spec.scene_names()
    )


def decays(p: nn.Parameter, kind: str) -> bool:
    """Whether weight decay applies: to matmul weights of rank >= 2 only (nanoGPT's rule). Not to id and
    scene tables (decay would shrink rare ids towards zero), norms, biases, nor tables of which fine-tuning
    trains only some rows (`trained_rows`: decay would move the others)."""
    return kind == "matmul" and p.ndim >= 2 and not hasattr(p, "trained_rows")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, with weight decay by what each parameter is (`msit.model.parameters`), not by its name."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p, kind in parameters_with_kinds(model):
        if p.requires_grad:
            (decay if decays(p, kind) else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )


@dataclass
class FitResult:
    best_epoch: int
    best_val: dict
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_auc, val_logloss, val_auc/<scene>
    seconds: float = 0.0


def fit(
    model: Model,
    train: EventSplit,
    val: EventSplit,
    spec: FeatureSpec,
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    progress: bool = False,
    start_point: bool = False,
) -> FitResult:
    """Train with early stopping on val AUC (`train_loop.EpochLoop`, the loop Ray Train's workers run too);
    the model ends with its best epoch's weights. Each epoch is a fresh global permutation of `train`.
    `start_point`: the untrained (or fine-tuning's starting) model is epoch 0, the best to beat."""

    device = next(model.parameters()).device  # event rows stay on the CPU; sequences and batches go to the model
    prepare_for_training(model, cfg, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    # The sequences go to the model's device once (the same copy for both splits when they share it, as
    # load_split's do when given one `sequences`).
    on_device = {id(split.sequences): split.sequences.to(device) for split in (train, val)}
    train, val = (EventSplit(split.events, on_device[id(split.sequences)]) for split in (train, val))
    total = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    best_state: dict = {}

    def train_batches(epoch: int):
        batches = train.batches(cfg.batch_size, model.history_length, shuffle=True, generator=generator, device=device)
        return tqdm(batches, total=total, desc=f"epoch {epoch}", disable=not progress, leave=False)

    def keep_best(end) -> None:
        if end.improved:
            best_state["weights"] = copy.deepcopy(model.state_dict())

    loop = EpochLoop(
        cfg,
        step=lambda batch: train_step(model, batch, optimizer, cfg.grad_clip),
        train_batches=train_batches,
        validate=lambda: validation_metrics(
            loop.world,
            predictions(model, val.batches(cfg.eval_batch_size, model.history_length, device=device)),
            spec.scene_names(),
        ),
        on_epoch=keep_best,
        log=log,
    )
    start = time.perf_counter()
    state = loop.run(start_point=start_point)
    if "weights" in best_state:
        model.load_state_dict(best_state["weights"])
    return FitResult(state.best_epoch, state.best_val or {}, state.history, time.perf_counter() - start)
