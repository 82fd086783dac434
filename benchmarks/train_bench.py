"""Training throughput: a plain PyTorch loop against Ray Train with 1 and 2 workers, in one run.

Same data (the MovieLens-100K genre protocol, history length 50), same model (MSIT, default
ModelConfig), same batch size and the same number of torch threads per process. Throughput is
training samples per second of steady-state epochs (the first epoch, which warms up the data
pipeline, is left out); validation and checkpointing are not counted. `ray_startup_s` is the time
from calling `run_training` to the first epoch starting (worker group, DDP set-up, Ray Data
pipeline), reported apart from throughput.

Writes benchmarks/results/train.json on CPU, train_gpu.json with --device cuda (named device).

    python benchmarks/train_bench.py [--epochs 3] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from quality import device_name, prepared_dir

from msit.data.feature_spec import FeatureSpec
from msit.model import ModelConfig, build_for_data
from msit.ray_env import init_ray
from msit.ray_train import RunSpec, ScalingSpec, TrainRunConfig, run_outputs_dir, run_training
from msit.trainer import TrainConfig, iterate, load_split, make_optimizer, seed_everything, train_step

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(prepared: Path, train_cfg: TrainConfig, device: str) -> list[dict]:
    """The baseline: in-memory tensors, shuffled index batches, the same train_step; no Ray at all."""
    spec = FeatureSpec.load(prepared)
    seed_everything(train_cfg.seed)
    model = build_for_data(ModelConfig(), prepared, spec).to(device)
    optimizer = make_optimizer(model, train_cfg)
    train = load_split(prepared, "train", spec)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    amp = torch.bfloat16 if device == "cuda" else None
    epochs = []
    for epoch in range(1, train_cfg.epochs + 1):
        started, samples = time.perf_counter(), 0
        for batch in iterate(train, train_cfg.batch_size, shuffle=True, generator=generator):
            train_step(model, {k: v.to(device, non_blocking=True) for k, v in batch.items()}, optimizer,
                       train_cfg.grad_clip, amp)
            samples += len(batch["label"])
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        epochs.append({"epoch": epoch, "train_samples": samples, "train_seconds": seconds,
                       "train_samples_per_s": samples / seconds})
        print(f"plain epoch {epoch}: {samples / seconds:,.0f} samples/s", flush=True)
    return epochs


def ray_run(prepared: Path, train_cfg: TrainConfig, workers: int, threads: int, use_gpu: bool,
            storage: Path) -> tuple[list[dict], float]:
    cfg = TrainRunConfig(
        data=str(prepared), output=str(storage / f"model_{workers}"), model=ModelConfig(), train=train_cfg,
        scaling=ScalingSpec(num_workers=workers, use_gpu=use_gpu, cpus_per_worker=1, torch_threads=threads),
        run=RunSpec(name=f"bench-{workers}-{int(time.time())}", storage_path=str(storage / "ray_results"),
                    keep_checkpoints=1))
    called_at = time.time()
    run_training(cfg, log=print)
    history = json.loads((run_outputs_dir(cfg) / "metrics.json").read_text())
    return history, history[0]["epoch_started_at"] - called_at


def steady(epochs: list[dict]) -> float:
    """Samples per second over the epochs after the first (all of them if there is only one)."""
    rest = epochs[1:] or epochs
    return sum(e["train_samples"] for e in rest) / sum(e["train_seconds"] for e in rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", help="JSON to write (default benchmarks/results/train.json or train_gpu.json)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU on this machine")
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("train_gpu.json" if args.device == "cuda"
                                                                 else "train.json"))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    torch.set_num_threads(args.threads)
    prepared = prepared_dir("genre", ROOT / "benchmarks" / ".cache")
    train_cfg = TrainConfig(epochs=args.epochs, patience=args.epochs)

    plain = plain_loop(prepared, train_cfg, args.device)
    started = time.perf_counter()
    init_ray(quiet=True)
    ray_init_s = time.perf_counter() - started
    # DDP needs one GPU per worker (NCCL refuses two ranks on one device).
    worker_counts = (1, 2) if args.device == "cpu" or torch.cuda.device_count() >= 2 else (1,)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in worker_counts:
            history, startup = ray_run(prepared, train_cfg, workers, args.threads, args.device == "cuda", Path(tmp))
            runs[workers] = {"epochs": history, "startup_s": startup}
            print(f"ray {workers} worker(s): {steady(history):,.0f} samples/s, start-up {startup:.1f} s", flush=True)

    import ray

    report = {
        "data": "ml100k_genre.csv (train split)", "model": "msit, default ModelConfig",
        "batch_size": train_cfg.batch_size, "epochs_per_run": args.epochs, "steady_state": "epochs 2..N",
        "torch_threads_per_process": args.threads,
        "plain_samples_per_s": steady(plain),
        "ray_1worker_samples_per_s": steady(runs[1]["epochs"]),
        "ray_2worker_samples_per_s": steady(runs[2]["epochs"]) if 2 in runs else None,
        "ray_startup_s": runs[1]["startup_s"], "ray_2worker_startup_s": runs[2]["startup_s"] if 2 in runs else None,
        "ray_init_s": ray_init_s,
        "ray_1worker_vs_plain": steady(runs[1]["epochs"]) / steady(plain),
        "ray_2worker_vs_plain": steady(runs[2]["epochs"]) / steady(plain) if 2 in runs else None,
        "per_epoch": {"plain": plain, **{f"ray_{w}worker": r["epochs"] for w, r in runs.items()}},
        "device": device_name(args.device),
        "cluster_cpus": ray.cluster_resources().get("CPU"), "machine_cores": os.cpu_count(),
        "torch": torch.__version__, "ray": ray.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "per_epoch"}, indent=1))


if __name__ == "__main__":
    main()
