"""Training throughput and agreement: the plain loop against Ray Train with 1 and 2 workers, in one run.

Throughput (`--parts throughput`): for MSIT and for the cheap `shared_bottom` (where per-batch overhead is
not hidden behind compute), the same data (MovieLens-100K genre, history length 50), model (default
ModelConfig of the family), global batch (1,024: each of W Ray workers takes 1,024 // W) and torch
threads per process. The plain loop is `trainer.fit` (the epoch loop of msit.training.train_loop over an in-memory
EventSplit, a global shuffle each epoch); Ray Train runs the same loop in `train_loop_per_worker` on the
Ray Data path (event rows through Ray Data, sequences loaded once per worker, windows cut per batch).
Throughput is training samples per second of the epochs after the first (which warms up the pipeline);
validation and checkpointing are not counted. `startup_s`: from calling `run_training` to the first
epoch starting.

Agreement (`--parts auc`): `msit train --config train/configs/ml100k_genre.yaml` (Ray Train, the config's
2 workers) against benchmarks/quality.py's single-process run (`quality.run_config`) of the same config:
test AUC of each (`product_vs_benchmark_test_auc`).

Mixing (`--parts mixing`): distinct users per batch of 1,024 rows on the Ray path (as a worker reads
it: files in the epoch's random order, the local shuffle buffer) against a global shuffle.

Writes benchmarks/results/train.json on CPU, train_gpu.json with --device cuda (named device). A run of some
--parts keeps the other parts of the file, each with the stamp of the run that measured it
(`parts_from_earlier_runs`); the top-level stamp (benchmarks/provenance.py) is this run's.

    python benchmarks/train_bench.py [--epochs 3] [--threads 1] [--device cpu|cuda] [--parts ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from provenance import load_average, stamp, stamp_of
from quality import prepared_dir, run_config

from msit.data.feature_spec import FeatureSpec
from msit.data.prepared import load_sequences, load_split
from msit.model import ModelConfig, build_for_data
from msit.model.model_dir import load_model_dir
from msit.ray_env import init_ray
from msit.training.ray_train import (
    SHUFFLE_BUFFER_ROWS,
    RunSpec,
    ScalingSpec,
    TrainRunConfig,
    event_dataset,
    run_outputs_dir,
    run_training,
)
from msit.training.trainer import TrainConfig, evaluate, fit, seed_everything

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("msit", "shared_bottom")
PARTS = ("throughput", "auc", "mixing")
AUC_CONFIG = ROOT / "train" / "configs" / "ml100k_genre.yaml"


def plain_run(prepared: Path, family: str, train_cfg: TrainConfig, device: str) -> list[dict]:
    """The baseline: trainer.fit, one process, in memory, no Ray."""
    spec = FeatureSpec.load(prepared)
    sequences = load_sequences(prepared)
    train, val = (load_split(prepared, split, spec, sequences) for split in ("train", "val"))
    seed_everything(train_cfg.seed)
    model = build_for_data(ModelConfig(family=family), prepared, spec).to(device)
    result = fit(model, train, val, spec, train_cfg, log=lambda m: print(f"plain {family} {m}", flush=True))
    return result.history


def ray_run(
    prepared: Path, family: str, train_cfg: TrainConfig, workers: int, threads: int, use_gpu: bool, storage: Path
) -> tuple[list[dict], float]:
    cfg = TrainRunConfig(
        data=str(prepared),
        output=str(storage / f"model_{family}_{workers}"),
        model=ModelConfig(family=family),
        train=train_cfg,
        scaling=ScalingSpec(num_workers=workers, use_gpu=use_gpu, cpus_per_worker=1, torch_threads=threads),
        run=RunSpec(
            name=f"bench-{family}-{workers}-{int(time.time())}",
            storage_path=str(storage / "ray_results"),
            keep_checkpoints=1,
        ),
    )
    called_at = time.time()
    run_training(cfg, log=print)
    history = json.loads((run_outputs_dir(cfg) / "metrics.json").read_text())
    return history, history[0]["epoch_started_at"] - called_at


def steady(epochs: list[dict]) -> float:
    """Samples per second over the epochs after the first (all of them if there is only one)."""
    rest = [e for e in epochs if e["epoch"] >= 1][1:] or epochs
    return sum(e["train_samples"] for e in rest) / sum(e["train_seconds"] for e in rest)


def throughput(prepared: Path, args, storage: Path) -> dict:
    train_cfg = TrainConfig(epochs=args.epochs, patience=args.epochs)
    # DDP needs one GPU per worker (NCCL refuses two ranks on one device).
    worker_counts = (1, 2) if args.device == "cpu" or torch.cuda.device_count() >= 2 else (1,)
    models = {}
    for family in FAMILIES:
        plain = plain_run(prepared, family, train_cfg, args.device)
        print(f"plain {family}: {steady(plain):,.0f} samples/s", flush=True)
        runs = {}
        for workers in worker_counts:
            history, startup = ray_run(
                prepared, family, train_cfg, workers, args.threads, args.device == "cuda", storage
            )
            runs[workers] = {"epochs": history, "startup_s": startup}
            print(
                f"ray {family} {workers} worker(s): {steady(history):,.0f} samples/s, start-up {startup:.1f} s",
                flush=True,
            )
        entry = {"plain_samples_per_s": steady(plain)}
        for workers in (1, 2):
            run = runs.get(workers)
            entry[f"ray_{workers}worker_samples_per_s"] = steady(run["epochs"]) if run else None
            entry[f"ray_{workers}worker_vs_plain"] = steady(run["epochs"]) / steady(plain) if run else None
            entry[f"ray_{workers}worker_startup_s"] = run["startup_s"] if run else None
        entry["per_epoch"] = {"plain": plain, **{f"ray_{w}worker": r["epochs"] for w, r in runs.items()}}
        models[family] = entry
    return models


def product_vs_benchmark(prepared: Path, args, storage: Path) -> dict:
    """`msit train` on the genre config (its 2 workers) and quality.py's single-process run of that config."""
    cfg = TrainRunConfig.load(AUC_CONFIG)
    cfg = dataclasses.replace(
        cfg,
        data=str(prepared),
        output=str(storage / "auc_model"),
        scaling=dataclasses.replace(cfg.scaling, torch_threads=args.threads),
        run=dataclasses.replace(
            cfg.run, name=f"bench-auc-{int(time.time())}", storage_path=str(storage / "ray_results")
        ),
    )
    spec = FeatureSpec.load(prepared)
    test = load_split(prepared, "test", spec)
    started = time.perf_counter()
    loaded = load_model_dir(run_training(cfg, log=print))
    train_s = time.perf_counter() - started
    product = evaluate(loaded.model, test, spec)
    info = loaded.info["train"]
    print(
        f"msit train: test AUC {product['overall']['auc']:.4f} (val {info['best_val_auc']:.4f}, "
        f"epoch {info['best_epoch']})",
        flush=True,
    )
    benchmark = run_config(cfg.model, cfg.train, prepared, args.device, args.threads, tag="[quality.py run]")
    return {
        "config": str(AUC_CONFIG.relative_to(ROOT)),
        "workers": cfg.scaling.num_workers,
        "msit_train": product["overall"]["auc"],
        "benchmark_fit": benchmark["test"]["overall"]["auc"],
        "difference": product["overall"]["auc"] - benchmark["test"]["overall"]["auc"],
        "msit_train_val_auc": info["best_val_auc"],
        "benchmark_fit_val_auc": benchmark["val_auc"],
        "msit_train_best_epoch": info["best_epoch"],
        "benchmark_fit_best_epoch": benchmark["best_epoch"],
        "msit_train_gauc": product["overall"]["gauc"],
        "benchmark_fit_gauc": benchmark["test"]["overall"]["gauc"],
        "msit_train_s": train_s,
        "benchmark_fit_s": benchmark["train_s"],
    }


def mixing(prepared: Path, epochs: int = 2, batch_size: int = 1024) -> dict:
    """Distinct users per batch: the Ray path as one worker reads it, against a global shuffle and file order."""
    spec = FeatureSpec.load(prepared)
    users = load_split(prepared, "train", spec).events["user_id"].numpy()
    cfg = TrainRunConfig(data=str(prepared), output="unused")
    dataset = event_dataset(cfg, spec, "train")

    def per_batch(column_batches) -> list[int]:
        return [len(np.unique(b)) for b in column_batches if len(b) == batch_size]

    ray_epochs, first_rows = [], []
    for epoch in range(1, epochs + 1):
        batches = [
            b["user_id"]
            for b in dataset.iter_batches(
                batch_size=batch_size,
                batch_format="numpy",
                local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                local_shuffle_seed=epoch,
            )
        ]
        ray_epochs.append(float(np.mean(per_batch(batches))))
        first_rows.append(np.concatenate(batches)[:batch_size])
    file_order = [b["user_id"] for b in dataset.iter_batches(batch_size=batch_size, batch_format="numpy")]
    generator = np.random.default_rng(0)
    shuffled = users[generator.permutation(len(users))]
    global_shuffle = per_batch([shuffled[i : i + batch_size] for i in range(0, len(users), batch_size)])
    by_user = np.sort(users)  # rows grouped by user, as a per-user partitioning would leave them
    grouped = per_batch([by_user[i : i + batch_size] for i in range(0, len(users), batch_size)])
    return {
        "data": "ml100k_genre train split",
        "batch_size": batch_size,
        "users_in_split": len(np.unique(users)),
        "train_files": len(list((prepared / "train").glob("*.parquet"))),
        "shuffle_buffer_rows": SHUFFLE_BUFFER_ROWS,
        "ray_path_distinct_users_per_batch": ray_epochs,
        "ray_path_file_order_only": float(np.mean(per_batch(file_order))),
        "global_shuffle_distinct_users_per_batch": float(np.mean(global_shuffle)),
        "rows_grouped_by_user_distinct_users_per_batch": float(np.mean(grouped)),
        "epochs_start_with_other_rows": bool(not np.array_equal(first_rows[0], first_rows[-1])),
    }


PART_KEYS = {"mixing": "mixing", "throughput": "models", "auc": "product_vs_benchmark_test_auc"}


def keep_earlier_parts(report: dict, out: Path, parts: list[str]) -> None:
    """A run of some parts keeps the other parts of `out` as they were, each named with the commit it ran on."""
    if not out.is_file():
        return
    earlier = json.loads(out.read_text())
    for part in PARTS:
        if part not in parts and PART_KEYS[part] in earlier:
            report[PART_KEYS[part]] = earlier[PART_KEYS[part]]
            # loadavg_start/_end: the names before provenance.py
            origin = earlier.get("parts_from_earlier_runs", {}).get(part) or {
                **stamp_of(earlier),
                **{k: earlier[k] for k in ("load_average_end", "loadavg_start", "loadavg_end") if k in earlier},
            }
            report.setdefault("parts_from_earlier_runs", {})[part] = origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per throughput run; the first is warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", help="JSON to write (default benchmarks/results/train.json or train_gpu.json)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU on this machine")
    out = Path(
        args.out or ROOT / "benchmarks" / "results" / ("train_gpu.json" if args.device == "cuda" else "train.json")
    )
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    provenance = stamp(args.device)
    torch.set_num_threads(args.threads)
    prepared = prepared_dir("genre", ROOT / "benchmarks" / ".cache")
    started = time.perf_counter()
    init_ray(quiet=True)
    report: dict = {"ray_init_s": time.perf_counter() - started}
    with tempfile.TemporaryDirectory() as tmp:
        if "mixing" in args.parts:
            report["mixing"] = mixing(prepared)
            print(json.dumps(report["mixing"]), flush=True)
        if "throughput" in args.parts:
            report["models"] = throughput(prepared, args, Path(tmp))
        if "auc" in args.parts:
            report["product_vs_benchmark_test_auc"] = product_vs_benchmark(prepared, args, Path(tmp))
            print(json.dumps(report["product_vs_benchmark_test_auc"]), flush=True)

    import ray

    report |= {
        "data": "ml100k_genre.csv (train split)",
        "batch_size": "1024 global (each of W workers: 1024 // W)",
        "epochs_per_run": args.epochs,
        "steady_state": "epochs 2..N",
        "torch_threads_per_process": args.threads,
        **provenance,
        "load_average_end": load_average(),
        "cluster_cpus": ray.cluster_resources().get("CPU"),
        "machine_cores": os.cpu_count(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    keep_earlier_parts(report, out, args.parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "models"}, indent=1))
    for family, entry in report.get("models", {}).items():
        print(family, {k: v for k, v in entry.items() if k != "per_epoch"})


if __name__ == "__main__":
    main()
