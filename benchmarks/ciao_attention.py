"""What MSIT's transfer attention shows on Ciao: the mean attention per (target, source) scene on the test split, of
MSIT at the point quality.py chose for Ciao (seed 0), held against what the data itself says of its scenes.

- own_scene_weight: the mean weight a row puts on its own scene (per scene, and the mean over scenes; uniform
  attention would give 1/28);
- relatedness, measured on the training split only: for scenes t and s, the Pearson correlation, over the users
  with at least MIN_EVENTS training events in both, of their positive rates in t and in s (pairs with fewer than
  MIN_USERS such users are not measured). `spearman_vs_relatedness`: the rank correlation of the off-diagonal
  attention with it, pooled over measured pairs and per target scene (mean over scenes with >= 5 measured pairs);
- `spearman_vs_source_size`: the same against each source scene's share of the training events, i.e. whether the
  attention just follows where the history is.

Writes benchmarks/results/ciao_attention.json and ciao_attention.png (the heat map, drawn as `msit report` draws it).

    python benchmarks/ciao_attention.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from provenance import stamp
from quality import ROOT, _data, chosen_point, model_config, train_config

from msit.data.schema import scene_slots
from msit.evaluation.relatedness import rank_agreement, spearman
from msit.evaluation.report import plot_attention, run_model
from msit.model import build_model
from msit.training.trainer import fit, seed_everything

PROTOCOL = "ciao"
MIN_EVENTS = 3
MIN_USERS = 30
RESULTS = ROOT / "benchmarks" / "results"


def measured_relatedness(users: np.ndarray, slots: np.ndarray, labels: np.ndarray, n_scenes: int) -> tuple:
    """(S, S) correlation across users of their positive rates in two scenes (NaN where not measured), and the
    number of users behind each cell."""
    frame = pd.DataFrame({"user": users, "scene": slots, "label": labels})
    per = frame.groupby(["user", "scene"])["label"].agg(["size", "mean"])
    rates = per["mean"].where(per["size"] >= MIN_EVENTS).unstack("scene").reindex(columns=range(n_scenes))
    present = rates.notna().to_numpy().astype(float)
    both = present.T @ present  # users with enough events in both scenes
    corr = rates.corr(min_periods=MIN_USERS).to_numpy()
    return np.where(both >= MIN_USERS, corr, np.nan), both


def finite(values: np.ndarray) -> list:
    """For JSON: NaN (not measured, or a scene without test rows) as null."""
    return np.where(np.isnan(values), None, values).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"), help="prepared data")
    parser.add_argument("--out", default=str(RESULTS / "ciao_attention.json"))
    args = parser.parse_args()
    provenance = stamp("cpu")
    torch.set_num_threads(args.threads)
    point = chosen_point(json.loads((RESULTS / "quality_runs.json").read_text())["runs"], PROTOCOL, "msit")
    if point is None:
        parser.error("quality_runs.json has no finished Ciao search for msit: run quality.py --protocols ciao first")
    spec, splits, table = _data(args.cache, PROTOCOL)
    seed_everything(args.seed)
    model = build_model(model_config("msit", point, protocol=PROTOCOL), spec, table)
    result = fit(model, splits["train"], splits["val"], spec, train_config(point, args.seed))
    _, attention = run_model(model, splits["test"], len(spec.scenarios))
    assert attention is not None  # MSIT has transfer attention
    names, n = list(spec.scenarios), len(spec.scenarios)  # slot order

    train = splits["train"].events
    train_slots = scene_slots(train["scene_id"], n).numpy()
    related, users_both = measured_relatedness(train["user_id"].numpy(), train_slots, train["label"].numpy(), n)
    size = np.bincount(train_slots, minlength=n + 1)[:n] / len(train_slots)

    off = ~np.eye(n, dtype=bool) & ~np.isnan(attention)
    agreement = rank_agreement(attention, related, min_row_pairs=5)
    own = np.diag(attention)
    report = {
        "point": point,
        "seed": args.seed,
        "val_auc": result.best_val["overall"]["auc"],
        "best_epoch": result.best_epoch,
        "scenes": names,
        "own_scene_weight": {
            "mean": float(np.nanmean(own)),
            "uniform": 1 / n,
            **dict(zip(names, finite(own), strict=True)),
        },
        "spearman_vs_relatedness": {
            "pooled": agreement["pooled"],
            "per_target_mean": agreement["per_target_mean"],
            "targets": sum(v is not None for v in agreement["per_target"]),
            "pairs": agreement["pairs"],
            "min_events": MIN_EVENTS,
            "min_users": MIN_USERS,
        },
        "spearman_vs_source_size": spearman(attention[off], np.broadcast_to(size, (n, n))[off]),
        "source_share_of_training_events": dict(zip(names, size.tolist(), strict=True)),
        "attention": {"target_scenes": names, "source_scenes": names, "matrix": finite(attention)},
        "relatedness": {"matrix": finite(related), "users": users_both.tolist()},
        **provenance,
    }
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1))
    plot_attention(attention, names, "MSIT transfer attention on Ciao (test rows)", out.with_suffix(".png"))
    print(
        json.dumps(
            {k: report[k] for k in ("own_scene_weight", "spearman_vs_relatedness", "spearman_vs_source_size")}, indent=1
        )
    )


if __name__ == "__main__":
    main()
