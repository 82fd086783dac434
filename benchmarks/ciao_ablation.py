"""What each of MSIT's additions beyond MODEL.md is worth on Ciao, at the point benchmarks/quality.py chose.

For each addition quality.py turns on for the Ciao protocol (ADDITIONS: ModelConfig fields), MSIT is trained with
that one addition switched off, at MSIT's chosen search point (read from benchmarks/results/quality_runs.json) and the
same seeds; the runs with everything on are quality.py's own (quality_runs.json). Val AUC decides whether an
addition stays; test AUC and the small scenes' AUC are recorded beside it.
Writes benchmarks/results/ciao_ablation.json.

    python benchmarks/ciao_ablation.py [--seeds 3] [--jobs 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from provenance import stamp
from quality import PROTOCOL_MODEL, ROOT, chosen_point, run_one

PROTOCOL = "ciao"
ADDITIONS = {"scene_evidence": False}  # field -> its value with the addition off
RESULTS = ROOT / "benchmarks" / "results"


def summary(runs: list[dict]) -> dict:
    return {
        "val_auc_mean": float(np.mean([r["val_auc"] for r in runs])),
        "test_auc_mean": float(np.mean([r["test"]["overall"]["auc"] for r in runs])),
        "small_scene_auc_mean": float(np.mean([r["small_scene_auc"] for r in runs])),
        "seeds": sorted(r["seed"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"), help="prepared data")
    parser.add_argument("--out", default=str(RESULTS / "ciao_ablation.json"))
    args = parser.parse_args()
    recorded = json.loads((RESULTS / "quality_runs.json").read_text())["runs"]
    point = chosen_point(recorded, PROTOCOL, "msit")
    if point is None:
        parser.error("quality_runs.json has no finished Ciao search for msit: run quality.py --protocols ciao first")
    full = [r for r in recorded if (r["protocol"], r["model"], r["point"]) == (PROTOCOL, "msit", point)]
    for field in ADDITIONS:
        if PROTOCOL_MODEL[PROTOCOL].get(field) is None:
            parser.error(f"quality.py does not set {field} for {PROTOCOL}: nothing to ablate")
    report: dict = {"point": point, "all_on": summary(full), "without": {}, **stamp(args.device)}
    tasks = [(field, seed) for field in ADDITIONS for seed in range(args.seeds)]
    runs: dict[str, list[dict]] = {field: [] for field in ADDITIONS}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pool.submit(
                run_one, PROTOCOL, "msit", seed, point, args.cache, args.device, args.threads, {field: ADDITIONS[field]}
            ): field
            for field, seed in tasks
        }
        for future in as_completed(futures):
            field = futures[future]
            runs[field].append(future.result())
            report["without"][field] = summary(runs[field])
            Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"msit on {PROTOCOL} at {point}: all on {report['all_on']}")
    for field, result in report["without"].items():
        print(f"  without {field}: {result} (val {result['val_auc_mean'] - report['all_on']['val_auc_mean']:+.4f})")


if __name__ == "__main__":
    main()
