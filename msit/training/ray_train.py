"""Data-parallel training on Ray Train: the edge where Ray meets msit.

`run_training` builds a `TorchTrainer` whose workers run `train_loop_per_worker`: the epoch loop of
`msit.training.train_loop` (the one `trainer.fit` runs) with Ray at its edges. Each worker loads every user's
sequence once (`load_sequences`, on its device), receives its shard of the small event rows through
Ray Data (files in a new random order each epoch, a local shuffle buffer), cuts the history windows
per batch (`model_batch`), wraps the model in DDP with `prepare_model` and calls the same
`train_step`. `train.batch_size` is the global batch: each of W workers takes batch_size // W rows.
Every worker scores its shard of val; the predictions are gathered for the metrics, and rank 0
attaches a checkpoint each epoch: a model directory (weights in safetensors, config, feature spec)
plus the optimizer state and the epoch. A restarted worker
group resumes from the latest checkpoint that loads, the epoch counter continuing. The best checkpoint
by val AUC is exported as a self-contained model directory. A run name stands for one training config
(`check_run_config`): the same name resumes it, a different config under it is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from msit.config import absolute_path, from_dict, load_yaml
from msit.data.feature_spec import FeatureSpec
from msit.data.prepared import event_columns, load_sequences, model_batch
from msit.errors import ConfigError, MsitError
from msit.model import ModelConfig, build_for_data
from msit.model.model_dir import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_model_config,
    load_model_dir,
    load_state_checked,
    load_weights,
    save_model_dir,
    write_model_files,
)
from msit.output_dir import check_outside_inputs, check_replaceable
from msit.training.finetune import FinetuneSpec, check_encoding_extends, scenes_to_tune, start_from
from msit.training.train_loop import EpochEnd, EpochLoop, LoopState, TorchWorld, predictions, validation_metrics
from msit.training.trainer import TrainConfig, make_optimizer, prepare_for_training, seed_everything, train_step

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
RUN_CONFIG_FILE = "msit_run_config.json"  # in the run's storage folder: what a resume must match


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
    # Fault drill, once per run: a worker process dies hard (os._exit) after this epoch's report, or, with
    # kill_after_batches, that many batches into the next epoch (mid-epoch, nothing of it checkpointed).
    kill_worker_after_epoch: int | None = None
    kill_rank: int | None = None  # the rank that dies (0 included); None: the last one
    kill_after_batches: int | None = None

    def __post_init__(self) -> None:
        if self.kill_worker_after_epoch is None and (self.kill_rank is not None or self.kill_after_batches is not None):
            raise ConfigError("run.kill_rank and run.kill_after_batches need run.kill_worker_after_epoch")
        if self.kill_rank is not None and self.kill_rank < 0:
            raise ConfigError(f"run.kill_rank must be a rank (>= 0), got {self.kill_rank}")
        if self.kill_after_batches is not None and self.kill_after_batches < 1:
            raise ConfigError(f"run.kill_after_batches must be at least 1, got {self.kill_after_batches}")


@dataclass
class TrainRunConfig:
    data: str  # a prepared directory (msit data prepare)
    output: str  # where the best model directory is exported
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    run: RunSpec = field(default_factory=RunSpec)
    scenes: list[str] | None = None  # train and validate on these scenes' rows only (histories keep every scene)
    finetune: FinetuneSpec | None = None  # start from a trained model directory (see msit.training.finetune)

    @classmethod
    def load(cls, path: str | Path) -> TrainRunConfig:
        return from_dict(cls, load_yaml(path), where=str(path))


# Config that does not change what a run trains, so a resume may differ in it: where the model goes, Ray's
# run settings (name, storage, failures, checkpoints kept, drills), resources (more or fewer workers after a
# lost node), and how long / how patiently it trains and evaluates (a resume with more epochs continues).
RESUMABLE_TRAIN_FIELDS = ("epochs", "patience", "eval_batch_size")


def run_identity(cfg: TrainRunConfig) -> dict:
    """What a run name stands for: the training-relevant config. Counted: the whole model config; the train
    config but epochs, patience and eval_batch_size; scenes; finetune (from_model, mode); and the data by what
    it holds (its encoding fingerprint and row counts), not by its path. Not counted: output, run.*, scaling.*."""
    spec = FeatureSpec.load(cfg.data)
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in RESUMABLE_TRAIN_FIELDS}
    identity = {
        "model": dataclasses.asdict(cfg.model),
        "train": train,
        "scenes": cfg.scenes,
        "finetune": dataclasses.asdict(cfg.finetune) if cfg.finetune is not None else None,
        "data": {"encoding": spec.fingerprint(), "rows": spec.row_counts},
    }
    return json.loads(json.dumps(identity, sort_keys=True, default=str))  # tuples as lists, as read back


def check_run_config(cfg: TrainRunConfig) -> None:
    """On the driver, before Ray Train starts (which resumes any run of the same name and storage path):
    record the run's identity in its storage folder, or, if the run exists, refuse a different one with the
    keys that differ. Otherwise a new learning rate would resume the old run's weights without training, and
    a wider model would fail with a size mismatch on every attempt."""
    fs, run_dir = _run_storage(cfg)
    path = posixpath.join(run_dir, RUN_CONFIG_FILE)
    identity = run_identity(cfg)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            try:
                stored = json.loads(f.read())
                old_digest, old = stored["hash"], stored["config"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"{path} is damaged ({type(e).__name__}: {e}); remove {run_dir} to start "
                    "afresh, or pick a new run name"
                ) from None
        if old_digest != digest or old != identity:
            changes = _differences(old, identity)
            shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
            raise ConfigError(
                f"run {cfg.run.name!r} in {cfg.run.storage_path} was started with another config "
                f"({shown or 'hash ' + old_digest + ' -> ' + digest}); the same run name resumes "
                f"that run: pick a new run name (--name or run.name), or remove {run_dir} to start "
                "afresh"
            )
        return
    fs.create_dir(run_dir, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps({"hash": digest, "config": identity}, indent=1, sort_keys=True).encode())


def _run_storage(cfg: TrainRunConfig) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of the run's folder (Ray's `storage_path/name`): local, NFS or a URI."""
    if "://" in cfg.run.storage_path:
        fs, root = pafs.FileSystem.from_uri(cfg.run.storage_path)
        return fs, posixpath.join(root, cfg.run.name)
    return pafs.LocalFileSystem(), str(Path(cfg.run.storage_path) / cfg.run.name)


def _differences(old, new, prefix: str = "") -> list[str]:
    """`key.path: old -> new` for every leaf that differs between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for key in sorted(set(old) | set(new), key=str)
            for line in _differences(
                old.get(key, "(absent)"), new.get(key, "(absent)"), f"{prefix}.{key}" if prefix else str(key)
            )
        ]
    return [] if old == new else [f"{prefix}: {json.dumps(old)} -> {json.dumps(new)}"]


def _use_gpu(setting: bool | str) -> bool:
    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"scaling.use_gpu must be true, false or auto, got {setting!r}")


def _save_checkpoint(directory: Path, model, cfg: TrainRunConfig, spec: FeatureSpec, optimizer, state: dict) -> None:
    origin = {"finetuned_from": dataclasses.asdict(cfg.finetune)} if cfg.finetune is not None else {}
    write_model_files(directory, model, cfg.model, spec, {"train": state, **origin})  # a fresh private folder
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state))


# Rows in each worker's local shuffle buffer (at least 4 local batches): event rows are ~40 bytes, so 65,536 of
# them take a few MB. Files are read in a new random order every epoch and each file is written in random row
# order, so the buffer mixes rows from several files, and users from across the split (docs/training.md, "Shuffling").
SHUFFLE_BUFFER_ROWS = 65_536


def local_batch_size(batch_size: int, workers: int) -> int:
    """`train.batch_size` is the global batch: each of the W workers takes batch_size // W rows a step, and DDP
    averages the W gradients, so a step is the same as one over batch_size rows in one process."""
    if batch_size < workers:
        raise ConfigError(
            f"train.batch_size {batch_size} is the global batch, split over {workers} workers: "
            f"it must be at least the number of workers"
        )
    return batch_size // workers


def train_loop_per_worker(config: dict) -> None:  # noqa: C901  (to split)
    """One rank of a Ray Train run: the epoch loop of `msit.training.train_loop`, with Ray at its edges (the dataset
    shards in, `ray.train.report` with a checkpoint out, resume from `ray.train.get_checkpoint`)."""
    cfg: TrainRunConfig = config["cfg"]
    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    spec = FeatureSpec.load(cfg.data)
    device = ray.train.torch.get_device()
    seed_everything(cfg.train.seed)  # the model's initial weights: the same on every rank and every device
    model = build_for_data(cfg.model, cfg.data, spec)  # the bare module: checkpoints and evaluation use it
    log = (lambda message: print(f"[msit] {message}", flush=True)) if rank == 0 else (lambda message: None)
    if cfg.finetune is not None:
        summary = start_from(model, cfg.finetune, spec, cfg.scenes)
        for line in summary.lines():
            log(f"fine-tuning from {cfg.finetune.from_model} ({cfg.finetune.mode}): {line}")
    state = LoopState()
    skipped: list[str] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resume: weights, optimizer and the epoch counter
        saved, optimizer_state, skipped = resume_from(checkpoint, model, log=print if rank == 0 else None)
        state = LoopState(
            first_epoch=saved["epoch"] + 1,
            best_auc=saved["best_val_auc"],
            best_epoch=saved["best_epoch"],
            history=saved["history"],
        )
    prepare_for_training(model, cfg.train, device)  # deterministic kernels or not; compiled if asked
    ddp_model = ray.train.torch.prepare_model(model)  # DDP-wrapped (when world size > 1): training steps use it
    optimizer = make_optimizer(model, cfg.train)
    if checkpoint is not None:
        optimizer.load_state_dict(optimizer_state)
    log(f"attempt starts at epoch {state.first_epoch}")
    amp = torch.bfloat16 if device.type == "cuda" else None
    # Every worker holds every user's sequence (device memory on GPU) and receives only event rows through Ray
    # Data; windows are cut per batch. docs/training.md, "Scaling past one worker's memory", for the partitioned design.
    sequences = load_sequences(cfg.data).to(device)
    history_length = cfg.model.history_length
    batch_size = local_batch_size(cfg.train.batch_size, workers)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    world = TorchWorld(rank, workers, device)

    def epoch_seed(epoch: int) -> int:
        return (cfg.train.seed * 1_000_003 + epoch) * workers + rank

    def read_epoch(epoch: int):  # prefetch_batches: Ray Data converts and shuffles ahead in its own threads
        return train_shard.iter_torch_batches(
            batch_size=batch_size,
            device=device,
            prefetch_batches=4,
            local_shuffle_buffer_size=max(SHUFFLE_BUFFER_ROWS, 4 * batch_size),
            local_shuffle_seed=epoch_seed(epoch),
        )

    if train_rows_cached(cfg.data):
        read_epoch = KeptShard(read_epoch, batch_size, epoch_seed).epoch
    ahead = EpochsAhead(read_epoch, last_epoch=cfg.train.epochs)

    def train_batches(epoch: int):
        for events in ahead.epoch(epoch):
            yield model_batch(events, sequences, history_length)

    def validate() -> dict | None:  # every rank scores its shard of val; rank 0 computes the metrics over all
        batches = (
            model_batch(events, sequences, history_length)
            for events in val_shard.iter_torch_batches(
                batch_size=cfg.train.eval_batch_size, device=device, prefetch_batches=2
            )
        )
        return validation_metrics(world, predictions(model, batches), spec.scene_names())

    def on_epoch(end: EpochEnd) -> None:  # report is collective: every rank calls it, rank 0 with the checkpoint
        if rank != 0:
            ray.train.report(end.metrics, checkpoint=None)
            return
        if skipped and end.epoch == state.first_epoch:
            end.state.history[-1]["skipped_checkpoints"] = skipped
        train_state = {
            "epoch": end.epoch,
            "best_val_auc": end.state.best_auc,
            "best_epoch": end.state.best_epoch,
            **end.metrics,
            "history": end.state.history,
        }
        _report_checkpoint(model, cfg, spec, optimizer, end.metrics, train_state)

    loop = EpochLoop(
        cfg.train,
        step=lambda batch: train_step(ddp_model, batch, optimizer, cfg.train.grad_clip, amp),
        train_batches=train_batches,
        validate=validate,
        on_epoch=on_epoch,
        world=world,
        after_batch=lambda epoch, batches: _fault_drill(cfg, context, epoch, batches=batches),
        after_epoch=lambda epoch: _fault_drill(cfg, context, epoch, batches=None),
        log=log,
    )
    # Fine-tuning's epoch 0 is the starting point: it never exports a model worse on val than the one it began with.
    loop.run(state, start_point=cfg.finetune is not None)


class KeptShard:
    """A small train split's shard, kept in the worker's memory. The attempt's first epoch streams it through
    Ray Data and keeps its event rows as they pass; every later epoch is a fresh seeded permutation of them,
    batched in memory as the plain loop batches, without Ray Data's per-batch work (the shuffle buffer, the
    conversion and prefetch threads beside the one training thread). Used where Ray keeps the split in its
    object store anyway (`train_rows_cached`); a rank then keeps the rows its first epoch drew."""

    def __init__(self, stream, batch_size: int, epoch_seed):
        self.stream, self.batch_size, self.epoch_seed = stream, batch_size, epoch_seed
        self.rows: dict[str, torch.Tensor] | None = None

    def epoch(self, epoch: int):
        if self.rows is None:
            kept = []
            for events in self.stream(epoch):
                kept.append(events)
                yield events
            self.rows = {name: torch.cat([b[name] for b in kept]) for name in kept[0]} if kept else {}
            return
        if not self.rows:
            return
        n = len(next(iter(self.rows.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.epoch_seed(epoch)))
        order = order.to(next(iter(self.rows.values())).device)
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
            yield {name: values[rows] for name, values in self.rows.items()}


class EpochsAhead:
    """Each epoch's Ray Data iteration, started as soon as the previous epoch's training pass ends, so that
    its start (a new execution of the dataset: the coordinator, the first blocks, filling the shuffle
    buffer) overlaps validation and checkpointing instead of the next epoch's steps. A thread pulls the
    batches into a short queue; an error in it is raised in the consumer. All ranks end their training
    pass together (DDP), so they also start the next iteration together, as streaming_split needs."""

    QUEUE_BATCHES = 8

    def __init__(self, read_epoch, last_epoch: int):
        self.read_epoch, self.last_epoch = read_epoch, last_epoch
        self.started: dict[int, queue.Queue] = {}

    def _start(self, epoch: int) -> None:
        batches: queue.Queue = queue.Queue(maxsize=self.QUEUE_BATCHES)

        def pull() -> None:
            try:
                for batch in self.read_epoch(epoch):
                    batches.put(batch)
                batches.put(_END)
            except BaseException as e:  # noqa: BLE001  (handed to the consumer, which raises it)
                batches.put(_Failed(e))

        threading.Thread(target=pull, name=f"msit-epoch-{epoch}", daemon=True).start()
        self.started[epoch] = batches

    def epoch(self, epoch: int):
        if epoch not in self.started:
            self._start(epoch)
        batches = self.started.pop(epoch)
        while (batch := batches.get()) is not _END:
            if isinstance(batch, _Failed):
                raise batch.error
            yield batch
        if epoch < self.last_epoch:
            self._start(epoch + 1)


_END = object()


@dataclass
class _Failed:
    error: BaseException


def resume_from(checkpoint: ray.train.Checkpoint, model, log=None) -> tuple[dict, dict, list[str]]:
    """Load the checkpoint Ray hands a restarted worker into `model`; if it does not load (a truncated
    safetensors file, bad JSON, a missing file), the run's older checkpoints (`checkpoint_<time>` folders
    beside it, newest first) in turn, as Ray Train's own resume would skip a broken one. Returns the training
    state, the optimizer state and the checkpoints skipped. Every rank runs this on the same storage, so all
    pick the same checkpoint; `log` (rank 0's print) says which."""
    skipped: list[str] = []
    for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
        try:
            with candidate.as_directory() as directory:
                state, optimizer_state = load_checkpoint(Path(directory), model)
        except MsitError as e:
            skipped.append(posixpath.basename(candidate.path))
            if log:
                log(f"[msit] checkpoint {candidate.path} cannot be loaded: {e}", flush=True)
            continue
        if skipped and log:
            log(
                f"[msit] resuming from the newest checkpoint that loads: {candidate.path} (epoch {state['epoch']}); "
                f"skipped {skipped}",
                flush=True,
            )
        return state, optimizer_state, skipped
    run_dir = posixpath.dirname(checkpoint.path)
    raise MsitError(
        f"no checkpoint of the run in {run_dir} loads ({len(skipped)} tried, each damaged); "
        f"remove {run_dir} to start afresh, or use a new run name"
    )


def _older_checkpoints(checkpoint: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's checkpoints older than `checkpoint`, newest first (Train V2 names them checkpoint_<time>)."""
    run_dir, name = posixpath.split(checkpoint.path.rstrip("/"))
    assert checkpoint.filesystem is not None  # a checkpoint Train reports has its storage filesystem
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(run_dir))
    older = sorted(
        (
            i.base_name
            for i in infos
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_") and i.base_name < name
        ),
        reverse=True,
    )
    return [ray.train.Checkpoint(posixpath.join(run_dir, n), filesystem=checkpoint.filesystem) for n in older]


def load_checkpoint(directory: Path, model) -> tuple[dict, dict]:
    """Weights into `model`, and the training and optimizer states, of one checkpoint folder; anything
    missing or damaged is an MsitError naming the file."""
    load_state_checked(model, load_weights(directory / WEIGHTS_FILE), directory / WEIGHTS_FILE)
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text())
        for key in ("epoch", "best_val_auc", "best_epoch", "history"):
            state[key]  # a KeyError names the key
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MsitError(f"{path}: not a training state ({type(e).__name__}: {e})") from None
    path = directory / OPTIMIZER_FILE
    try:
        optimizer_state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises anything from a damaged zip or pickle stream)
        raise MsitError(
            f"{path}: not an optimizer state ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    return state, optimizer_state


def _report_checkpoint(model, cfg: TrainRunConfig, spec: FeatureSpec, optimizer, metrics: dict, state: dict) -> None:
    """Rank 0's report: the metrics with a checkpoint (model directory, optimizer, training state)."""
    with tempfile.TemporaryDirectory() as directory:
        _save_checkpoint(Path(directory), model, cfg, spec, optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _fault_drill(cfg: TrainRunConfig, context, epoch: int, batches: int | None) -> None:
    """The drill of `run.kill_*`: the chosen rank's process dies hard, once per run. Called after each
    epoch (`batches` None) and after each batch (`epoch` the last finished one, `batches` into the next)."""
    run = cfg.run
    if run.kill_worker_after_epoch is None or epoch != run.kill_worker_after_epoch or batches != run.kill_after_batches:
        return
    rank = context.get_world_size() - 1 if run.kill_rank is None else run.kill_rank
    if context.get_world_rank() != rank:
        return
    marker = Path(run.storage_path) / run.name / ".fault_drill_done"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        where = f"{batches} batches into epoch {epoch + 1}" if batches is not None else f"after epoch {epoch}"
        marker.write_text(f"rank {rank} killed {where}")
        if batches is not None:
            # Mid-epoch means after the last epoch's checkpoint is safe: Train V2's controller takes a report in
            # at its next poll of the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), and a
            # batch prefetched while validating can reach this line within milliseconds of that report.
            time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")))
        os._exit(1)


def resolve_paths(cfg):
    """Local paths of a train or tune config (data, output, run.storage_path) made absolute for workers."""
    cfg = dataclasses.replace(
        cfg,
        data=absolute_path(cfg.data),
        output=absolute_path(cfg.output),
        run=dataclasses.replace(cfg.run, storage_path=absolute_path(cfg.run.storage_path)),
    )
    if getattr(cfg, "finetune", None) is not None:
        cfg = dataclasses.replace(
            cfg, finetune=dataclasses.replace(cfg.finetune, from_model=absolute_path(cfg.finetune.from_model))
        )
    return cfg


def make_trainer(
    cfg: TrainRunConfig, callbacks: list | None = None, cpu_budget: float | None = None, log=print
) -> TorchTrainer:
    """The TorchTrainer of a run. `cpu_budget`: the cluster CPUs this run may hold (default all of them;
    Tune gives each concurrent trial its share)."""
    spec = FeatureSpec.load(cfg.data)
    if cfg.finetune is not None:
        check_encoding_extends(cfg.finetune.from_model, spec, cfg.data)
        if cfg.finetune.mode == "scene":
            scenes_to_tune(cfg.finetune.from_model, spec, cfg.scenes)  # fails here, not in every worker
        if cfg.model != load_model_config(cfg.finetune.from_model):
            raise ConfigError(
                f"a fine-tuning run keeps the architecture of {cfg.finetune.from_model}: take its "
                "model config (msit finetune does)"
            )
    datasets = {split: event_dataset(cfg, spec, split) for split in ("train", "val")}
    use_gpu = _use_gpu(cfg.scaling.use_gpu)
    cpus, workers = cfg.scaling.cpus_per_worker, cfg.scaling.num_workers
    budget = ray.cluster_resources().get("CPU", 0) if cpu_budget is None else cpu_budget
    if workers * cpus > budget - 1:
        # Workers holding every CPU starve Ray Data's read tasks and the run hangs silently: keep one free.
        cpus = max(budget - 1, 0.1 * workers) / workers
        log(
            f"note: {workers} workers x {cfg.scaling.cpus_per_worker} CPU would leave Ray Data no CPU "
            f"of the {budget:g} this run may use; using {cpus:.2f} CPU per worker"
        )
    resources = {"CPU": cpus, **({"GPU": cfg.scaling.gpus_per_worker} if use_gpu else {})}
    check_run_config(cfg)  # last: a run folder is claimed only by a config that passed every other check
    log(
        f"training {cfg.model.family} on {workers} worker(s) ({'GPU' if use_gpu else 'CPU'}), "
        f"run {cfg.run.name!r} in {cfg.run.storage_path}"
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints, checkpoint_score_attribute="val_auc", checkpoint_score_order="max"
            ),
        ),
        # dict is invariant; ray annotates dict[str, Dataset | Callable] where it means a Mapping
        datasets=datasets,  # type: ignore[arg-type]
        dataset_config=ShardedData(),
    )


# Val is cut into blocks of this many rows before the split, so that every rank gets a share of it (the
# split hands out whole blocks, and a small val split is often one block).
VAL_BLOCK_ROWS = 4096


# A train split's event rows up to this size on disk are read once and kept in Ray's object store (a few dozen
# bytes a row: 1 GiB is some 20M events), so an epoch starts without reading Parquet again; larger splits
# stream from their files every epoch.
CACHE_TRAIN_ROWS_BYTES = 1 << 30


def train_rows_cached(data: str | Path) -> bool:
    """Whether a prepared train split is small enough for Ray to keep (`CACHE_TRAIN_ROWS_BYTES`)."""
    return sum(f.stat().st_size for f in (Path(data) / "train").rglob("*.parquet")) <= CACHE_TRAIN_ROWS_BYTES


def event_dataset(cfg: TrainRunConfig, spec: FeatureSpec, split: str) -> ray.data.Dataset:
    """The event rows of a split (`event_columns`, compact types) as a Ray Dataset. The train split's blocks
    come in a new random order every epoch (every execution; seeded): its files when it streams from
    Parquet, its cached blocks when it is small enough to keep (`CACHE_TRAIN_ROWS_BYTES`)."""
    path = Path(cfg.data) / split
    if not path.is_dir():
        raise MsitError(f"{cfg.data} has no {split} split; run `msit data prepare` first")
    cached = split == "train" and train_rows_cached(cfg.data)
    # reseed_after_execution: a new order each epoch, still determined by the seed.
    shuffle = (
        ray.data.FileShuffleConfig(seed=cfg.train.seed, reseed_after_execution=True)
        if split == "train" and not cached
        else None
    )
    dataset = ray.data.read_parquet(str(path), columns=event_columns(spec), shuffle=shuffle)
    if cfg.scenes:
        # ray's signature for fn has room for the batch alone, not the fn_kwargs it passes
        dataset = dataset.map_batches(
            _rows_of_scenes,  # type: ignore[arg-type]
            batch_format="pyarrow",
            fn_kwargs={"scene_ids": spec.scene_ids(cfg.scenes)},
        )
    if cached:
        dataset = dataset.materialize().randomize_block_order(
            seed=ray.data.RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
        )
    if split != "train":
        dataset = dataset.map_batches(_same_rows, batch_format="pyarrow", batch_size=VAL_BLOCK_ROWS)
    return dataset


def _same_rows(batch: pa.Table) -> pa.Table:
    return batch


class ShardedData(ray.train.DataConfig):
    """How the datasets reach the workers. train: split into equal shards (every rank takes the same number
    of DDP steps; Ray drops at most W - 1 rows of an epoch to make them equal). val: split without dropping
    a row (blocks go to the rank with the fewest rows so far), so every rank scores its share of val and
    the metrics see every row."""

    def configure(self, datasets: dict, world_size: int, worker_handles, worker_node_ids, **kwargs) -> list[dict]:
        others = {name: ds for name, ds in datasets.items() if name != "val"}
        output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            if val.name is None:
                val.set_name("val")
            val.context.execution_options = self._resolve_execution_options("val")
            for rank, shard in enumerate(val.streaming_split(world_size, equal=False)):
                output[rank]["val"] = shard
        return output


def _rows_of_scenes(batch: pa.Table, scene_ids: list[int]) -> pa.Table:
    return batch.filter(pc.is_in(batch["scene_id"], value_set=pa.array(scene_ids, type=batch["scene_id"].type)))


def export_checkpoint(checkpoint: ray.train.Checkpoint, export: Path) -> dict:
    """Copy a checkpoint's model directory (not the optimizer) to `export`; returns its training info.
    Loading it first proves it loads; `save_model_dir` writes atomically and replaces only a model dir."""
    with checkpoint.as_directory() as directory:
        loaded = load_model_dir(directory)
    save_model_dir(export, loaded.model, loaded.config, loaded.spec, loaded.info)
    return loaded.info["train"]


def export_best(result: ray.train.Result, export: Path, log=print) -> dict:
    """Export the best checkpoint by val AUC that loads; a damaged one is skipped, saying so."""
    ranked = sorted(result.best_checkpoints or [], key=lambda pair: pair[1].get("val_auc", -1.0), reverse=True)
    for checkpoint, _ in ranked:
        try:
            return export_checkpoint(checkpoint, export)
        except MsitError as e:
            log(f"note: skipping the damaged checkpoint {checkpoint.path}: {e}")
    raise MsitError(f"run {result.path} has no checkpoint that loads; nothing was exported to {export}")


def run_training(cfg: TrainRunConfig, log=print) -> Path:
    """Fit on Ray Train and export the best checkpoint to `cfg.output`; returns that directory."""
    cfg = resolve_paths(cfg)
    output = Path(cfg.output)
    check_outside_inputs(output, [cfg.data])  # fail now, not after training, if the export would be refused
    check_replaceable(output, CONFIG_FILE, overwrite=True)
    trainer = make_trainer(cfg, log=log)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        user_error = _user_error(e)
        if user_error is None:
            raise
        raise user_error from None
    info = export_best(result, output, log=log)
    assert result.checkpoint is not None  # export_best found the best one
    with result.checkpoint.as_directory() as directory:  # the latest checkpoint holds the whole history
        history = json.loads((Path(directory) / STATE_FILE).read_text())["history"]
    write_run_outputs(history, run_outputs_dir(cfg))
    log(f"per-epoch metrics, TensorBoard logs and curves.png in {run_outputs_dir(cfg)}")
    log(f"best epoch {info['best_epoch']} (val AUC {info['best_val_auc']:.4f}) exported to {cfg.output}")
    return output


def _user_error(error: Exception) -> MsitError | None:
    """The MsitError a worker raised (every attempt failed on it), to be shown as one line, not a traceback."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in [*failures.values(), error.__cause__]:
        while failure is not None:
            if isinstance(failure, MsitError):
                return type(failure)(str(failure))
            # Train V2 wraps a worker's exception in UserExceptionWithTraceback (`_base_exc`).
            failure = getattr(failure, "_base_exc", None) or failure.__cause__
    return None


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
