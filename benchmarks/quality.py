"""Model quality on the multi-scenario protocols (MovieLens-100K genre and age, Ciao): MSIT against its baselines.

Every family gets the same small search over training settings (SEARCH: learning rate x dropout), each
point trained on split == train with seed 0 and scored on val; the point with the best val AUC is then
trained with the other seeds. Epochs are chosen by early stopping on val AUC. Test metrics (AUC / log
loss / GAUC, overall and per scene) are recorded for every run but play no part in any choice.
Writes benchmarks/results/quality.json ({protocol: {model: summary of the chosen point}}) and
quality_runs.json (settings, every run with its per-epoch history) after every run, so an interrupted
benchmark resumes where it stopped: runs already recorded with the same settings are skipped (the
settings name the device, so a run on another device starts afresh). Each run records the commit it ran on;
the files' top-level stamp (benchmarks/provenance.py) is the run that last wrote them, and each summary lists
the commits of its runs.

Ciao (`--protocols ciao`, ../shared/data/ciao.csv: 28 product categories as scenes) is scored like the others,
plus `small_scene_auc_mean`: the AUC of the test rows of its 13 scenes with fewer than 4,000 training rows
(SMALL_SCENES), scored together. Its history window is 20 events: the median Ciao user has 18 events in all,
but test rows come mostly from heavy users (a test row has a median 67 earlier events; 19% have 20 or fewer),
so 20 is a choice for cost (MovieLens keeps 50). Every protocol's settings are recorded apart:
changing one protocol's settings sets aside that protocol's earlier runs only.

    python benchmarks/quality.py [--seeds 3] [--protocols genre age ciao] [--models msit star ...]
                                 [--device cpu|cuda] [--jobs N] [--threads T]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from provenance import stamp, stamp_of

from msit.data.feature_spec import FeatureSpec
from msit.data.prepared import load_sequences, load_split
from msit.evaluation.metrics import auc
from msit.model import FAMILIES, ModelConfig, build_model, load_item_table
from msit.training.trainer import TrainConfig, evaluate, fit, predict, seed_everything

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MSIT_SHARED_DATA", ROOT.parent / "shared" / "data"))  # as tests/conftest.py
PROTOCOLS = {"genre": "ml100k_genre.csv", "age": "ml100k_age.csv", "ciao": "ciao.csv"}
DEFAULT_PROTOCOLS = ("genre", "age")
# Ciao's scenes with fewer than 4,000 training rows (../shared/data/README.md): their test rows pooled give
# small_scene_auc; per-scene AUC of the smallest rests on a few dozen rows.
SMALL_SCENES = {
    "ciao": (
        "household_appliances",
        "health",
        "electronics",
        "cars",
        "finance",
        "software",
        "cameras",
        "education_careers",
        "sports_outdoors",
        "musical_instruments_equipment",
        "office_equipment",
        "fashion",
        "adult_products",
    )
}

# Fixed before looking at test results; every family shares the embedding width and training settings.
MODEL = dict(embed_dim=32, history_length=50)
# What differs from MODEL on a protocol. Ciao: a window of 20 (see above), and each scene's evidence counts
# (ModelConfig.scene_evidence: MSIT and its ablation alike; the baselines have no such part), chosen on val:
# results/ciao_ablation.json, written by ciao_ablation.py, has MSIT at its chosen point with and without them.
PROTOCOL_MODEL = {"ciao": dict(history_length=20, scene_evidence=True)}
# MSIT's architecture as Ray Tune chose it on genre's val split (benchmarks/tune_ml100k.py ->
# results/tune_ml100k_genre.json: 1 head, concat fusion); the ablation keeps the same architecture so
# that it differs from MSIT in the transfer alone. Test results played no part in the choice.
ARCHITECTURE = {
    family: dict(interest_heads=1, transfer_heads=1, fusion="concat") for family in ("msit", "msit_no_transfer")
}
TRAIN = dict(epochs=12, batch_size=1024, weight_decay=1e-4, patience=2)
# Searched for every family alike, on val with seed 0 (a point: {"lr": ..., "dropout": ...}).
SEARCH = {"lr": [1e-3, 2e-3, 4e-3], "dropout": [0.1, 0.25]}
SEARCH_SEED = 0
FAST_FAMILIES = ("shared_bottom", "mmoe")  # a few times quicker to train than the attention models and STAR


def search_points() -> list[dict]:
    return [dict(zip(SEARCH, values, strict=True)) for values in itertools.product(*SEARCH.values())]


def model_config(family: str, point: dict, overrides: dict | None = None, protocol: str = "genre") -> ModelConfig:
    """The family's config at a search point on a protocol; `overrides` (any ModelConfig fields) win over the rest."""
    return ModelConfig(
        **{
            **MODEL,
            **PROTOCOL_MODEL.get(protocol, {}),
            **ARCHITECTURE.get(family, {}),
            "dropout": point["dropout"],
            **(overrides or {}),
            "family": family,
        }
    )


def train_config(point: dict, seed: int) -> TrainConfig:
    return TrainConfig(seed=seed, lr=point["lr"], **TRAIN)


def as_record(config) -> dict:
    return json.loads(json.dumps(asdict(config)))  # as read back from quality_runs.json (tuples -> lists)


def prepared_dir(protocol: str, cache_dir: Path) -> Path:
    out = cache_dir / protocol
    if not (out / "feature_spec.json").is_file():
        from msit.data.prepare import PrepareConfig, prepare  # Ray Data: only needed the first time

        prepare(
            PrepareConfig(inputs=[str(SHARED / PROTOCOLS[protocol])], out=str(out), overwrite=True, num_cpus=2),
            log=print,
        )
    return out


def summarize(runs: list[dict], search: dict[str, float]) -> dict:
    aucs = [r["test"]["overall"]["auc"] for r in runs]
    scenes = runs[0]["test"]["scenes"].keys()
    small = (
        {"small_scene_auc_mean": float(np.mean([r["small_scene_auc"] for r in runs]))}
        if "small_scene_auc" in runs[0]
        else {}
    )
    return {
        "overall_auc_mean": float(np.mean(aucs)),
        "overall_auc_std": float(np.std(aucs)),
        "overall_logloss_mean": float(np.mean([r["test"]["overall"]["logloss"] for r in runs])),
        "gauc_mean": float(np.mean([r["test"]["overall"]["gauc"] for r in runs])),
        **small,
        "seeds": [r["seed"] for r in runs],
        "scenarios": {
            s: {
                "auc_mean": float(np.mean([r["test"]["scenes"][s]["auc"] for r in runs])),
                "logloss_mean": float(np.mean([r["test"]["scenes"][s]["logloss"] for r in runs])),
            }
            for s in scenes
        },
        "train_s": float(np.mean([r["train_s"] for r in runs])),
        "best_epochs": [r["best_epoch"] for r in runs],
        "val_auc_mean": float(np.mean([r["val_auc"] for r in runs])),
        "chosen": runs[0]["point"],
        "search_val_auc": search,
    }


def point_key(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


def chosen_point(runs: list[dict], protocol: str, family: str) -> dict | None:
    """The search point with the best val AUC at the search seed, once every point has been run."""
    searched = {
        point_key(r["point"]): r
        for r in runs
        if (r["protocol"], r["model"], r["seed"]) == (protocol, family, SEARCH_SEED)
    }
    if len(searched) < len(search_points()):
        return None
    return max(searched.values(), key=lambda r: r["val_auc"])["point"]


def protocol_settings(protocol: str, common: dict) -> dict:
    return {"model": {**MODEL, **PROTOCOL_MODEL.get(protocol, {})}, **common}


def reconcile_settings(report: dict, protocols: list[str], common: dict) -> None:
    """Record each of `protocols`' settings in `report`, setting aside (with a message) the earlier runs of a
    protocol whose settings changed; other protocols' runs stay as they are."""
    # A file from before settings were kept per protocol holds MovieLens runs under one "settings".
    by_protocol = report.pop("settings_by_protocol", None) or {
        p: report["settings"] for p in DEFAULT_PROTOCOLS if "settings" in report
    }
    report.pop("settings", None)
    for protocol in protocols:
        settings = protocol_settings(protocol, common)
        if by_protocol.get(protocol) != settings:
            stale = [r for r in report["runs"] if r["protocol"] == protocol]
            if stale:
                print(f"{protocol}: the settings changed, so its {len(stale)} earlier runs are set aside (kept in git)")
            report["runs"] = [r for r in report["runs"] if r["protocol"] != protocol]
            by_protocol[protocol] = settings
    report["settings_by_protocol"] = by_protocol


def write_reports(report: dict, out: Path, runs_path: Path) -> None:
    """quality.json: {protocol: {model: summary at its chosen point}}, settings, stamp; quality_runs.json: settings,
    stamp and every run."""
    summary: dict[str, dict] = {}
    for protocol, family in sorted({(r["protocol"], r["model"]) for r in report["runs"]}):
        point = chosen_point(report["runs"], protocol, family)
        if point is None:
            continue
        ours = [r for r in report["runs"] if (r["protocol"], r["model"]) == (protocol, family)]
        search = {point_key(r["point"]): r["val_auc"] for r in ours if r["seed"] == SEARCH_SEED}
        summary.setdefault(protocol, {})[family] = {
            **summarize(sorted((r for r in ours if r["point"] == point), key=lambda r: r["seed"]), search),
            "commits": sorted({r.get("commit", "not recorded") for r in ours}),
        }
    summary["settings_by_protocol"] = report["settings_by_protocol"]
    summary |= stamp_of(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    runs_path.write_text(json.dumps(report, indent=1))


def markdown_table(report: dict, protocols: list[str]) -> str:
    lines = []
    for protocol in protocols:
        results = report.get(protocol, {})
        if not results:
            continue
        # Ciao's 28 scenes would not fit a table: its small scenes pooled instead (per scene in quality.json)
        scenes = [] if protocol in SMALL_SCENES else list(next(iter(results.values()))["scenarios"])
        small = ["AUC small scenes"] if protocol in SMALL_SCENES else []
        header = [
            "model",
            "AUC",
            "log loss",
            "GAUC",
            *small,
            *(f"AUC {s}" for s in scenes),
            "val AUC",
            "lr, dropout",
            "seeds",
            "train s",
        ]
        lines += [
            f"**{protocol}** (test, mean ± std over seeds)",
            "",
            "| " + " | ".join(header) + " |",
            "|---" * len(header) + "|",
        ]
        for family, r in sorted(results.items(), key=lambda kv: -kv[1]["overall_auc_mean"]):
            per_scene = [f"{r['small_scene_auc_mean']:.4f}"] if small else []
            per_scene += [f"{r['scenarios'][s]['auc_mean']:.4f}" for s in scenes]
            lines.append(
                f"| {family} | {r['overall_auc_mean']:.4f} ± {r['overall_auc_std']:.4f} | "
                f"{r['overall_logloss_mean']:.4f} | {r['gauc_mean']:.4f} | {' | '.join(per_scene)} | "
                f"{r['val_auc_mean']:.4f} | {r['chosen']['lr']:g}, {r['chosen']['dropout']:g} | "
                f"{len(r['seeds'])} | {r['train_s']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


@lru_cache(maxsize=3)  # a worker's runs use one prepared log at a time, and at most three
def load_prepared(data: str) -> tuple:
    """A prepared directory's spec, its three splits (sharing one copy of the sequences) and its item table."""
    spec = FeatureSpec.load(data)
    sequences = load_sequences(data)
    return (
        spec,
        {s: load_split(data, s, spec, sequences) for s in ("train", "val", "test")},
        load_item_table(data, spec),
    )


def _data(cache_dir: str, protocol: str) -> tuple:
    return load_prepared(str(prepared_dir(protocol, Path(cache_dir))))


def run_config(
    config: ModelConfig, train: TrainConfig, prepared: Path, device: str, threads: int, tag: str = ""
) -> dict:
    """Train one model config with `trainer.fit` (single process) and score it on val and test."""
    torch.set_num_threads(threads)
    spec, splits, table = _data(str(prepared.parent), prepared.name)
    seed_everything(train.seed)
    model = build_model(config, spec, table).to(device)
    result = fit(model, splits["train"], splits["val"], spec, train, log=lambda m: print(f"{tag} {m}", flush=True))
    test = evaluate(model, splits["test"], spec)
    small = {}
    if prepared.name in SMALL_SCENES:  # the small scenes' test rows scored together
        events, probs = splits["test"].events, predict(model, splits["test"])
        rows = np.isin(events["scene_id"].numpy(), spec.scene_ids(list(SMALL_SCENES[prepared.name])))
        small = {
            "small_scene_auc": auc(events["label"].numpy()[rows], probs[rows]),
            "small_scene_rows": int(rows.sum()),
        }
    print(
        f"{tag} val AUC {result.best_val['overall']['auc']:.4f}, test AUC {test['overall']['auc']:.4f}"
        + (f", small scenes {small['small_scene_auc']:.4f}" if small else "")
        + f" ({result.seconds:.0f} s)",
        flush=True,
    )
    return {
        "test": test,
        **small,
        "val_auc": result.best_val["overall"]["auc"],
        "val_gauc": result.best_val["overall"]["gauc"],
        "best_epoch": result.best_epoch,
        "train_s": result.seconds,
        "history": result.history,
    }


def run_one(
    protocol: str,
    family: str,
    seed: int,
    point: dict,
    cache_dir: str,
    device: str,
    threads: int,
    overrides: dict | None = None,
) -> dict:
    """Train one (protocol, family, seed, search point) and score it on val and test: one worker's task."""
    config = model_config(family, point, overrides, protocol)
    prepared = prepared_dir(protocol, Path(cache_dir))
    tag = f"[{protocol} {family} seed {seed} {point_key(point)}]"
    run = run_config(config, train_config(point, seed), prepared, device, threads, tag)
    return {"protocol": protocol, "model": family, "seed": seed, "point": point, "config": as_record(config), **run}


def run_all(tasks: list[tuple], report: dict, args, write) -> None:
    """Run (protocol, family, seed, point) tasks in `args.jobs` processes, recording each as it finishes, with the
    commit of this run (report's stamp: an earlier run's records keep theirs)."""
    if not tasks:
        return
    tasks = sorted(tasks, key=lambda t: t[1] in FAST_FAMILIES)  # the long runs first, so that none ends alone
    print(f"{len(tasks)} runs on {args.device}, {args.jobs} at a time", flush=True)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = [pool.submit(run_one, *task, args.cache, args.device, args.threads) for task in tasks]
        for future in as_completed(futures):
            report["runs"].append({**future.result(), "commit": report["commit"], "tree_clean": report["tree_clean"]})
            write()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--protocols", nargs="+", default=list(DEFAULT_PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"), help="prepared data")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--table", action="store_true", help="print the results as a markdown table and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text()), args.protocols))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU on this machine")
    if args.jobs < 1 or args.seeds < 1:
        parser.error("--jobs and --seeds must be at least 1")
    provenance = stamp(args.device)
    for protocol in args.protocols:  # once, here, rather than in every worker
        prepared_dir(protocol, Path(args.cache))

    out = Path(args.out)
    runs_path = out.with_name("quality_runs.json")  # every run in full: settings, per-epoch history, test metrics
    report = json.loads(runs_path.read_text()) if runs_path.is_file() else {"runs": []}
    common = {
        "architecture": ARCHITECTURE,
        "train": TRAIN,
        "search": SEARCH,
        "search_seed": SEARCH_SEED,
        "device": provenance["device"],
        "threads": args.threads if args.device == "cpu" else None,
        "torch": torch.__version__,
    }
    reconcile_settings(report, args.protocols, common)
    report |= provenance
    done = {(r["protocol"], r["model"], r["seed"], point_key(r["point"])) for r in report["runs"]}

    def write() -> None:
        write_reports(report, out, runs_path)

    def todo(tasks: list[tuple]) -> list[tuple]:
        return [t for t in tasks if (t[0], t[1], t[2], point_key(t[3])) not in done]

    write()
    started = time.perf_counter()
    # 1. The search: every point at the search seed, scored on val.
    run_all(
        todo([(p, f, SEARCH_SEED, point) for p in args.protocols for f in args.models for point in search_points()]),
        report,
        args,
        write,
    )
    # 2. The chosen point with the other seeds.
    run_all(
        todo(
            [
                (p, f, seed, chosen_point(report["runs"], p, f))
                for p in args.protocols
                for f in args.models
                for seed in range(args.seeds)
                if seed != SEARCH_SEED
            ]
        ),
        report,
        args,
        write,
    )
    print(f"done in {time.perf_counter() - started:.0f} s on {common['device']} ({os.cpu_count()} cores)")
    print(markdown_table(json.loads(out.read_text()), args.protocols))


if __name__ == "__main__":
    main()
