"""Interest transfer where it matters: sparse scenes and a new scene, on MovieLens-100K (genre protocol) and Ciao.

Sparse: for each scene in turn, keep a seeded fraction f of that scene's training rows (the other
scenes whole, val/test untouched) and prepare the log again, so histories lose the dropped events
too. Train MSIT, MSIT without transfer, STAR and Shared-Bottom on it (single process, early stopping
on val) and report that scene's test AUC, mean over seeds. f = 1.0 is the whole log, shared by the scenes.

New scene: train MSIT on the log without one scene at all. Then prepare the sparse log of that scene
(f = 0.1) with the model's encoding extended, and on Ray Train (1 worker) compare, on exactly the
same rows (that scene's 10% of training rows; histories hold every scene):
    finetune  `msit finetune --mode scene` from the model: only the new scene's rows and the new
              items' rows train
    scratch   the same model family trained from random weights
Both select their epoch on the scene's val rows and report its test AUC.

Protocols (PROTOCOLS): `ml100k_genre` (../shared/data/ml100k_genre.csv, drama, light and thrill, every family at
one short setting fixed before any result was seen) and `ciao` (../shared/data/ciao.csv, its three largest
product categories dvds, beauty and travel, each family at the point quality.py chose for it on Ciao's val).

Writes benchmarks/results/transfer.json ({protocol: summary}), transfer_runs.json (every run, per protocol; an
interrupted benchmark resumes, skipping runs recorded with the same settings) and transfer_<protocol>.png. Each
run records the commit it ran on; the files' top-level stamp (benchmarks/provenance.py) is the run that last
wrote them, and each summary lists the commits of the runs it summarizes (`run_commits`).

    python benchmarks/transfer.py [--protocols ml100k_genre ciao] [--seeds 3] [--scenes dvds beauty]
                                  [--jobs 2 --threads 1] [--skip-new-scene] [--table]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import quality
import torch
from provenance import stamp, stamp_of

from msit.data.feature_spec import LAYOUT_VERSION, FeatureSpec
from msit.data.prepare import PrepareConfig, prepare
from msit.data.prepared import load_split
from msit.model import ModelConfig, build_model
from msit.model.model_dir import load_model_dir, save_model_dir
from msit.ray_env import init_ray
from msit.training.finetune import FinetuneSpec
from msit.training.ray_train import RunSpec, ScalingSpec, TrainRunConfig, run_training
from msit.training.trainer import TrainConfig, evaluate, fit, seed_everything

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MSIT_SHARED_DATA", ROOT.parent / "shared" / "data"))  # as tests/conftest.py
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("msit", "msit_no_transfer", "star", "shared_bottom")
NEW_SCENE_FRACTION = 0.1
FINETUNE_TRAIN = dict(epochs=10, batch_size=256, lr=2e-3, weight_decay=1e-4, patience=2)  # few rows: more epochs


@dataclass(frozen=True)
class Protocol:
    log: str  # under ../shared/data
    scenes: tuple[str, ...]
    fractions: tuple[float, ...]
    models: dict[str, dict]  # family -> ModelConfig fields (besides the family)
    train: dict[str, dict]  # family -> TrainConfig fields (besides the seed)

    def model_config(self, family: str) -> ModelConfig:
        return ModelConfig(family=family, **self.models[family])

    def train_config(self, family: str, seed: int) -> TrainConfig:
        return TrainConfig(seed=seed, **self.train[family])


# MovieLens: fixed before any result was seen, and short enough for a 2-core box (120 sparse runs).
ML_MODEL = dict(embed_dim=32, dropout=0.1, history_length=20)
ML_TRAIN = dict(epochs=3, batch_size=1024, lr=2e-3, weight_decay=1e-4, patience=1)
# Ciao: each family at the point quality.py chose on Ciao's val (results/quality.json, `chosen`, commit 245f629),
# with its window, scene evidence and MSIT's architecture. Every family there peaked at epoch 1, so 3 epochs
# with patience 1 (as on MovieLens) lose nothing and halve the cost.
CIAO_POINTS = {
    "msit": {"lr": 2e-3, "dropout": 0.25},
    "msit_no_transfer": {"lr": 4e-3, "dropout": 0.25},
    "star": {"lr": 2e-3, "dropout": 0.25},
    "shared_bottom": {"lr": 4e-3, "dropout": 0.25},
}
CIAO_TRAIN = dict(epochs=3, batch_size=1024, weight_decay=1e-4, patience=1)


def _ciao_model(family: str) -> dict:
    fields = asdict(quality.model_config(family, CIAO_POINTS[family], protocol="ciao"))
    fields.pop("family")
    return fields


PROTOCOLS = {
    "ml100k_genre": Protocol(
        log="ml100k_genre.csv",
        scenes=("drama", "light", "thrill"),
        fractions=(0.05, 0.1, 0.25, 1.0),
        models=dict.fromkeys(MODELS, ML_MODEL),
        train=dict.fromkeys(MODELS, ML_TRAIN),
    ),
    "ciao": Protocol(
        log="ciao.csv",
        scenes=("dvds", "beauty", "travel"),  # its largest product categories (ciao_cafe, 2nd, is the site's own)
        fractions=(0.05, 0.1, 1.0),
        models={family: _ciao_model(family) for family in MODELS},
        train={family: {"lr": CIAO_POINTS[family]["lr"], **CIAO_TRAIN} for family in MODELS},
    ),
}


def settings_of(name: str, threads: int) -> dict:
    """What a protocol's recorded runs depend on: runs recorded under other settings are not reused."""
    protocol = PROTOCOLS[name]
    common = {
        "finetune_train": FINETUNE_TRAIN,
        "threads": threads,
        "new_scene_fraction": NEW_SCENE_FRACTION,
        "subsample_seed": 0,
    }
    if name == "ml100k_genre":  # one setting for every family, recorded as before Ciao was added
        return {"model": ML_MODEL, "train": ML_TRAIN, **common}
    as_recorded = json.loads(json.dumps({"model": protocol.models, "train": protocol.train}))  # tuples -> lists
    return {**as_recorded, **common}


def sparse_log(events: pd.DataFrame, scene: str, fraction: float, seed: int = 0) -> pd.DataFrame:
    """`events` with only a seeded `fraction` of `scene`'s training rows, in the original row order."""
    if fraction >= 1.0:
        return events
    rows = events[(events["scenario"] == scene) & (events["split"] == "train")]
    dropped = rows.index.difference(rows.sample(frac=fraction, random_state=seed).index)
    return events.drop(index=dropped)


def prepared(name: str, frame: pd.DataFrame, cache: Path, encoding_from: Path | None = None) -> Path:
    """`frame` written as a scene log and prepared (cached by name)."""
    out = cache / name
    spec = out / "feature_spec.json"
    if spec.is_file() and json.loads(spec.read_text()).get("layout") == LAYOUT_VERSION:  # else: an older msit
        return out
    log = cache / "logs" / f"{name}.csv"
    log.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(log, index=False)
    prepare(
        PrepareConfig(
            inputs=[str(log)],
            out=str(out),
            overwrite=True,
            encoding_from=str(encoding_from) if encoding_from else None,
            extend_vocab=encoding_from is not None,
        ),
        log=lambda m: print(f"  [{name}] {m}", flush=True),
    )
    return out


def train_single(protocol: str, data: Path, family: str, seed: int, tag: str) -> tuple[torch.nn.Module, dict]:
    """Train one family on a prepared log (single process); the model at its best epoch and its run info."""
    spec, splits, table = quality.load_prepared(str(data))
    seed_everything(seed)
    model = build_model(PROTOCOLS[protocol].model_config(family), spec, table)
    config = PROTOCOLS[protocol].train_config(family, seed)
    result = fit(model, splits["train"], splits["val"], spec, config, log=lambda m: print(f"[{tag}] {m}", flush=True))
    return model, {"train_s": result.seconds, "best_epoch": result.best_epoch}


def sparse_run(protocol: str, data: str, scene: str, fraction: float, family: str, seed: int, threads: int) -> dict:
    """One sparse-scene run, scored on the test split: a worker's task."""
    torch.set_num_threads(threads)
    tag = f"{protocol} {scene} f={fraction} {family} seed {seed}"
    model, info = train_single(protocol, Path(data), family, seed, tag)
    spec, splits, _ = quality.load_prepared(data)
    test = evaluate(model, splits["test"], spec)
    shown = test["overall"] if scene == "all" else test["scenes"][scene]
    print(f"[{tag}] test AUC of {scene}: {shown['auc']:.4f}", flush=True)
    return {"scene": scene, "fraction": fraction, "model": family, "seed": seed, "test": test, **info}


def train_on_ray(protocol: str, data: Path, out: Path, scene: str, seed: int, finetune: FinetuneSpec | None) -> dict:
    """One Ray Train run of MSIT on `scene`'s rows (1 worker); the test AUC of that scene and the wall time."""
    cfg = TrainRunConfig(
        data=str(data),
        output=str(out),
        model=PROTOCOLS[protocol].model_config("msit"),
        train=TrainConfig(seed=seed, **FINETUNE_TRAIN),
        scaling=ScalingSpec(num_workers=1, use_gpu=False, torch_threads=2),
        run=RunSpec(name=out.name, storage_path=str(out.parent / "ray_results")),
        scenes=[scene],
        finetune=finetune,
    )
    start = time.perf_counter()
    run_training(cfg, log=lambda m: print(f"[{out.name}] {m}", flush=True))
    seconds = time.perf_counter() - start
    loaded = load_model_dir(out)
    test = evaluate(loaded.model, load_split(data, "test", loaded.spec), loaded.spec)
    return {"auc": test["scenes"][scene]["auc"], "seconds": seconds, "best_epoch": loaded.info["train"]["best_epoch"]}


def summarize(runs: dict, scenes: tuple[str, ...]) -> dict:
    """One protocol's runs as {sparse: scene -> fraction -> family -> mean test AUC of the scene, transfer_gain:
    fraction -> mean over scenes of msit − msit_no_transfer, new_scene: scene -> finetune/scratch AUC and s}."""
    sparse: dict = {}
    for r in runs["sparse"]:
        for scene in scenes if r["fraction"] == 1.0 else [r["scene"]]:
            sparse.setdefault(scene, {}).setdefault(json.dumps(r["fraction"]), {}).setdefault(r["model"], []).append(
                r["test"]["scenes"][scene]["auc"]
            )
    sparse = {
        s: {f: {m: float(np.mean(v)) for m, v in models.items()} for f, models in fr.items()}
        for s, fr in sparse.items()
    }
    gains: dict = {}
    for by_fraction in sparse.values():
        for fraction, models in by_fraction.items():
            if {"msit", "msit_no_transfer"} <= set(models):
                gains.setdefault(fraction, []).append(models["msit"] - models["msit_no_transfer"])
    new_scene: dict = {}
    for r in runs["new_scene"]:
        new_scene.setdefault(r["scene"], {}).setdefault(r["how"], []).append(r)
    new_scene = {
        s: {
            f"{how}_{key}": float(np.mean([r[field] for r in group]))
            for how, group in hows.items()
            for key, field in (("auc", "auc"), ("s", "seconds"))
        }
        | {"seeds": sorted({r["seed"] for group in hows.values() for r in group})}
        for s, hows in new_scene.items()
    }
    return {
        "sparse": sparse,
        "transfer_gain": {f: {"mean": float(np.mean(g)), "scenes": len(g)} for f, g in sorted(gains.items())},
        "new_scene": new_scene,
        "settings": runs["settings"],
        "run_commits": sorted({r.get("commit", "not recorded") for r in [*runs["sparse"], *runs["new_scene"]]}),
    }


def load_runs(path: Path) -> dict:
    """transfer_runs.json as {protocol: {settings, sparse, new_scene}} plus its stamp. A file from before Ciao was
    added holds MovieLens's runs at the top level: they are kept, under ml100k_genre."""
    report = json.loads(path.read_text()) if path.is_file() else {}
    if "sparse" in report:
        report = {**stamp_of(report), "ml100k_genre": {k: report[k] for k in ("settings", "sparse", "new_scene")}}
    return report


def reconcile(report: dict, protocol: str, settings: dict) -> dict:
    """The protocol's recorded runs, set aside (with a message) if they were recorded under other settings."""
    runs = report.get(protocol)
    if runs is None or runs["settings"] != settings:
        if runs and (runs["sparse"] or runs["new_scene"]):
            n = len(runs["sparse"]) + len(runs["new_scene"])
            print(f"{protocol}: the settings changed, so its {n} earlier runs are set aside (kept in git)", flush=True)
        report[protocol] = runs = {"settings": settings, "sparse": [], "new_scene": []}
    return runs


def plot(name: str, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = [s for s in PROTOCOLS[name].scenes if s in summary["sparse"]]
    fig, axes = plt.subplots(1, len(scenes) + 1, figsize=(4.2 * (len(scenes) + 1), 3.8), squeeze=False)
    for ax, scene in zip(axes[0], scenes, strict=False):
        by_fraction = summary["sparse"][scene]
        fractions = sorted(by_fraction, key=float)
        for model in MODELS:
            points = [(float(f), by_fraction[f][model]) for f in fractions if model in by_fraction[f]]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=model, linewidth=2.5 if model == "msit" else 1.2)
        ax.set(
            xscale="log",
            title=f"{name} {scene}: sparse scene",
            xlabel="fraction of its training rows kept",
            ylabel="test AUC of the scene",
        )
        ax.grid(alpha=0.3)
    if scenes:  # else no sparse runs yet: nothing to label
        axes[0][0].legend(fontsize=8)
    ax = axes[0][-1]
    new = summary["new_scene"]
    names = [s for s in PROTOCOLS[name].scenes if s in new and {"finetune_auc", "scratch_auc"} <= set(new[s])]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [new[s]["finetune_auc"] for s in names], 0.4, label="finetune (scene mode)")
    ax.bar(x + 0.2, [new[s]["scratch_auc"] for s in names], 0.4, label="from scratch")
    ax.set(
        xticks=x,
        xticklabels=names,
        ylim=(0.5, None),
        title=f"new scene, {NEW_SCENE_FRACTION:.0%} of its rows",
        ylabel="test AUC of the scene",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_tables(name: str, summary: dict) -> str:
    lines = [f"{name}:", "", "| scene | f | " + " | ".join(MODELS) + " | msit − no transfer |"]
    lines.append("|---" * (len(MODELS) + 3) + "|")
    for scene in PROTOCOLS[name].scenes:
        for fraction, models in sorted(summary["sparse"].get(scene, {}).items(), key=lambda kv: float(kv[0])):
            cells = " | ".join(f"{models[m]:.4f}" if m in models else "" for m in MODELS)
            gap = models["msit"] - models["msit_no_transfer"] if {"msit", "msit_no_transfer"} <= set(models) else None
            lines.append(f"| {scene} | {fraction} | {cells} | {'' if gap is None else f'{gap:+.4f}'} |")
    lines += ["", "| f | msit − no transfer, mean over scenes |", "|---|---|"]
    lines += [f"| {f} | {g['mean']:+.4f} ({g['scenes']} scenes) |" for f, g in summary["transfer_gain"].items()]
    lines += ["", "| new scene | finetune AUC | scratch AUC | finetune s | scratch s |", "|---|---|---|---|---|"]
    for scene, r in summary["new_scene"].items():
        if {"finetune_auc", "scratch_auc"} <= set(r):
            lines.append(
                f"| {scene} | {r['finetune_auc']:.4f} | {r['scratch_auc']:.4f} | {r['finetune_s']:.0f} | "
                f"{r['scratch_s']:.0f} |"
            )
    return "\n".join(lines)


def run_sparse(name: str, runs: dict, args, cache: Path, events: pd.DataFrame, run_commit: dict, save) -> None:
    """Every sparse case of a protocol not yet recorded, `args.jobs` at a time (prepared first, in this process)."""
    protocol = PROTOCOLS[name]
    done = {(r["scene"], r["fraction"], r["model"], r["seed"]) for r in runs["sparse"]}
    fractions = [f for f in args.fractions if f in protocol.fractions]
    cases = [("all", 1.0)] if 1.0 in fractions else []
    cases += [(s, f) for s in protocol.scenes if s in args.scenes for f in fractions if f < 1.0]
    tasks = []
    for scene, fraction in cases:
        todo = [(m, seed) for m in args.models for seed in range(args.seeds) if (scene, fraction, m, seed) not in done]
        if todo:
            data = prepared(f"{scene}_{fraction}", sparse_log(events, scene, fraction), cache)
            tasks += [(name, str(data), scene, fraction, m, seed, args.threads) for m, seed in todo]
    if not tasks:
        return
    # Seed by seed, so that a stopped run leaves whole seeds; within one, the long runs first.
    tasks.sort(key=lambda t: (t[5], t[4] not in ("msit", "msit_no_transfer")))
    print(f"{name}: {len(tasks)} sparse runs, {args.jobs} at a time", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(sparse_run, *task) for task in tasks]):
            runs["sparse"].append({**future.result(), **run_commit})
            save()


def run_new_scenes(name: str, runs: dict, args, cache: Path, events: pd.DataFrame, run_commit: dict, save) -> None:
    """Every new-scene run of a protocol not yet recorded: each scene's model without it first (trained once,
    cached), then seed by seed, so that a stopped run leaves whole seeds."""
    done = {(r["scene"], r["how"], r["seed"]) for r in runs["new_scene"]}
    scenes = [s for s in PROTOCOLS[name].scenes if s in args.scenes]
    todo = [
        (seed, scene, how)
        for seed in range(args.seeds)
        for scene in scenes
        for how in ("finetune", "scratch")
        if (scene, how, seed) not in done
    ]
    ready: dict[str, tuple[Path, Path]] = {}  # scene -> (the model without it, its sparse log's prepared data)
    for scene in [s for s in scenes if any(t[1] == s for t in todo)]:
        base = cache / f"without_{scene}_model"
        if not (base / "model.safetensors").is_file():
            without = prepared(f"without_{scene}", events[events["scenario"] != scene], cache)
            torch.set_num_threads(max(args.threads, 2))
            model, info = train_single(name, without, "msit", 0, f"{name} without {scene}")
            config = PROTOCOLS[name].model_config("msit")
            save_model_dir(base, model, config, FeatureSpec.load(without), {"train": info})
        ready[scene] = (
            base,
            prepared(f"new_{scene}", sparse_log(events, scene, NEW_SCENE_FRACTION), cache, encoding_from=base),
        )
    for seed, scene, how in todo:
        base, data = ready[scene]
        spec = FinetuneSpec(str(base), "scene") if how == "finetune" else None
        result = train_on_ray(name, data, cache / "runs" / f"new_{scene}_{how}_{seed}", scene, seed, spec)
        print(f"[{name} new scene {scene} {how} seed {seed}] test AUC {result['auc']:.4f}", flush=True)
        runs["new_scene"].append({"scene": scene, "how": how, "seed": seed, **result, **run_commit})
        save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    every_scene = [s for p in PROTOCOLS.values() for s in p.scenes]
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scenes", nargs="+", default=every_scene, choices=every_scene)
    parser.add_argument(
        "--fractions", nargs="+", type=float, default=sorted({f for p in PROTOCOLS.values() for f in p.fractions})
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--skip-sparse", action="store_true")
    parser.add_argument("--skip-new-scene", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="sparse runs in parallel, one process each (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per sparse run")
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache" / "transfer"))
    parser.add_argument("--out", default=str(RESULTS / "transfer.json"))
    parser.add_argument("--table", action="store_true", help="print the results as markdown tables and exit")
    args = parser.parse_args()
    if args.jobs < 1 or args.seeds < 1:
        parser.error("--jobs and --seeds must be at least 1")
    out = Path(args.out)
    if args.table:
        summaries = json.loads(out.read_text())
        print("\n\n".join(markdown_tables(p, summaries[p]) for p in PROTOCOLS if p in summaries))
        return
    provenance = stamp("cpu")
    runs_path = out.with_name("transfer_runs.json")
    report = load_runs(runs_path)
    for name in args.protocols:
        reconcile(report, name, settings_of(name, args.threads))
    report |= provenance
    run_commit = {"commit": provenance["commit"], "tree_clean": provenance["tree_clean"]}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        runs_path.write_text(json.dumps(report, indent=1))
        summaries = {p: summarize(report[p], PROTOCOLS[p].scenes) for p in PROTOCOLS if p in report}
        out.write_text(json.dumps({**summaries, **stamp_of(report)}, indent=1))
        for p, summary in summaries.items():
            plot(p, summary, out.with_name(f"{out.stem}_{p}.png"))

    init_ray(num_cpus=3, quiet=True)  # prepare and the Ray Train runs; one CPU more than cores keeps Data going
    for name in args.protocols:
        cache = Path(args.cache) / name
        events = pd.read_csv(SHARED / PROTOCOLS[name].log)
        if not args.skip_sparse:
            run_sparse(name, report[name], args, cache, events, run_commit, save)
        if not args.skip_new_scene:
            run_new_scenes(name, report[name], args, cache, events, run_commit, save)
    save()
    print("\n\n".join(markdown_tables(p, summarize(report[p], PROTOCOLS[p].scenes)) for p in args.protocols))


if __name__ == "__main__":
    main()
