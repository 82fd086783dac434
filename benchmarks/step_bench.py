"""Step speed of every model family, before and after a change, in one run on the same batches.

For each family (default ModelConfig of the family, embed_dim 32, history length 50), on the same
batches of the MovieLens-100K genre train split (a seeded shuffle, batch 1,024 for training, 4,096 for
inference), one torch thread:
  - training: samples/s of `trainer.train_step` (forward, backward, AdamW) over `--steps` steps after
    `--warmup` steps;
  - inference: rows/s of the eval-mode forward pass (no gradients).
"Before" is the same measurement made by the code of `--before` (a commit, checked out into a temporary git
worktree) and "after" by this checkout's code, each in its own subprocess (its own imports), alternating
family by family so that both see the same machine. `--profile` adds, for MSIT and STAR, the ops that took
the most time in a few training steps of each side (torch.profiler, self CPU time). `--compile` adds MSIT's
training step with `TrainConfig.compile` (torch.compile) on this checkout's code.

    python benchmarks/step_bench.py [--before REV] [--steps 12] [--profile] [--compile]

Writes benchmarks/results/step.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from before_after import checkout, run_json, use_code_on_path
from provenance import git, load_average, stamp

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("msit", "msit_no_transfer", "shared_bottom", "mmoe", "star")
BEFORE = "13e09a2"  # main before issue 15 (fused attention, user side once)
TRAIN_BATCH, INFER_BATCH = 1024, 4096


# -- one side's measurement (run in a subprocess with that side's code first on sys.path) ------------------------


def measure(prepared: Path, family: str, steps: int, warmup: int, profile: bool, compile_step: bool) -> dict:
    import torch

    import msit
    from msit.data.feature_spec import FeatureSpec
    from msit.data.prepared import load_sequences, load_split
    from msit.model import ModelConfig, build_for_data

    package = Path(msit.__file__).parent
    if (package / "training").is_dir():
        from msit.training.trainer import TrainConfig, make_optimizer, seed_everything, train_step
    else:  # code from before the layout of issue 18 (msit/trainer.py)
        from msit.trainer import TrainConfig, make_optimizer, seed_everything, train_step  # type: ignore[no-redef]
    if (package / "allocator.py").is_file():  # as training starts (trainer.prepare_for_training), where it exists
        from msit.allocator import keep_freed_memory

        keep_freed_memory()

    torch.set_num_threads(1)
    spec = FeatureSpec.load(prepared)
    train = load_split(prepared, "train", spec, load_sequences(prepared))
    seed_everything(0)
    model = build_for_data(ModelConfig(family=family), prepared, spec)
    if compile_step:
        model.compile()
    optimizer = make_optimizer(model, TrainConfig())
    generator = torch.Generator().manual_seed(0)
    batches = list(train.batches(TRAIN_BATCH, 50, shuffle=True, generator=generator))[: warmup + steps]
    for batch in batches[:warmup]:
        train_step(model, batch, optimizer)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        train_step(model, batch, optimizer)
    train_s = time.perf_counter() - start
    out = {"train_samples_per_s": sum(len(b["label"]) for b in batches[warmup:]) / train_s}

    model.eval()
    infer = list(train.batches(INFER_BATCH, 50))[:4]
    with torch.no_grad():
        model(infer[0])
        start = time.perf_counter()
        for batch in infer[1:]:
            model(batch)
        out["infer_rows_per_s"] = sum(len(b["label"]) for b in infer[1:]) / (time.perf_counter() - start)

    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        model.train()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[warmup : warmup + 3]:
                train_step(model, batch, optimizer)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
        out["profile_top_ops"] = [
            {"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in top
        ]
    return out


def run_side(code: Path, prepared: Path, family: str, args, compile_step: bool = False) -> dict:
    options = [
        "--measure",
        family,
        "--prepared",
        str(prepared),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    options += ["--profile"] * (args.profile and family in ("msit", "star")) + ["--compile"] * compile_step
    return run_json(code, Path(__file__).resolve(), options, f"measuring {family}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE, help="the commit whose code is 'before'")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per family")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="record the top ops of MSIT's and STAR's steps")
    parser.add_argument("--compile", action="store_true", help="also time MSIT's step under torch.compile")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "msit-bench"),
        help="where ml100k_genre is prepared once and reused",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step.json"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one side, one family
    parser.add_argument("--prepared", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        use_code_on_path()
        print(
            json.dumps(measure(Path(args.prepared), args.measure, args.steps, args.warmup, args.profile, args.compile))
        )
        return

    provenance = stamp("cpu")
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's msit, whatever is installed
    from quality import prepared_dir

    prepared = prepared_dir("genre", Path(args.cache))
    before = git("rev-parse", args.before)
    with checkout(before) as worktree:
        families = {}
        for family in args.families:
            old = run_side(worktree, prepared, family, args)
            new = run_side(ROOT, prepared, family, args)
            families[family] = {
                "train_samples_per_s": round(new["train_samples_per_s"], 1),
                "before_train_samples_per_s": round(old["train_samples_per_s"], 1),
                "train_speedup": round(new["train_samples_per_s"] / old["train_samples_per_s"], 2),
                "infer_rows_per_s": round(new["infer_rows_per_s"], 1),
                "before_infer_rows_per_s": round(old["infer_rows_per_s"], 1),
                "infer_speedup": round(new["infer_rows_per_s"] / old["infer_rows_per_s"], 2),
            }
            if "profile_top_ops" in new:
                families[family] |= {
                    "profile_top_ops": new["profile_top_ops"],
                    "before_profile_top_ops": old["profile_top_ops"],
                }
            print(family, {k: v for k, v in families[family].items() if "profile" not in k}, flush=True)
        if args.compile and "msit" in families:
            compiled = run_side(ROOT, prepared, "msit", args, compile_step=True)
            families["msit"]["compiled_train_samples_per_s"] = round(compiled["train_samples_per_s"], 1)
            print("msit compiled", families["msit"]["compiled_train_samples_per_s"], flush=True)
    import torch

    report = {
        "families": families,
        "before_commit": before,
        **provenance,
        "load_average_end": load_average(),
        "threads": 1,
        "torch": torch.__version__,
        "batch_size": {"train": TRAIN_BATCH, "infer": INFER_BATCH},
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "data": "ml100k_genre train split, history length 50",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
