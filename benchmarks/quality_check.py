"""Did a change keep the model's quality? MSIT's val AUC at its chosen settings, before and after, in one run.

For each protocol (MovieLens-100K genre and age), MSIT is trained exactly as benchmarks/quality.py trains
it at the point that benchmark chose for it (results/quality.json: learning rate and dropout; the
architecture in quality.ARCHITECTURE), with seed 0, by the code of `--before` (a commit checked out into
a temporary git worktree) and by this checkout's code, each side in its own subprocess with its own
imports. Records val AUC (the criterion), test AUC, best epoch and training time of each; `--save DIR`
keeps this checkout's trained models (DIR/<protocol>), e.g. for benchmarks/serve_bench.py --model.
Two trainings run at a time (`--jobs`).

    python benchmarks/quality_check.py [--before REV] [--protocols genre age] [--save DIR]

Writes benchmarks/results/quality_check.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from before_after import checkout, run_json, use_code_on_path
from provenance import git, load_average, stamp, stamp_of

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "13e09a2"  # main before issue 15


def train_one(protocol: str, cache: Path, save: str | None) -> dict:
    """One side's training, with the imports of the code first on sys.path (quality.py's own helpers)."""
    import time

    import torch
    from quality import SEARCH_SEED, _data, model_config, prepared_dir, train_config

    from msit.model import build_model
    from msit.training.trainer import evaluate, fit, seed_everything

    torch.set_num_threads(1)
    point = json.loads((ROOT / "benchmarks" / "results" / "quality.json").read_text())[protocol]["msit"]["chosen"]
    config, train = model_config("msit", point), train_config(point, SEARCH_SEED)
    prepared = prepared_dir(protocol, cache)
    spec, splits, table = _data(str(prepared.parent), prepared.name)
    seed_everything(train.seed)
    model = build_model(config, spec, table)
    start = time.perf_counter()
    result = fit(
        model, splits["train"], splits["val"], spec, train, log=lambda m: print(f"[{protocol}] {m}", flush=True)
    )
    test = evaluate(model, splits["test"], spec)
    if save:
        from msit.model.model_dir import save_model_dir

        save_model_dir(Path(save) / protocol, model, config, spec, {"train": {"best_epoch": result.best_epoch}})
    return {
        "point": point,
        "val_auc": result.best_val["overall"]["auc"],
        "test_auc": test["overall"]["auc"],
        "best_epoch": result.best_epoch,
        "train_s": round(time.perf_counter() - start, 1),
    }


def run_side(code: Path, protocol: str, cache: Path, save: str | None = None) -> dict:
    options = ["--one", protocol, "--cache", str(cache), *(["--save", save] if save else [])]
    return run_json(code, Path(__file__).resolve(), options, f"training {protocol}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--protocols", nargs="+", default=["genre", "age"], choices=["genre", "age"])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "msit-bench"))
    parser.add_argument("--save", help="keep this checkout's trained models here (DIR/<protocol>)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--before-from",
        help="take the before side from an earlier quality_check.json of the same "
        "--before commit instead of training it again (CPU training is deterministic)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality_check.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        use_code_on_path()  # that side's msit and quality.py
        print(json.dumps(train_one(args.one, Path(args.cache), args.save)))
        return

    provenance = stamp("cpu")
    before = git("rev-parse", args.before)
    cache = Path(args.cache)
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    from quality import prepared_dir

    for protocol in args.protocols:  # prepared once, before the sides run in parallel
        prepared_dir(protocol, cache)
    with checkout(before) as worktree:
        done, reused = {}, None
        if args.before_from:
            reused = json.loads(Path(args.before_from).read_text())
            if reused["before_commit"] != before:
                raise SystemExit(f"{args.before_from} measured before = {reused['before_commit']}, not {before}")
            done = {
                ("before", p): {
                    "val_auc": r["before_val_auc"],
                    "test_auc": r["before_test_auc"],
                    "best_epoch": r["before_best_epoch"],
                    "train_s": r["before_train_s"],
                }
                for p, r in reused["protocols"].items()
                if p in args.protocols
            }
        jobs = [
            (side, protocol)
            for side in ("before", "after")
            for protocol in args.protocols
            if (side, protocol) not in done
        ]
        with ThreadPoolExecutor(args.jobs) as pool:
            done |= dict(
                zip(
                    jobs,
                    pool.map(
                        lambda job: run_side(
                            worktree if job[0] == "before" else ROOT,
                            job[1],
                            cache,
                            args.save if job[0] == "after" else None,
                        ),
                        jobs,
                    ),
                    strict=True,
                )
            )
    protocols = {}
    for protocol in args.protocols:
        old, new = done[("before", protocol)], done[("after", protocol)]
        protocols[protocol] = {
            "point": new["point"],
            "val_auc": new["val_auc"],
            "before_val_auc": old["val_auc"],
            "val_auc_difference": new["val_auc"] - old["val_auc"],
            "test_auc": new["test_auc"],
            "before_test_auc": old["test_auc"],
            "best_epoch": new["best_epoch"],
            "before_best_epoch": old["best_epoch"],
            "train_s": new["train_s"],
            "before_train_s": old["train_s"],
        }
        print(protocol, protocols[protocol], flush=True)
    report = {
        "model": "msit, quality.ARCHITECTURE, seed 0, at quality.json's chosen point",
        "protocols": protocols,
        "before_commit": before,
        **provenance,
        "load_average_end": load_average(),
        "threads": 1,
        "jobs": args.jobs,
        # the run that measured the before side (the file's own before_from if it took it from another)
        "before_from": None
        if reused is None
        else reused.get("before_from") or {"file": args.before_from, **stamp_of(reused)},
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
