"""Model quality on the MovieLens-100K multi-scenario protocols: MSIT against its baselines.

Trains every model on split == train, chooses the epoch on val only (early stopping on val AUC),
reports test AUC / log loss / GAUC overall and per scene, over several seeds, single process.
Writes benchmarks/results/quality.json ({protocol: {model: summary}}) and quality_runs.json (settings,
every run with its per-epoch history) after every run, so an interrupted benchmark resumes where it
stopped: runs already recorded with the same settings are skipped.

    python benchmarks/quality.py [--seeds 3] [--protocols genre age] [--models msit star ...]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from msit.data.feature_spec import FeatureSpec
from msit.data.prepare import PrepareConfig, prepare
from msit.model import FAMILIES, ModelConfig, build_model, load_item_table
from msit.trainer import TrainConfig, evaluate, fit, load_split, seed_everything

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PROTOCOLS = {"genre": "ml100k_genre.csv", "age": "ml100k_age.csv"}

# Fixed before looking at test results; every family shares the embedding width and training settings.
MODEL = dict(embed_dim=32, dropout=0.1, history_length=50)
# MSIT's architecture as Ray Tune chose it on genre's val split (benchmarks/tune_ml100k.py ->
# results/tune_ml100k_genre.json: 1 head, concat fusion); the ablation keeps the same architecture so
# that it differs from MSIT in the transfer alone. Test results played no part in the choice.
ARCHITECTURE = {family: dict(interest_heads=1, transfer_heads=1, fusion="concat")
                for family in ("msit", "msit_no_transfer")}


def model_config(family: str) -> ModelConfig:
    return ModelConfig(family=family, **MODEL, **ARCHITECTURE.get(family, {}))


def as_record(config: ModelConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))  # as read back from quality_runs.json (tuples -> lists)
TRAIN = dict(epochs=8, batch_size=1024, lr=2e-3, weight_decay=1e-4, patience=2)


def prepared_dir(protocol: str, cache: Path) -> Path:
    out = cache / protocol
    if not (out / "feature_spec.json").is_file():
        prepare(PrepareConfig(inputs=[str(SHARED / PROTOCOLS[protocol])], out=str(out), history_length=50,
                              overwrite=True, num_cpus=2), log=print)
    return out


def summarize(runs: list[dict]) -> dict:
    aucs = [r["test"]["overall"]["auc"] for r in runs]
    scenes = runs[0]["test"]["scenes"].keys()
    return {
        "overall_auc_mean": float(np.mean(aucs)), "overall_auc_std": float(np.std(aucs)),
        "overall_logloss_mean": float(np.mean([r["test"]["overall"]["logloss"] for r in runs])),
        "gauc_mean": float(np.mean([r["test"]["overall"]["gauc"] for r in runs])),
        "seeds": [r["seed"] for r in runs],
        "scenarios": {s: {"auc_mean": float(np.mean([r["test"]["scenes"][s]["auc"] for r in runs])),
                          "logloss_mean": float(np.mean([r["test"]["scenes"][s]["logloss"] for r in runs]))}
                      for s in scenes},
        "train_s": float(np.mean([r["train_s"] for r in runs])),
        "best_epochs": [r["best_epoch"] for r in runs],
        "val_auc_mean": float(np.mean([r["val_auc"] for r in runs])),
    }


def write_reports(report: dict, out: Path, runs_path: Path) -> None:
    """quality.json: {protocol: {model: summary}}; quality_runs.json: the settings and every run."""
    by: dict[str, dict[str, list]] = {}
    for r in report["runs"]:
        by.setdefault(r["protocol"], {}).setdefault(r["model"], []).append(r)
    summary = {p: {m: summarize(rs) for m, rs in models.items()} for p, models in by.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    runs_path.write_text(json.dumps(report, indent=1))


def markdown_table(report: dict, protocols: list[str]) -> str:
    lines = []
    for protocol in protocols:
        results = report.get(protocol, {})
        if not results:
            continue
        scenes = list(next(iter(results.values()))["scenarios"])
        header = ["model", "AUC", "log loss", "GAUC", *(f"AUC {s}" for s in scenes), "seeds", "train s"]
        lines += [f"**{protocol}** (test, mean ± std over seeds)", "", "| " + " | ".join(header) + " |",
                  "|---" * len(header) + "|"]
        for family, r in sorted(results.items(), key=lambda kv: -kv[1]["overall_auc_mean"]):
            per_scene = " | ".join(f"{r['scenarios'][s]['auc_mean']:.4f}" for s in scenes)
            lines.append(f"| {family} | {r['overall_auc_mean']:.4f} ± {r['overall_auc_std']:.4f} | "
                         f"{r['overall_logloss_mean']:.4f} | {r['gauc_mean']:.4f} | {per_scene} | "
                         f"{len(r['seeds'])} | {r['train_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"), help="prepared data")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--table", action="store_true", help="print the results as a markdown table and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text()), args.protocols))
        return
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    runs_path = out.with_name("quality_runs.json")  # every run in full: settings, per-epoch history, test metrics
    report = json.loads(runs_path.read_text()) if runs_path.is_file() else {}
    if not report and out.is_file() and "runs" in json.loads(out.read_text()):  # older single-file layout
        report = json.loads(out.read_text())
    settings = {"model": MODEL, "train": TRAIN, "threads": args.threads}
    if report.get("settings") != settings:
        report = {"settings": settings, "runs": []}
    # A run is reused only if it was made with the family's current config (runs recorded before configs
    # were stored used the defaults with MODEL).
    for r in report["runs"]:
        r.setdefault("config", as_record(ModelConfig(family=r["model"], **MODEL)))
    report["runs"] = [r for r in report["runs"] if r["config"] == as_record(model_config(r["model"]))]
    done = {(r["protocol"], r["model"], r["seed"]) for r in report["runs"]}
    write_reports(report, out, runs_path)

    for protocol in args.protocols:
        data = prepared_dir(protocol, Path(args.cache))
        spec = FeatureSpec.load(data)
        splits = {s: load_split(data, s, spec) for s in ("train", "val", "test")}
        table = load_item_table(data, spec)
        for family in args.models:
            for seed in range(args.seeds):
                if (protocol, family, seed) in done:
                    continue
                seed_everything(seed)
                config = model_config(family)
                model = build_model(config, spec, table)
                result = fit(model, splits["train"], splits["val"], spec, TrainConfig(seed=seed, **TRAIN),
                             log=lambda m, p=protocol, f=family, s=seed: print(f"[{p} {f} seed {s}] {m}", flush=True))
                t0 = time.perf_counter()
                test = evaluate(model, splits["test"], spec)
                print(f"[{protocol} {family} seed {seed}] test AUC {test['overall']['auc']:.4f} "
                      f"({result.seconds:.0f} s training, eval {time.perf_counter() - t0:.1f} s)", flush=True)
                report["runs"].append({"protocol": protocol, "model": family, "seed": seed, "config": as_record(config),
                                       "test": test,
                                       "val_auc": result.best_val["overall"]["auc"], "best_epoch": result.best_epoch,
                                       "train_s": result.seconds, "history": result.history})
                write_reports(report, out, runs_path)

    summary = json.loads(out.read_text())
    for protocol in args.protocols:
        print(f"\n{protocol}: mean test AUC over seeds (std)")
        for family, s in sorted(summary.get(protocol, {}).items(), key=lambda kv: -kv[1]["overall_auc_mean"]):
            print(f"  {family:18s} {s['overall_auc_mean']:.4f} ({s['overall_auc_std']:.4f})  "
                  f"logloss {s['overall_logloss_mean']:.4f}  GAUC {s['gauc_mean']:.4f}  seeds {s['seeds']}")


if __name__ == "__main__":
    main()
