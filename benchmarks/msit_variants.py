"""MSIT's size and parts, on val: which config changes would help MSIT on the MovieLens-100K protocols?

Each variant changes one thing of the config benchmarks/quality.py uses for MSIT (and one run is MSIT's
ablation in that config), trains it with seed 0 at the learning rate quality.py chose for MSIT on each
protocol, and records val AUC and GAUC (test too, for the record; no choice is made on it).
Writes benchmarks/results/msit_variants.json.

    python benchmarks/msit_variants.py [--device cuda] [--jobs 15]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from provenance import stamp
from quality import ROOT, TRAIN, as_record, model_config, run_one

POINT = {"genre": {"lr": 4e-3, "dropout": 0.1}, "age": {"lr": 2e-3, "dropout": 0.1}}  # MSIT's, in quality.json
VARIANTS = {  # ModelConfig overrides of quality.py's MSIT config
    "base": {},
    "embed64": {"embed_dim": 64},
    "interest_layers2": {"interest_layers": 2},
    "transfer_layers1": {"transfer_layers": 1},
    "transfer_layers3": {"transfer_layers": 3},
    "history20": {"history_length": 20},
    "mlp256": {"mlp_dims": (256, 128)},
    "no_scene_bias": {"scene_bias": False},
    "fusion_sum": {"fusion": "sum"},
    "fusion_gate": {"fusion": "gate"},
    "heads2_attention": {"interest_heads": 2, "transfer_heads": 2, "fusion": "attention"},
    "ablation_base": {"family": "msit_no_transfer"},
}


def run_variant(protocol: str, name: str, cache_dir: str, device: str) -> dict:
    overrides = dict(VARIANTS[name])
    run = run_one(protocol, overrides.pop("family", "msit"), 0, POINT[protocol], cache_dir, device, 1, overrides)
    return {
        "protocol": protocol,
        "variant": name,
        "val_auc": run["val_auc"],
        "val_gauc": run["val_gauc"],
        "best_epoch": run["best_epoch"],
        "test_auc": run["test"]["overall"]["auc"],
        "test_gauc": run["test"]["overall"]["gauc"],
        "s": run["train_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each")
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"), help="prepared data")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "msit_variants.json"))
    args = parser.parse_args()
    provenance = stamp(args.device)
    report = {
        "settings": {
            "base": as_record(model_config("msit", POINT["genre"])),
            "points": POINT,
            "train": TRAIN,
            "seed": 0,
            "device": provenance["device"],
        },
        "runs": [],
        **provenance,
    }
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_variant, p, n, args.cache, args.device) for n in VARIANTS for p in POINT]
        for future in as_completed(futures):
            report["runs"].append(future.result())
            print(json.dumps(report["runs"][-1]), flush=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
    for protocol in POINT:
        runs = {r["variant"]: r for r in report["runs"] if r["protocol"] == protocol}
        print(f"\n{protocol}: val AUC, change from base")
        for name, r in sorted(runs.items(), key=lambda kv: -kv[1]["val_auc"]):
            print(f"  {name:18s} {r['val_auc']:.4f} {r['val_auc'] - runs['base']['val_auc']:+.4f}")


if __name__ == "__main__":
    main()
