"""The one epoch loop: batches, steps, validation, early stopping on val AUC, a per-epoch hook.

`trainer.fit` (one process, an in-memory `EventSplit`) and Ray Train's `train_loop_per_worker` (one
process per rank, Ray Data shards) both run `EpochLoop.run`; they differ only in what they plug in:
where the batches come from, how predictions are gathered (`World`), and what the per-epoch hook does
(fit keeps the best weights in memory; the Ray worker reports a checkpoint). No Ray here, so the loop
runs in a unit test with a `LocalWorld` or a fake one.

Early stopping: after each epoch the validation AUC is compared with the best so far; the run stops
once `patience` epochs have passed without a better one. Rank 0 decides and every rank follows
(`World.decide`), so all ranks run the same number of epochs (DDP needs every rank in every step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from msit.data.schema import Batch
from msit.evaluation.metrics import scene_metrics
from msit.training.config import TrainConfig

PREDICTION_FIELDS = ("prob", "label", "scene_id", "user_id")  # what validation gathers per row


class World:
    """The ranks of one training run. This one is a single process; `TorchWorld` spans torch.distributed."""

    rank: int = 0
    size: int = 1

    def sum(self, values: list[float]) -> list[float]:
        """The elementwise sum over ranks (every rank gets it)."""
        return values

    def gather(self, columns: dict[str, torch.Tensor]) -> dict[str, np.ndarray] | None:
        """Every rank's rows of these (R,) columns, concatenated, on rank 0 (None on the others)."""
        return {name: values.cpu().numpy() for name, values in columns.items()}

    def decide(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank."""
        return flag


LocalWorld = World


class TorchWorld(World):
    """Ranks of a torch.distributed process group (gloo on CPU, NCCL on GPU); tensors travel on `device`."""

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = rank, size, device

    def sum(self, values: list[float]) -> list[float]:
        if self.size == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def gather(self, columns: dict[str, torch.Tensor]) -> dict[str, np.ndarray] | None:
        if self.size == 1:
            return super().gather(columns)
        # all_gather wants equal shapes: pad every rank's rows to the longest, then trim each back.
        count = torch.tensor([len(next(iter(columns.values())))], device=self.device)
        counts = [torch.zeros_like(count) for _ in range(self.size)]
        torch.distributed.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        out = {}
        for name, values in columns.items():
            values = values.to(self.device)
            padded = torch.zeros(max(sizes), dtype=values.dtype, device=self.device)
            padded[: len(values)] = values
            parts = [torch.zeros_like(padded) for _ in range(self.size)]
            torch.distributed.all_gather(parts, padded)
            if self.rank == 0:
                out[name] = torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)]).cpu().numpy()
        return out if self.rank == 0 else None

    def decide(self, flag: bool) -> bool:
        if self.size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.broadcast(value, src=0)
        return bool(value.item())


@torch.no_grad()
def predictions(model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """This process's validation rows scored: prob, label, scene_id, user_id, each (R,) on the batches' device."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in PREDICTION_FIELDS}
    for batch in batches:
        parts["prob"].append(torch.sigmoid(model(batch).logits.float()))
        for name in PREDICTION_FIELDS[1:]:
            parts[name].append(batch[name].long())
    device = next(model.parameters()).device
    return {
        name: torch.cat(chunks)
        if chunks
        else torch.zeros(0, dtype=torch.float32 if name == "prob" else torch.int64, device=device)
        for name, chunks in parts.items()
    }


def validation_metrics(world: World, local: dict[str, torch.Tensor], scene_names: dict[int, str]) -> dict | None:
    """`scene_metrics` over every rank's validation rows (AUC and GAUC need them all), on rank 0; None elsewhere."""
    rows = world.gather(local)
    if rows is None:
        return None
    if len(rows["label"]) == 0:
        raise ValueError("validation: no rank holds a validation row; the val split is empty")
    return scene_metrics(rows["label"], rows["prob"], rows["scene_id"], rows["user_id"], scene_names)


def flat_metrics(evaluation: dict) -> dict:
    """The per-epoch record of a `scene_metrics` result: val_auc, val_logloss, val_auc/<scene>."""
    return {
        "val_auc": evaluation["overall"]["auc"],
        "val_logloss": evaluation["overall"]["logloss"],
        **{f"val_auc/{s}": m["auc"] for s, m in evaluation["scenes"].items()},
    }


@dataclass
class LoopState:
    """Where a run stands; a resumed run starts from the state its checkpoint saved."""

    first_epoch: int = 1  # the epoch this attempt starts with (> 1 after a resume)
    best_auc: float = -1.0
    best_epoch: int = 0  # 0: the starting point (fine-tuning's epoch 0) or nothing yet
    history: list[dict] = field(default_factory=list)  # one record per epoch (rank 0's; others keep theirs empty)
    best_val: dict | None = None  # the best epoch's full scene_metrics (this attempt's only; rank 0)


@dataclass
class EpochEnd:
    """What the per-epoch hook sees: the epoch's record (rank 0: with val metrics), and the state after it."""

    epoch: int
    metrics: dict
    state: LoopState
    improved: bool  # rank 0: this epoch's val AUC is the best so far
    evaluation: dict | None  # rank 0: the full scene_metrics


@dataclass
class EpochLoop:
    """One training run's epochs. Plug in:

    step(batch) -> loss            one optimizer step (trainer.train_step on the model or its DDP wrapper)
    train_batches(epoch)           this process's model batches of that epoch (shuffled by the caller)
    validate()                     scene_metrics over the whole val split on rank 0, None on other ranks
    on_epoch(EpochEnd)             after each epoch on every rank, epoch 0 (the start point) included:
                                   keep the best weights, report, checkpoint
    after_batch(epoch, batches)    after each batch (`epoch` the last finished one): the fault drills
    after_epoch(epoch)             after each epoch's hook, when the run goes on
    """

    cfg: TrainConfig
    step: Callable[[Batch], float]
    train_batches: Callable[[int], Iterable[Batch]]
    validate: Callable[[], dict | None]
    on_epoch: Callable[[EpochEnd], None] = lambda end: None
    world: World = field(default_factory=World)
    after_batch: Callable[[int, int], None] = lambda epoch, batches: None
    after_epoch: Callable[[int], None] = lambda epoch: None
    log: Callable[[str], None] = print

    def run(self, state: LoopState | None = None, start_point: bool = False) -> LoopState:
        """Train epochs state.first_epoch..cfg.epochs, stopping early; `start_point`: on a fresh start, score
        the model before any step as epoch 0, the best to beat (fine-tuning never ends worse than it began)."""
        state = state or LoopState()
        if start_point and state.first_epoch == 1:
            evaluation = self.validate()
            metrics = {"epoch": 0}
            if evaluation is not None:
                metrics |= flat_metrics(evaluation)
                state.best_auc, state.best_epoch, state.best_val = metrics["val_auc"], 0, evaluation
                state.history.append({**metrics, "first_epoch_of_attempt": 1})
                self.log(f"before training: val AUC {metrics['val_auc']:.4f}")
            self.on_epoch(EpochEnd(0, metrics, state, evaluation is not None, evaluation))
        for epoch in range(state.first_epoch, self.cfg.epochs + 1):
            metrics, evaluation = self._epoch(epoch)
            improved = evaluation is not None and metrics["val_auc"] > state.best_auc
            if improved:
                state.best_auc, state.best_epoch, state.best_val = metrics["val_auc"], epoch, evaluation
            if evaluation is not None:
                state.history.append({**metrics, "first_epoch_of_attempt": state.first_epoch})
                self.log(
                    f"epoch {epoch}: train loss {metrics['train_loss']:.4f}, val AUC {metrics['val_auc']:.4f}, "
                    f"val log loss {metrics['val_logloss']:.4f}"
                )
            stop = self.world.decide(epoch - state.best_epoch >= self.cfg.patience)
            self.on_epoch(EpochEnd(epoch, metrics, state, improved, evaluation))
            if stop:
                if evaluation is not None:
                    self.log(
                        f"early stop: no better val AUC for {self.cfg.patience} epochs; best epoch {state.best_epoch}"
                    )
                break
            self.after_epoch(epoch)
        return state

    def _epoch(self, epoch: int) -> tuple[dict, dict | None]:
        loss_sum, batches, samples = 0.0, 0, 0
        started_at, started = time.time(), time.perf_counter()
        for batch in self.train_batches(epoch):
            loss_sum += self.step(batch)
            batches += 1
            samples += len(batch["label"])
            self.after_batch(epoch - 1, batches)
        # Throughput of the training pass alone (validation and the hook excluded), over all ranks.
        total_loss, total_batches, total_samples = self.world.sum([loss_sum, batches, samples])
        seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch,
            "train_loss": total_loss / max(total_batches, 1),
            "train_samples": int(total_samples),
            "train_seconds": seconds,
            "train_samples_per_s": total_samples / seconds,
            "epoch_started_at": started_at,
        }
        evaluation = self.validate()
        if evaluation is not None:
            metrics |= flat_metrics(evaluation)
        return metrics, evaluation
