"""Single-process training without Ray: for tests, debugging and benchmarks.

The step functions (`train_step`, `predict`) are the ones Ray Train's loop calls too, so both paths
train the same way. Seeded and deterministic on CPU.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm import tqdm

from msit.data.feature_spec import FeatureSpec
from msit.errors import ConfigError, MsitError
from msit.metrics import scene_metrics
from msit.model import batch_columns

Batch = dict[str, torch.Tensor]


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 2  # epochs without a better val AUC before stopping
    seed: int = 0
    eval_batch_size: int = 4096
    grad_clip: float = 5.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"lr must be > 0 and weight_decay >= 0, got lr={self.lr}, "
                              f"weight_decay={self.weight_decay}")


def seed_everything(seed: int) -> None:
    """Seed every generator and ask torch for deterministic kernels (bit-identical runs on CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_split(prepared_dir: str | Path, split: str, spec: FeatureSpec) -> Batch:
    """One split of a prepared directory as in-memory tensors (the columns models read). Shards that do not
    fit `spec` (another history length, other fields: data prepared otherwise than the model) are one line
    naming the column, not a torch error deep in the forward pass."""
    path = Path(prepared_dir) / split
    if not path.is_dir():
        raise MsitError(f"no {split!r} split at {path}: is {prepared_dir} a directory made by `msit data prepare`?")
    columns = batch_columns(spec)
    try:
        dataset = pq.ParquetDataset(path)
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise MsitError(f"{path} lacks column(s) {missing} that the model's feature spec needs: the data was "
                            "prepared with other fields; prepare it with `--encoding-from MODEL`")
        table = dataset.read(columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise MsitError(f"{path}: the split's Parquet shards cannot be read ({' '.join(str(e).split())[:200]}); "
                        "prepare the data again") from None
    widths = _column_widths(spec)
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        values = column.to_numpy(zero_copy_only=False)
        if values.dtype == object:  # list columns (histories, multi-valued features) read without Ray's tensor type
            lengths = sorted({len(v) for v in values})
            if len(lengths) > 1:
                raise MsitError(f"{path}: column {name!r} holds lists of {lengths[:5]} values, not one length; "
                                "prepare the data again")
            values = np.stack(values) if len(values) else np.zeros((0, widths.get(name) or 0), dtype=np.int64)
        width = values.shape[1] if values.ndim == 2 else None
        if width != widths.get(name):
            found, expected = (f"lists of {width} values" if width is not None else "single values",
                               f"lists of {widths[name]}" if widths.get(name) is not None else "single values")
            raise MsitError(f"{path}: column {name!r} holds {found} where the model's feature spec says {expected}: "
                            "the data was prepared with another history length or settings; prepare it with "
                            "`--encoding-from MODEL`")
        out[name] = torch.from_numpy(values if values.flags.writeable else values.copy())
    return out


def _column_widths(spec: FeatureSpec) -> dict[str, int | None]:
    """The list length of each list column of the prepared shards (histories, multi-valued features)."""
    widths: dict[str, int | None] = {c: spec.history_length for c in
                                     ("history_item_ids", "history_scene_ids", "history_labels", "history_time_gaps")}
    widths |= {name: f.max_len for name, f in spec.fields.items() if f.type == "multi"}
    return widths


def select_scenes(data: Batch, scene_ids: list[int]) -> Batch:
    """The rows of `data` in these scenes."""
    keep = torch.isin(data["scene_id"], torch.tensor(scene_ids))
    return {k: v[keep] for k, v in data.items()}


def iterate(data: Batch, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
            ) -> Iterator[Batch]:
    n = len(data["label"])
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        yield {k: v[index] for k, v in data.items()}


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Binary cross-entropy, plus the model's own regulariser (the transfer-attention KL) if any."""
    output = model(batch)
    loss = nn.functional.binary_cross_entropy_with_logits(output.logits, batch["label"].float())
    return loss + output.regularization if output.regularization is not None else loss


def train_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, grad_clip: float = 5.0,
               amp_dtype: torch.dtype | None = None) -> float:
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
def predict(model: nn.Module, data: Batch, batch_size: int = 4096) -> np.ndarray:
    """Probabilities for every row, in order."""
    model.eval()
    device = next(model.parameters()).device
    chunks = [torch.sigmoid(model({k: v.to(device) for k, v in batch.items()}).logits.float()).cpu()
              for batch in iterate(data, batch_size)]
    return torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.float32)


def evaluate(model: nn.Module, data: Batch, spec: FeatureSpec, batch_size: int = 4096) -> dict:
    probs = predict(model, data, batch_size)
    names = spec.scene_names()
    return scene_metrics(data["label"].numpy(), probs, data["scene_id"].numpy(), data["user_id"].numpy(), names)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on embeddings, norms and biases: decay would shrink rare ids towards zero. Nor on
    # tables of which fine-tuning trains only some rows (`trained_rows`): decay would move the others.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            embedding = "embed" in name or "embedding" in name or hasattr(p, "trained_rows")
            (decay if p.ndim >= 2 and not embedding else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


@dataclass
class FitResult:
    best_epoch: int
    best_val: dict
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_auc, val_logloss, per scene
    seconds: float = 0.0


def fit(model: nn.Module, train: Batch, val: Batch, spec: FeatureSpec, cfg: TrainConfig,
        log: Callable[[str], None] = print, progress: bool = False) -> FitResult:
    """Train with early stopping on val AUC; the model ends with its best epoch's weights."""
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    device = next(model.parameters()).device  # the data stays in memory on the CPU; batches go to the model
    best_auc, best_state, best_epoch, best_val, history = -1.0, None, 0, {}, []
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        losses = []
        batches = iterate(train, cfg.batch_size, shuffle=True, generator=generator)
        total = (len(train["label"]) + cfg.batch_size - 1) // cfg.batch_size
        for batch in tqdm(batches, total=total, desc=f"epoch {epoch}", disable=not progress, leave=False):
            losses.append(train_step(model, {k: v.to(device) for k, v in batch.items()}, optimizer, cfg.grad_clip))
        metrics = evaluate(model, val, spec, cfg.eval_batch_size)
        val_auc = metrics["overall"]["auc"]
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_auc": val_auc,
                        "val_logloss": metrics["overall"]["logloss"],
                        "val_scene_auc": {s: m["auc"] for s, m in metrics["scenes"].items()}})
        log(f"epoch {epoch}: train loss {np.mean(losses):.4f}, val AUC {val_auc:.4f}, "
            f"val log loss {metrics['overall']['logloss']:.4f}")
        if val_auc > best_auc:
            best_auc, best_epoch, best_val = val_auc, epoch, metrics
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            log(f"early stop: no better val AUC for {cfg.patience} epochs; best epoch {best_epoch}")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch, best_val, history, time.perf_counter() - start)
