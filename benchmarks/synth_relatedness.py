"""Does MSIT's transfer attention recover how scenes are related, where the truth is known?

On synthetic logs (`msit data synth`) whose scenes share a user's interest with correlation r^|s - t|
(`--scene-relatedness r`), optionally with each user focused on a few scenes (`--scene-focus a`), train MSIT
(single process, the demo's training settings) and compare the mean transfer attention on the test split, per
(target, source) scene, with the generator's relatedness: the rank correlation over off-diagonal cells, pooled
and per target scene (msit.evaluation.relatedness). Every combination of the listed data settings, model
variants and seeds is one run; the generated and prepared logs are cached in benchmarks/.cache.

Writes benchmarks/results/synth_relatedness.json.

    python benchmarks/synth_relatedness.py [--relatedness 0.5] [--focus 0 0.5] [--variants base layers1] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from provenance import stamp
from quality import load_prepared

from msit.data import synth
from msit.evaluation.relatedness import load_relatedness, rank_agreement
from msit.evaluation.report import run_model
from msit.model import ModelConfig, build_model
from msit.training.trainer import TrainConfig, evaluate, fit, seed_everything

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # ModelConfig overrides of the defaults; the heat map is the last transfer layer's attention
    "base": {},
    "pair_bias": {"transfer_pair_bias": True},
    "layers1": {"transfer_layers": 1},
    "layers1_pair_bias": {"transfer_layers": 1, "transfer_pair_bias": True},
}
TRAIN = dict(epochs=6, lr=3e-3, patience=2)  # the demo's lr; a few more epochs with early stopping on val


def prepared(cache: Path, cfg: synth.SynthConfig) -> tuple[Path, Path]:
    """The prepared log of `cfg` (generated and prepared once) and the generator's synth.json."""
    key = f"synth-u{cfg.users}-e{cfg.events_per_user:g}-s{cfg.scenes}-r{cfg.scene_relatedness:g}-a{cfg.scene_focus:g}"
    raw, out = cache / key / "log", cache / key / "prepared"
    if not (raw / synth.SYNTH_INFO).is_file():
        synth.write(cfg, raw)
    if not (out / "feature_spec.json").is_file():
        from msit.data.prepare import PrepareConfig, prepare  # Ray Data: only needed the first time
        from msit.data.spec import SceneLogSpec

        spec = SceneLogSpec.load(str(raw / "spec.yaml"))
        prepare(PrepareConfig(inputs=[str(raw)], out=str(out), spec=spec, overwrite=True, num_cpus=2))
    return out, raw / synth.SYNTH_INFO


def run(data: Path, synth_info: Path, variant: str, seed: int) -> dict:
    spec, splits, table = load_prepared(str(data))
    truth = load_relatedness(synth_info, spec.scenarios)
    seed_everything(seed)
    model = build_model(ModelConfig(**VARIANTS[variant]), spec, table)
    result = fit(model, splits["train"], splits["val"], spec, TrainConfig(seed=seed, **TRAIN), log=lambda _: None)
    _, attention = run_model(model, splits["test"], len(spec.scenarios))
    assert attention is not None  # MSIT has transfer attention
    return {
        "val_auc": result.best_val["overall"]["auc"],
        "test_auc": evaluate(model, splits["test"], spec)["overall"]["auc"],
        "best_epoch": result.best_epoch,
        "spearman": rank_agreement(attention, truth),
        "scenes": list(spec.scenarios),
        "attention": attention.tolist(),
        "relatedness": truth.tolist(),
        "train_s": result.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3000, help="the demo's (default %(default)s)")
    parser.add_argument("--events-per-user", type=float, default=synth.SynthConfig.events_per_user)
    parser.add_argument("--scenes", type=int, default=synth.SynthConfig.scenes)
    parser.add_argument("--relatedness", type=float, nargs="+", default=[0.5], help="values of r (the demo's: 0.5)")
    parser.add_argument("--focus", type=float, nargs="+", default=[0.0], help="values of scene_focus a")
    parser.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=["base", "layers1", "layers1_pair_bias"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"), help="generated and prepared logs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "synth_relatedness.json"))
    args = parser.parse_args()
    provenance = stamp("cpu")
    torch.set_num_threads(args.threads)
    runs = []
    for r, a in itertools.product(args.relatedness, args.focus):
        cfg = synth.SynthConfig(
            users=args.users,
            events_per_user=args.events_per_user,
            scenes=args.scenes,
            scene_relatedness=r,
            scene_focus=a,
        )
        data, truth = prepared(Path(args.cache), cfg)
        for variant, seed in itertools.product(args.variants, args.seeds):
            start = time.perf_counter()
            result = run(data, truth, variant, seed)
            runs.append({"scene_relatedness": r, "scene_focus": a, "variant": variant, "seed": seed, **result})
            print(
                f"r={r:g} a={a:g} {variant} seed {seed}: val AUC {result['val_auc']:.4f}, Spearman pooled "
                f"{result['spearman']['pooled']:.3f} per target {result['spearman']['per_target_mean']:.3f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    report = {
        **provenance,
        "synth": {"users": args.users, "events_per_user": args.events_per_user, "scenes": args.scenes},
        "train": TRAIN,
        "variants": {name: VARIANTS[name] for name in args.variants},
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
