"""The heads x fusion search on MovieLens-100K (genre protocol), with the best model's test AUC.

Prepares ../shared/data/ml100k_genre.csv (cached in benchmarks/.cache), runs the search of
tune/configs/ml100k_genre.yaml (16 trials, ASHA) on a local Ray instance, evaluates the exported best
model on the test split, and writes to benchmarks/results/: tune_ml100k_genre.csv (every trial),
tune_ml100k_genre_heatmap.png and tune_ml100k_genre.json (best config, its val and test metrics).
Rerunning with the same --name resumes an interrupted search (`resumed_search`: then trials finished
before may have run on another commit than the stamp's).

    python benchmarks/tune_ml100k.py [--name msit-search-ml100k-genre] [--max-concurrent-trials 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from provenance import stamp
from quality import prepared_dir

from msit.data.prepared import load_split
from msit.model.model_dir import load_model_dir
from msit.ray_env import init_ray
from msit.training.trainer import evaluate
from msit.tuning.ray_tune import TuneRunConfig, run_search, search_outputs_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "tune" / "configs" / "ml100k_genre.yaml"))
    parser.add_argument("--name", default="msit-search-ml100k-genre", help="search name (the same one resumes)")
    parser.add_argument("--max-concurrent-trials", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    provenance = stamp("cuda" if torch.cuda.is_available() else "cpu")  # the config's use_gpu is auto

    cfg = TuneRunConfig.load(args.config)
    cfg.data = str(prepared_dir("genre", ROOT / "benchmarks" / ".cache"))
    cfg.output = str(ROOT / "benchmarks" / ".cache" / "tune_ml100k_genre" / "best")
    cfg.run.name, cfg.run.storage_path = args.name, str(ROOT / "benchmarks" / ".cache" / "ray_results")
    cfg.search.max_concurrent_trials = args.max_concurrent_trials
    init_ray(quiet=True)
    from ray import tune

    resumed = tune.Tuner.can_restore(f"{cfg.run.storage_path}/{cfg.run.name}")  # as run_search decides
    started = time.perf_counter()
    best_dir = run_search(cfg, log=print)
    seconds = time.perf_counter() - started

    loaded = load_model_dir(best_dir)
    test = evaluate(loaded.model, load_split(cfg.data, "test", loaded.spec), loaded.spec)
    out = search_outputs_dir(cfg)
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "trials.csv", RESULTS / "tune_ml100k_genre.csv")
    shutil.copy2(out / "heatmap.png", RESULTS / "tune_ml100k_genre_heatmap.png")
    search = json.loads((out / "search.json").read_text())
    report = {
        **provenance,
        "resumed_search": resumed,
        "protocol": "ml100k_genre",
        "config": Path(args.config).name,
        "search": search,
        "best_model": {
            "family": loaded.config.family,
            "interest_heads": loaded.config.interest_heads,
            "transfer_heads": loaded.config.transfer_heads,
            "fusion": loaded.config.fusion,
            "embed_dim": loaded.config.embed_dim,
            "best_epoch": loaded.info["train"]["best_epoch"],
        },
        "test": test,
        "search_seconds": seconds,
        "max_concurrent_trials": args.max_concurrent_trials,
        "note": "test metrics of the exported best trial (chosen on val AUC only), from "
        "msit.training.trainer.evaluate, the function `msit evaluate` prints",
    }
    (RESULTS / "tune_ml100k_genre.json").write_text(json.dumps(report, indent=1))
    print(f"best {search['best_params']}: val AUC {search['best_val_auc']:.4f}, test AUC {test['overall']['auc']:.4f}")


if __name__ == "__main__":
    main()
