"""Interest transfer where it matters: sparse scenes and a new scene, on MovieLens-100K (genre protocol).

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

Writes benchmarks/results/transfer.json, transfer_runs.json (every run; an interrupted benchmark
resumes, skipping runs recorded with the same settings) and transfer.png. Each run records the commit it ran
on; the files' top-level stamp (benchmarks/provenance.py) is the run that last wrote them, and transfer.json
lists the commits of the runs it summarizes (`run_commits`).

    python benchmarks/transfer.py [--seeds 3] [--scenes drama light thrill] [--skip-new-scene] [--table]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from provenance import stamp, stamp_of

from msit.data.feature_spec import LAYOUT_VERSION, FeatureSpec
from msit.data.prepare import PrepareConfig, prepare
from msit.data.prepared import load_sequences, load_split
from msit.model import ModelConfig, build_model, load_item_table
from msit.model.model_dir import load_model_dir, save_model_dir
from msit.ray_env import init_ray
from msit.training.finetune import FinetuneSpec
from msit.training.ray_train import RunSpec, ScalingSpec, TrainRunConfig, run_training
from msit.training.trainer import TrainConfig, evaluate, fit, seed_everything

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT.parent / "shared" / "data" / "ml100k_genre.csv"
RESULTS = ROOT / "benchmarks" / "results"
SCENES = ("drama", "light", "thrill")
FRACTIONS = (0.05, 0.1, 0.25, 1.0)
MODELS = ("msit", "msit_no_transfer", "star", "shared_bottom")
NEW_SCENE_FRACTION = 0.1

# Fixed before any result was seen, and short enough for a 2-core box: 120 sparse runs.
HISTORY = 20
MODEL = dict(embed_dim=32, dropout=0.1, history_length=HISTORY)
TRAIN = dict(epochs=3, batch_size=1024, lr=2e-3, weight_decay=1e-4, patience=1)
FINETUNE_TRAIN = dict(epochs=10, batch_size=256, lr=2e-3, weight_decay=1e-4, patience=2)  # few rows: more epochs


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


def train_single(data: Path, family: str, seed: int, tag: str) -> tuple[torch.nn.Module, FeatureSpec, dict]:
    spec = FeatureSpec.load(data)
    seed_everything(seed)
    model = build_model(ModelConfig(family=family, **MODEL), spec, load_item_table(data, spec))
    sequences = load_sequences(data)  # once for both splits
    result = fit(
        model,
        load_split(data, "train", spec, sequences),
        load_split(data, "val", spec, sequences),
        spec,
        TrainConfig(seed=seed, **TRAIN),
        log=lambda m: print(f"[{tag}] {m}", flush=True),
    )
    return model, spec, {"train_s": result.seconds, "best_epoch": result.best_epoch}


def train_on_ray(data: Path, out: Path, scene: str, seed: int, finetune: FinetuneSpec | None) -> dict:
    """One Ray Train run on `scene`'s rows (1 worker); the test AUC of that scene and the wall time."""
    cfg = TrainRunConfig(
        data=str(data),
        output=str(out),
        model=ModelConfig(family="msit", **MODEL),
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


def summarize(report: dict) -> dict:
    sparse: dict = {}
    for r in report["sparse"]:
        scenes = SCENES if r["fraction"] == 1.0 else [r["scene"]]
        for scene in scenes:
            sparse.setdefault(scene, {}).setdefault(json.dumps(r["fraction"]), {}).setdefault(r["model"], []).append(
                r["test"]["scenes"][scene]["auc"]
            )
    sparse = {
        s: {f: {m: float(np.mean(v)) for m, v in models.items()} for f, models in fr.items()}
        for s, fr in sparse.items()
    }
    new_scene: dict = {}
    for r in report["new_scene"]:
        new_scene.setdefault(r["scene"], {}).setdefault(r["how"], []).append(r)
    new_scene = {
        s: {
            f"{how}_{key}": float(np.mean([r[field] for r in runs]))
            for how, runs in hows.items()
            for key, field in (("auc", "auc"), ("s", "seconds"))
        }
        | {"seeds": sorted({r["seed"] for runs in hows.values() for r in runs})}
        for s, hows in new_scene.items()
    }
    commits = sorted({r.get("commit", "not recorded") for r in [*report["sparse"], *report["new_scene"]]})
    return {
        "sparse": sparse,
        "new_scene": new_scene,
        "settings": report["settings"],
        **stamp_of(report),
        "run_commits": commits,
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = [s for s in SCENES if s in summary["sparse"]]
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
            title=f"{scene}: sparse scene",
            xlabel="fraction of its training rows kept",
            ylabel="test AUC of the scene",
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    ax = axes[0][-1]
    new = summary["new_scene"]
    names = [s for s in SCENES if s in new and "finetune_auc" in new[s] and "scratch_auc" in new[s]]
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


def markdown_tables(summary: dict) -> str:
    lines = ["| scene | f | " + " | ".join(MODELS) + " | msit − no transfer |", "|---" * (len(MODELS) + 3) + "|"]
    for scene in SCENES:
        for fraction, models in sorted(summary["sparse"].get(scene, {}).items(), key=lambda kv: float(kv[0])):
            cells = " | ".join(f"{models[m]:.4f}" if m in models else "" for m in MODELS)
            gap = models["msit"] - models["msit_no_transfer"] if {"msit", "msit_no_transfer"} <= set(models) else None
            lines.append(f"| {scene} | {fraction} | {cells} | {'' if gap is None else f'{gap:+.4f}'} |")
    lines += ["", "| new scene | finetune AUC | scratch AUC | finetune s | scratch s |", "|---|---|---|---|---|"]
    for scene, r in summary["new_scene"].items():
        if {"finetune_auc", "scratch_auc"} <= set(r):
            lines.append(
                f"| {scene} | {r['finetune_auc']:.4f} | {r['scratch_auc']:.4f} | {r['finetune_s']:.0f} | "
                f"{r['scratch_s']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:  # noqa: C901  (a script: parse, run each arm, report)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=list(SCENES))
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--skip-sparse", action="store_true")
    parser.add_argument("--skip-new-scene", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache" / "transfer"))
    parser.add_argument("--out", default=str(RESULTS / "transfer.json"))
    parser.add_argument("--table", action="store_true", help="print the results as markdown tables and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_tables(json.loads(Path(args.out).read_text())))
        return
    provenance = stamp("cpu")
    torch.set_num_threads(args.threads)
    cache, out = Path(args.cache), Path(args.out)
    runs_path = out.with_name("transfer_runs.json")
    settings = {
        "model": MODEL,
        "train": TRAIN,
        "finetune_train": FINETUNE_TRAIN,
        "threads": args.threads,
        "new_scene_fraction": NEW_SCENE_FRACTION,
        "subsample_seed": 0,
    }
    report = json.loads(runs_path.read_text()) if runs_path.is_file() else {}
    if report.get("settings") != settings:
        report = {"settings": settings, "sparse": [], "new_scene": []}
    report |= provenance
    run_commit = {"commit": provenance["commit"], "tree_clean": provenance["tree_clean"]}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        runs_path.write_text(json.dumps(report, indent=1))
        summary = summarize(report)
        out.write_text(json.dumps(summary, indent=1))
        plot(summary, out.with_suffix(".png"))

    init_ray(num_cpus=3, quiet=True)  # prepare and the Ray Train runs; one CPU more than cores keeps Data going
    events = pd.read_csv(LOG)
    if not args.skip_sparse:
        done = {(r["scene"], r["fraction"], r["model"], r["seed"]) for r in report["sparse"]}
        cases = [("all", 1.0)] if 1.0 in args.fractions else []
        cases += [(s, f) for s in args.scenes for f in args.fractions if f < 1.0]
        for scene, fraction in cases:
            data = prepared(f"{scene}_{fraction}", sparse_log(events, scene, fraction), cache)
            for model in args.models:
                for seed in range(args.seeds):
                    if (scene, fraction, model, seed) in done:
                        continue
                    tag = f"{scene} f={fraction} {model} seed {seed}"
                    trained, spec, info = train_single(data, model, seed, tag)
                    test = evaluate(trained, load_split(data, "test", spec), spec)
                    print(
                        f"[{tag}] test AUC " + ", ".join(f"{s} {m['auc']:.4f}" for s, m in test["scenes"].items()),
                        flush=True,
                    )
                    report["sparse"].append(
                        {
                            "scene": scene,
                            "fraction": fraction,
                            "model": model,
                            "seed": seed,
                            "test": test,
                            **info,
                            **run_commit,
                        }
                    )
                    save()

    if not args.skip_new_scene:
        done = {(r["scene"], r["how"], r["seed"]) for r in report["new_scene"]}
        for scene in args.scenes:
            base = cache / f"without_{scene}_model"
            if not (base / "model.safetensors").is_file():
                without = prepared(f"without_{scene}", events[events["scenario"] != scene], cache)
                model, spec, info = train_single(without, "msit", 0, f"without {scene}")
                save_model_dir(base, model, ModelConfig(family="msit", **MODEL), spec, {"train": info})
            data = prepared(f"new_{scene}", sparse_log(events, scene, NEW_SCENE_FRACTION), cache, encoding_from=base)
            for seed in range(args.seeds):
                for how in ("finetune", "scratch"):
                    if (scene, how, seed) in done:
                        continue
                    spec = FinetuneSpec(str(base), "scene") if how == "finetune" else None
                    result = train_on_ray(data, cache / "runs" / f"new_{scene}_{how}_{seed}", scene, seed, spec)
                    print(
                        f"[new scene {scene} {how} seed {seed}] test AUC {result['auc']:.4f} "
                        f"in {result['seconds']:.0f} s",
                        flush=True,
                    )
                    report["new_scene"].append({"scene": scene, "how": how, "seed": seed, **result, **run_commit})
                    save()
    save()
    print(json.dumps({k: v for k, v in summarize(report).items() if k != "settings"}, indent=1))


if __name__ == "__main__":
    main()
