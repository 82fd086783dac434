"""Data-parallel training on Ray Train: the edge where Ray meets msit.

`run_training` builds a `TorchTrainer` whose workers run `train_loop_per_worker`: each reads its
shard of the prepared training split (Ray Data, `iter_torch_batches`), wraps the model in DDP with
`prepare_model`, and calls the same `train_step` as the single-process trainer. Rank 0 evaluates on
the validation split every epoch and attaches a checkpoint: a model directory (weights in
safetensors, config, feature spec) plus the optimizer state and the epoch. A restarted worker
group resumes from the latest checkpoint, the epoch counter continuing. The best checkpoint by val
AUC is exported as a self-contained model directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file

from msit.config import absolute_path, from_dict, load_yaml
from msit.data.feature_spec import FeatureSpec
from msit.errors import ConfigError, MsitError
from msit.finetune import FinetuneSpec, check_encoding_extends, scenes_to_tune, start_from
from msit.model import ModelConfig, batch_columns, build_for_data
from msit.model_dir import CONFIG_FILE, WEIGHTS_FILE, load_model_config, load_model_dir, save_model_dir
from msit.trainer import (
    TrainConfig,
    evaluate,
    load_split,
    make_optimizer,
    seed_everything,
    select_scenes,
    train_step,
)

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"


@dataclass
class ScalingSpec:
    num_workers: int = 2
    use_gpu: bool | str = "auto"  # True, False, or "auto": use GPUs when the cluster has any
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    torch_threads: int | None = None  # intra-op threads per worker; None: Ray's default (the worker's CPUs)


@dataclass
class RunSpec:
    name: str = "msit"  # the same name and storage path resume a run (Ray's own semantics)
    storage_path: str = "runs/ray_results"  # local path, NFS or s3:// / gs:// shared by all nodes
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2  # best by val AUC (Ray also keeps the latest)
    kill_worker_after_epoch: int | None = None  # fault drill: the last worker dies once after this epoch


@dataclass
class TrainRunConfig:
    data: str  # a prepared directory (msit data prepare)
    output: str  # where the best model directory is exported
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    run: RunSpec = field(default_factory=RunSpec)
    scenes: list[str] | None = None  # train and validate on these scenes' rows only (histories keep every scene)
    finetune: FinetuneSpec | None = None  # start from a trained model directory (see msit.finetune)

    @classmethod
    def load(cls, path: str | Path) -> TrainRunConfig:
        return from_dict(cls, load_yaml(path), where=str(path))


def _use_gpu(setting: bool | str) -> bool:
    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"scaling.use_gpu must be true, false or auto, got {setting!r}")


def _save_checkpoint(directory: Path, model, cfg: TrainRunConfig, spec: FeatureSpec, optimizer, state: dict) -> None:
    origin = {"finetuned_from": dataclasses.asdict(cfg.finetune)} if cfg.finetune is not None else {}
    save_model_dir(directory, model, cfg.model, spec, {"train": state, **origin})
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state))


def train_loop_per_worker(config: dict) -> None:
    cfg: TrainRunConfig = config["cfg"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    seed_everything(cfg.train.seed)
    spec = FeatureSpec.load(cfg.data)
    device = ray.train.torch.get_device()
    model = build_for_data(cfg.model, cfg.data, spec)  # the bare module: checkpoints and evaluation use it
    if cfg.finetune is not None:
        summary = start_from(model, cfg.finetune, spec, cfg.scenes)
        if rank == 0:
            for line in summary.lines():
                print(f"[msit] fine-tuning from {cfg.finetune.from_model} ({cfg.finetune.mode}): {line}", flush=True)
    first_epoch, best_auc, best_epoch, history = 1, -1.0, 0, []

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resume: weights, optimizer and the epoch counter
        with checkpoint.as_directory() as directory:
            model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))
            state = json.loads((Path(directory) / STATE_FILE).read_text())
            optimizer_state = torch.load(Path(directory) / OPTIMIZER_FILE, weights_only=True)
        first_epoch, best_auc, best_epoch = state["epoch"] + 1, state["best_val_auc"], state["best_epoch"]
        history = state["history"]
    ddp_model = ray.train.torch.prepare_model(model)  # DDP-wrapped (when world size > 1): training steps use it
    optimizer = make_optimizer(model, cfg.train)
    if checkpoint is not None:
        optimizer.load_state_dict(optimizer_state)
    if rank == 0:
        print(f"[msit] attempt starts at epoch {first_epoch}", flush=True)
    amp = torch.bfloat16 if device.type == "cuda" else None
    val = load_split(cfg.data, "val", spec) if rank == 0 else None
    if val is not None and cfg.scenes:
        val = select_scenes(val, spec.scene_ids(cfg.scenes))
    shard = ray.train.get_dataset_shard("train")
    if cfg.finetune is not None and first_epoch == 1:
        # Epoch 0 is the starting point: fine-tuning never exports a model worse on val than the one it began with.
        if rank == 0:
            best_auc = _report_start(model, val, spec, cfg, optimizer, history)
        else:
            ray.train.report({"epoch": 0}, checkpoint=None)  # report is collective: every rank calls it

    for epoch in range(first_epoch, cfg.train.epochs + 1):
        losses, samples = [], 0
        started_at, started = time.time(), time.perf_counter()
        # prefetch_batches: Ray Data converts and shuffles the next batches in background threads meanwhile.
        for batch in shard.iter_torch_batches(batch_size=cfg.train.batch_size, device=device, prefetch_batches=4,
                                              local_shuffle_buffer_size=4 * cfg.train.batch_size,
                                              local_shuffle_seed=cfg.train.seed + epoch):
            losses.append(train_step(ddp_model, batch, optimizer, cfg.train.grad_clip, amp))
            samples += len(batch["label"])
        # Throughput of the training pass alone (validation and checkpointing excluded), over all workers.
        samples = _sum_over_workers(samples, device, context.get_world_size())
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch, "train_loss": sum(losses) / max(len(losses), 1), "train_samples": samples,
                   "train_seconds": seconds, "train_samples_per_s": samples / seconds, "epoch_started_at": started_at}
        stop = torch.zeros(1, device=device)
        if rank == 0:
            metrics |= _val_metrics(model, val, spec)
            if metrics["val_auc"] > best_auc:
                best_auc, best_epoch = metrics["val_auc"], epoch
            stop[0] = float(epoch - best_epoch >= cfg.train.patience)
            history.append({**metrics, "first_epoch_of_attempt": first_epoch})
            state = {"epoch": epoch, "best_val_auc": best_auc, "best_epoch": best_epoch, **metrics,
                     "history": history}
            _report_checkpoint(model, cfg, spec, optimizer, metrics, state)
        else:
            ray.train.report(metrics, checkpoint=None)
        if context.get_world_size() > 1:  # every rank stops at the same epoch
            torch.distributed.broadcast(stop, src=0)
        if stop.item():
            break
        _fault_drill(cfg, context, epoch)


def _report_start(model, val, spec: FeatureSpec, cfg: TrainRunConfig, optimizer, history: list[dict]) -> float:
    metrics = {"epoch": 0, **_val_metrics(model, val, spec)}
    history.append({**metrics, "first_epoch_of_attempt": 1})
    state = {"epoch": 0, "best_val_auc": metrics["val_auc"], "best_epoch": 0, **metrics, "history": history}
    print(f"[msit] before fine-tuning: val AUC {metrics['val_auc']:.4f}", flush=True)
    _report_checkpoint(model, cfg, spec, optimizer, metrics, state)
    return metrics["val_auc"]


def _val_metrics(model, val, spec: FeatureSpec) -> dict:
    evaluation = evaluate(model, val, spec)
    return {"val_auc": evaluation["overall"]["auc"], "val_logloss": evaluation["overall"]["logloss"],
            **{f"val_auc/{s}": m["auc"] for s, m in evaluation["scenes"].items()}}


def _report_checkpoint(model, cfg: TrainRunConfig, spec: FeatureSpec, optimizer, metrics: dict, state: dict) -> None:
    """Rank 0's report: the metrics with a checkpoint (model directory, optimizer, training state)."""
    with tempfile.TemporaryDirectory() as directory:
        _save_checkpoint(Path(directory), model, cfg, spec, optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _sum_over_workers(value: int, device: torch.device, world_size: int) -> int:
    if world_size == 1:
        return value
    total = torch.tensor([value], device=device)
    torch.distributed.all_reduce(total)
    return int(total.item())


def _fault_drill(cfg: TrainRunConfig, context, epoch: int) -> None:
    """With run.kill_worker_after_epoch set, the last worker process dies hard, once per run."""
    drill = cfg.run.kill_worker_after_epoch
    if drill is None or epoch != drill or context.get_world_rank() != context.get_world_size() - 1:
        return
    marker = Path(cfg.run.storage_path) / cfg.run.name / ".fault_drill_done"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed after epoch {epoch}")
        os._exit(1)


def resolve_paths(cfg):
    """Local paths of a train or tune config (data, output, run.storage_path) made absolute for workers."""
    cfg = dataclasses.replace(cfg, data=absolute_path(cfg.data), output=absolute_path(cfg.output),
                              run=dataclasses.replace(cfg.run, storage_path=absolute_path(cfg.run.storage_path)))
    if getattr(cfg, "finetune", None) is not None:
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(
            cfg.finetune, from_model=absolute_path(cfg.finetune.from_model)))
    return cfg


def make_trainer(cfg: TrainRunConfig, callbacks: list | None = None, cpu_budget: float | None = None,
                 log=print) -> TorchTrainer:
    """The TorchTrainer of a run. `cpu_budget`: the cluster CPUs this run may hold (default all of them;
    Tune gives each concurrent trial its share)."""
    spec = FeatureSpec.load(cfg.data)
    if not (Path(cfg.data) / "train").is_dir():
        raise MsitError(f"{cfg.data} has no train split; run `msit data prepare` first")
    if cfg.finetune is not None:
        check_encoding_extends(cfg.finetune.from_model, spec, cfg.data)
        if cfg.finetune.mode == "scene":
            scenes_to_tune(cfg.finetune.from_model, spec, cfg.scenes)  # fails here, not in every worker
        if cfg.model != load_model_config(cfg.finetune.from_model):
            raise ConfigError(f"a fine-tuning run keeps the architecture of {cfg.finetune.from_model}: take its "
                              "model config (msit finetune does)")
    train = ray.data.read_parquet(str(Path(cfg.data) / "train"), columns=batch_columns(spec))
    if cfg.scenes:
        train = train.map_batches(_rows_of_scenes, batch_format="pyarrow",
                                  fn_kwargs={"scene_ids": spec.scene_ids(cfg.scenes)})
    use_gpu = _use_gpu(cfg.scaling.use_gpu)
    cpus, workers = cfg.scaling.cpus_per_worker, cfg.scaling.num_workers
    budget = ray.cluster_resources().get("CPU", 0) if cpu_budget is None else cpu_budget
    if workers * cpus > budget - 1:
        # Workers holding every CPU starve Ray Data's read tasks and the run hangs silently: keep one free.
        cpus = max(budget - 1, 0.1 * workers) / workers
        log(f"note: {workers} workers x {cfg.scaling.cpus_per_worker} CPU would leave Ray Data no CPU "
            f"of the {budget:g} this run may use; using {cpus:.2f} CPU per worker")
    resources = {"CPU": cpus, **({"GPU": cfg.scaling.gpus_per_worker} if use_gpu else {})}
    log(f"training {cfg.model.family} on {workers} worker(s) ({'GPU' if use_gpu else 'CPU'}), "
        f"run {cfg.run.name!r} in {cfg.run.storage_path}")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                                         checkpoint_score_attribute="val_auc",
                                                         checkpoint_score_order="max")),
        datasets={"train": train},
    )


def _rows_of_scenes(batch: pa.Table, scene_ids: list[int]) -> pa.Table:
    return batch.filter(pc.is_in(batch["scene_id"], value_set=pa.array(scene_ids, type=batch["scene_id"].type)))


def export_checkpoint(checkpoint: ray.train.Checkpoint, export: Path) -> dict:
    """Copy a checkpoint's model directory (not the optimizer) to `export`; returns its training info."""
    with checkpoint.as_directory() as directory:
        staging = Path(tempfile.mkdtemp(dir=export.parent if export.parent.exists() else None))
        for name in (WEIGHTS_FILE, CONFIG_FILE, "feature_spec.json"):
            shutil.copy2(Path(directory) / name, staging / name)
    loaded = load_model_dir(staging)  # re-save through the one writer: atomic, and proves it loads
    save_model_dir(export, loaded.model, loaded.config, loaded.spec, loaded.info)
    shutil.rmtree(staging, ignore_errors=True)
    return loaded.info["train"]


def run_training(cfg: TrainRunConfig, log=print) -> Path:
    """Fit on Ray Train and export the best checkpoint to `cfg.output`; returns that directory."""
    cfg = resolve_paths(cfg)
    result = make_trainer(cfg, log=log).fit()
    best = result.get_best_checkpoint(metric="val_auc", mode="max")
    if best is None:
        raise MsitError(f"run {cfg.run.name!r} finished without a checkpoint")
    info = export_checkpoint(best, Path(cfg.output))
    with result.checkpoint.as_directory() as directory:  # the latest checkpoint holds the whole history
        history = json.loads((Path(directory) / STATE_FILE).read_text())["history"]
    write_run_outputs(history, run_outputs_dir(cfg))
    log(f"per-epoch metrics, TensorBoard logs and curves.png in {run_outputs_dir(cfg)}")
    log(f"best epoch {info['best_epoch']} (val AUC {info['best_val_auc']:.4f}) exported to {cfg.output}")
    return Path(cfg.output)


def run_outputs_dir(cfg: TrainRunConfig) -> Path:
    output = Path(cfg.output)
    return output.with_name(f"{output.name}_training")


def write_run_outputs(history: list[dict], directory: Path) -> None:
    """metrics.json / metrics.csv (one row per epoch), TensorBoard event files and curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from tensorboardX import SummaryWriter

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(history, indent=1))
    frame = pd.DataFrame(history)
    frame.to_csv(directory / "metrics.csv", index=False)
    with SummaryWriter(str(directory / "tensorboard")) as writer:
        for row in history:
            for key, value in row.items():
                if key not in ("epoch", "epoch_started_at") and isinstance(value, int | float):
                    writer.add_scalar(key, value, row["epoch"])

    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(frame["epoch"], frame["train_loss"], marker="o")
    loss_ax.set(title="train loss", xlabel="epoch", ylabel="BCE")
    for column in [c for c in frame.columns if c.startswith("val_auc")]:
        label = "overall" if column == "val_auc" else column.split("/", 1)[1]
        auc_ax.plot(frame["epoch"], frame[column], marker="o", label=label, linewidth=2.5 if label == "overall" else 1)
    auc_ax.set(title="validation AUC by scene", xlabel="epoch", ylabel="AUC")
    auc_ax.legend()
    for ax in (loss_ax, auc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(directory / "curves.png", dpi=110)
    plt.close(fig)
