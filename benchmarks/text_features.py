"""Do the item-title text features help MSIT more than its baselines? Val only, on the MovieLens-100K protocols.

Copies each protocol's prepared data, embeds the titles with the default encoder (`msit data embed-text`:
all-MiniLM-L6-v2, offline), then trains each family at the point benchmarks/quality.py chose for it
(results/quality.json), seed 0, with and without `use_text`, and records val AUC and GAUC. No test metric
is computed. Writes benchmarks/results/text_features.json.

    python benchmarks/text_features.py [--protocols genre age] [--models msit msit_no_transfer star] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from provenance import stamp
from quality import ARCHITECTURE, MODEL, PROTOCOLS, ROOT, TRAIN, prepared_dir

from msit.data.feature_spec import FeatureSpec
from msit.data.prepared import load_sequences, load_split
from msit.model import ModelConfig, build_for_data
from msit.training.trainer import TrainConfig, fit, seed_everything

CACHE = ROOT / "benchmarks" / ".cache"


def with_text(protocol: str) -> Path:
    """A copy of the protocol's prepared data with the title embeddings beside it."""
    out = CACHE / f"{protocol}_text"
    if not (out / "text_embeddings.parquet").is_file():
        from msit.text import embed_item_text  # a Ray Data step: starts a local Ray instance

        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(prepared_dir(protocol, CACHE), out)
        embed_item_text(out)
    return out


def run(protocol: str, family: str, point: dict, use_text: bool, data: str) -> dict:
    torch.set_num_threads(1)
    spec = FeatureSpec.load(data)
    seed_everything(0)
    config = ModelConfig(
        family=family, **MODEL, **ARCHITECTURE.get(family, {}), dropout=point["dropout"], use_text=use_text
    )
    model = build_for_data(config, data, spec)
    sequences = load_sequences(data)  # once for both splits
    result = fit(
        model,
        load_split(data, "train", spec, sequences),
        load_split(data, "val", spec, sequences),
        spec,
        TrainConfig(seed=0, lr=point["lr"], **TRAIN),
        log=lambda m: None,
    )
    val = result.best_val["overall"]
    print(f"[{protocol} {family} text={use_text}] val AUC {val['auc']:.4f}", flush=True)
    return {
        "protocol": protocol,
        "model": family,
        "use_text": use_text,
        "point": point,
        "val_auc": val["auc"],
        "val_gauc": val["gauc"],
        "best_epoch": result.best_epoch,
        "train_s": result.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--models", nargs="+", default=["msit", "msit_no_transfer", "star"])
    parser.add_argument("--jobs", type=int, default=2, help="trainings in parallel, one process each")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "text_features.json"))
    args = parser.parse_args()
    provenance = stamp("cpu")
    chosen = json.loads((ROOT / "benchmarks" / "results" / "quality.json").read_text())
    tasks = [
        (p, f, chosen[p][f]["chosen"], text, str(with_text(p)))
        for p in args.protocols
        for f in args.models
        for text in (False, True)
    ]
    import ray

    ray.shutdown()  # the trainings need no Ray (a no-op if the embeddings were cached): give its CPUs back
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = list(pool.map(run, *zip(*tasks, strict=True)))
    by = {(r["protocol"], r["model"], r["use_text"]): r["val_auc"] for r in runs}
    gains = {f"{p}/{f}": by[p, f, True] - by[p, f, False] for p in args.protocols for f in args.models}
    Path(args.out).write_text(json.dumps({**provenance, "seed": 0, "gain_from_text": gains, "runs": runs}, indent=1))
    for key, gain in gains.items():
        print(f"{key:28s} val AUC {gain:+.4f} with text")


if __name__ == "__main__":
    main()
