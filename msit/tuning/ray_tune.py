"""Architecture search on Ray Tune: the edge where Tune meets msit.

Each trial is a small Tune function that runs one Ray Train run through the same `make_trainer` as
`msit train`; `TuneReportCallback` forwards every epoch's metrics to Tune, where ASHA stops weak
trials early (Ray 2.60's supported pattern for Tune over Train). Grid and random search expand the
space into concrete configs up front, so configs the model refuses (a width not divisible by the
head count) are pruned before anything runs; Optuna (optional extra) samples define-by-run and
never offers a head count that does not divide the sampled width.

After the search: a table of every trial (trials.csv), the best config as a ready train YAML, the
best trial's best checkpoint exported as a model directory, and a heat map of best val AUC by
heads x fusion.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import yaml

from msit.config import from_dict, load_yaml
from msit.errors import ConfigError, MsitError
from msit.model import ModelConfig
from msit.training.ray_train import RunSpec, ScalingSpec, TrainRunConfig, export_checkpoint, make_trainer, resolve_paths
from msit.training.trainer import TrainConfig

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
HEADS = "heads"  # shorthand: sets interest_heads and transfer_heads together
ALGORITHMS = ("grid", "random", "optuna")


@dataclass
class AshaSpec:
    enabled: bool = True
    grace_period: int = 1  # epochs every trial gets before it can be stopped
    reduction_factor: int = 2


@dataclass
class SearchSpec:
    # model or train field -> a list of choices; for random/optuna also {log_uniform: [lo, hi]} or {uniform: [lo, hi]}
    space: dict[str, Any] = field(
        default_factory=lambda: {HEADS: [1, 2, 4, 8], "fusion": ["attention", "concat", "gate", "sum"]}
    )
    algorithm: str = "grid"  # grid: every valid combination; random / optuna: num_samples trials
    num_samples: int = 16
    seed: int = 0
    max_concurrent_trials: int = 2
    asha: AshaSpec = field(default_factory=AshaSpec)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"search.algorithm must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        unknown = sorted(set(self.space) - MODEL_FIELDS - TRAIN_FIELDS - {HEADS})
        if unknown:
            raise ConfigError(
                f"search.space: unknown parameter(s) {unknown}; expected {HEADS!r} or fields of "
                f"model ({sorted(MODEL_FIELDS)}) or train ({sorted(TRAIN_FIELDS)})"
            )
        for name, domain in self.space.items():
            if not _is_choices(domain) and not (self.algorithm != "grid" and _range(domain)):
                raise ConfigError(
                    f"search.space.{name}: expected a non-empty list of choices"
                    + ("" if self.algorithm == "grid" else " or {log_uniform|uniform: [lo, hi]}")
                    + f", got {domain!r}"
                )
        if self.max_concurrent_trials < 1 or self.num_samples < 1:
            raise ConfigError("search.max_concurrent_trials and search.num_samples must be at least 1")


@dataclass
class TuneRunConfig:
    data: str  # a prepared directory
    output: str  # best model directory; trials.csv, best_config.yaml and heatmap.png go in <output>_search/
    model: ModelConfig = field(default_factory=ModelConfig)  # the base every trial starts from
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSpec = field(default_factory=lambda: ScalingSpec(num_workers=1))  # per trial
    search: SearchSpec = field(default_factory=SearchSpec)
    run: RunSpec = field(default_factory=lambda: RunSpec(name="msit-search"))

    @classmethod
    def load(cls, path: str | Path) -> TuneRunConfig:
        return from_dict(cls, load_yaml(path), where=str(path))


def _is_choices(domain: Any) -> bool:
    return isinstance(domain, list) and len(domain) > 0


def _range(domain: Any) -> tuple[str, float, float] | None:
    if isinstance(domain, dict) and len(domain) == 1:
        ((kind, bounds),) = domain.items()
        if kind in ("log_uniform", "uniform") and isinstance(bounds, list) and len(bounds) == 2:
            return kind, float(bounds[0]), float(bounds[1])
    return None


def trial_config(base: TuneRunConfig, params: dict[str, Any], name: str) -> TrainRunConfig:
    """The train config of one trial: the base with `params` applied (raises ConfigError if invalid)."""
    model, train = dataclasses.asdict(base.model), dataclasses.asdict(base.train)
    for key, value in params.items():
        if key == HEADS:
            model["interest_heads"] = model["transfer_heads"] = value
        else:
            (model if key in MODEL_FIELDS else train)[key] = value
    return TrainRunConfig(
        data=base.data,
        output=base.output,
        model=ModelConfig(**model),
        train=TrainConfig(**train),
        scaling=dataclasses.replace(base.scaling),
        run=dataclasses.replace(base.run, name=name, storage_path=_train_storage(base)),
    )


def _train_storage(cfg: TuneRunConfig) -> str:
    return str(Path(cfg.run.storage_path) / f"{cfg.run.name}_train_runs")


def _valid(base: TuneRunConfig, params: dict[str, Any]) -> bool:
    try:
        trial_config(base, params, "check")
    except (ConfigError, ValueError, TypeError):
        return False
    return True


def expand_space(cfg: TuneRunConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Grid / random: the concrete trial params, and the combinations pruned as invalid."""
    space, search = cfg.search.space, cfg.search
    if search.algorithm == "grid":
        names = list(space)
        candidates = [dict(zip(names, values, strict=True)) for values in itertools.product(*space.values())]
    else:
        rng, candidates = random.Random(search.seed), []
        for _ in range(search.num_samples):
            candidates.append({name: _sample(rng, domain) for name, domain in space.items()})
    kept: list[dict[str, Any]] = []
    pruned: list[dict[str, Any]] = []
    for params in candidates:
        (kept if _valid(cfg, params) else pruned).append(params)
    return kept, pruned


def _sample(rng: random.Random, domain: Any) -> Any:
    if _is_choices(domain):
        return rng.choice(domain)
    bounds = _range(domain)
    assert bounds is not None  # SearchSpec refused any other domain
    kind, lo, hi = bounds
    return math.exp(rng.uniform(math.log(lo), math.log(hi))) if kind == "log_uniform" else rng.uniform(lo, hi)


def _optuna_space(cfg: TuneRunConfig):
    """Define-by-run: head counts are offered only among those dividing the sampled width.

    Optuna needs a fixed set of choices per parameter name, so a head count is sampled under a name
    per width (`heads@32`) and returned under its own name; `_params` drops the per-width names."""
    space = cfg.search.space

    def define(trial) -> dict[str, Any]:
        width = (
            trial.suggest_categorical("embed_dim", space["embed_dim"]) if "embed_dim" in space else cfg.model.embed_dim
        )
        heads = {}
        for name, domain in space.items():
            if name == "embed_dim":
                continue
            if name in (HEADS, "interest_heads", "transfer_heads"):
                fits = [h for h in domain if width % h == 0]
                if not fits:
                    raise ConfigError(f"search.space.{name}: no head count in {domain} divides width {width}")
                heads[name] = trial.suggest_categorical(f"{name}@{width}", fits)
            elif _is_choices(domain):
                trial.suggest_categorical(name, domain)
            else:
                bounds = _range(domain)
                assert bounds is not None  # SearchSpec refused any other domain
                kind, lo, hi = bounds
                trial.suggest_float(name, lo, hi, log=kind == "log_uniform")
        return heads

    return define


def tune_trial(config: dict, base: TuneRunConfig, cpu_budget: float) -> None:
    """One trial: a Ray Train run whose every epoch is reported to Tune. Restored trials resume their run."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(base, _params(config), name=ray.tune.get_context().get_trial_id())
    make_trainer(cfg, callbacks=[TuneReportCallback()], cpu_budget=cpu_budget, log=lambda _: None).fit()


def search_outputs_dir(cfg: TuneRunConfig) -> Path:
    output = Path(cfg.output)
    return output.with_name(f"{output.name}_search")


def run_search(cfg: TuneRunConfig, log=print) -> Path:
    """Run (or resume) the search, then write its outputs; returns the best trial's model directory.

    The same `run.name` and `run.storage_path` resume an interrupted search: finished trials are kept,
    unfinished ones continue from their latest Train checkpoint."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    cfg = resolve_paths(cfg)
    search = cfg.search
    experiment = f"{cfg.run.storage_path}/{cfg.run.name}"
    # Concurrent trials share the cluster: each may hold its share, and keeps a CPU of it for Ray Data.
    cpu_budget = ray.cluster_resources().get("CPU", 0) / search.max_concurrent_trials
    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, base=cfg, cpu_budget=cpu_budget), {"cpu": 0.01}
    )  # the trial function only waits on its TorchTrainer
    if tune.Tuner.can_restore(experiment):
        log(f"resuming search {cfg.run.name!r} from {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
    else:
        scheduler = (
            ASHAScheduler(
                time_attr="training_iteration",
                max_t=cfg.train.epochs,
                grace_period=search.asha.grace_period,
                reduction_factor=search.asha.reduction_factor,
            )
            if search.asha.enabled
            else None
        )
        if search.algorithm == "optuna":
            param_space, num_samples, search_alg = {}, search.num_samples, _optuna_searcher(cfg)
            count = num_samples
        else:
            trials, pruned = expand_space(cfg)
            if pruned:
                log(f"pruned {len(pruned)} invalid combination(s) before running, e.g. {pruned[0]}")
            if not trials:
                raise ConfigError("search.space: every combination is invalid for the model (see above)")
            param_space, num_samples, search_alg = {"params": tune.grid_search(trials)}, 1, None
            count = len(trials)
        log(
            f"searching {count} trial(s), "
            f"{search.max_concurrent_trials} at a time, {'ASHA' if scheduler else 'no early stopping'}; "
            f"search {cfg.run.name!r} in {cfg.run.storage_path}"
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric="val_auc",
                mode="max",
                scheduler=scheduler,
                search_alg=search_alg,
                num_samples=num_samples,
                max_concurrent_trials=search.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name=cfg.run.name, storage_path=cfg.run.storage_path, verbose=1),
        )
    results = tuner.fit()
    return write_search_outputs(cfg, results, log)


def _optuna_searcher(cfg: TuneRunConfig):
    try:
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(space=_optuna_space(cfg), metric="val_auc", mode="max", seed=cfg.search.seed)
    except ImportError as e:
        raise MsitError(f"search.algorithm optuna needs Optuna: pip install 'msit[optuna]' ({e})") from None


def _params(config: dict) -> dict:
    """A trial's searched params: grid/random nest them under "params"; Optuna's are flat."""
    if "params" in config:
        return dict(config["params"])
    return {k: v for k, v in config.items() if "@" not in k}


def trials_table(results) -> pd.DataFrame:
    """One row per trial: its params, epochs run, final and best val metrics, and where its best checkpoint is."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        row = {"trial": (result.metrics or {}).get("trial_id", Path(result.path).name), **_params(result.config)}
        if history is None or history.empty or "val_auc" not in history:
            rows.append(row | {"epochs": 0, "error": str(result.error) if result.error else "no report"})
            continue
        best = history.loc[history["val_auc"].idxmax()]
        row |= {
            "epochs": len(history),
            "val_auc": float(best["val_auc"]),
            "best_epoch": int(best["epoch"]),
            "val_logloss": float(best["val_logloss"]),
            "final_val_auc": float(history["val_auc"].iloc[-1]),
            "final_train_loss": float(history["train_loss"].iloc[-1]),
            **{c: float(best[c]) for c in history.columns if c.startswith("val_auc/")},
            "error": str(result.error) if result.error else "",
            "checkpoint_path": best.get("checkpoint_path"),
        }
        rows.append(row)
    return pd.DataFrame(rows).sort_values("val_auc", ascending=False, na_position="last").reset_index(drop=True)


def write_search_outputs(cfg: TuneRunConfig, results, log=print) -> Path:
    table = trials_table(results)
    out = search_outputs_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "trials.csv", index=False)
    shown = [c for c in table.columns if c not in ("checkpoint_path", "error") and not c.startswith("val_auc/")]
    log("trials (best val AUC first):\n" + table[shown].to_string(index=False, float_format="%.4f"))
    failed = table[table["error"].fillna("") != ""]
    if len(failed):
        log(f"{len(failed)} trial(s) failed; see the error column of {out / 'trials.csv'}")
    finished = table.dropna(subset=["val_auc"])
    if finished.empty:
        raise MsitError(f"no trial of search {cfg.run.name!r} reported a validation AUC")
    best = finished.iloc[0]
    params = {k: _plain(best[k]) for k in cfg.search.space}

    best_cfg = trial_config(cfg, params, name=f"{cfg.run.name}-best")
    best_cfg = dataclasses.replace(
        best_cfg,
        output=f"{cfg.output}_retrained",
        run=dataclasses.replace(best_cfg.run, storage_path=cfg.run.storage_path),
    )
    (out / "best_config.yaml").write_text(
        f"# best of search {cfg.run.name!r}: val AUC {best['val_auc']:.4f} at epoch {best['best_epoch']}\n"
        "# retrain with: msit train --config "
        + str(out / "best_config.yaml")
        + "\n"
        + yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(best_cfg))), sort_keys=False)
    )
    info = export_checkpoint(ray.train.Checkpoint(best["checkpoint_path"]), Path(cfg.output))
    (out / "search.json").write_text(
        json.dumps(
            {
                "best_params": params,
                "best_val_auc": float(best["val_auc"]),
                "best_trial": best["trial"],
                "trials": len(table),
                "failed": len(failed),
                "exported_epoch": info["epoch"],
            },
            indent=1,
        )
    )
    heatmap = plot_heatmap(table, out / "heatmap.png")
    log(f"best: {params} (val AUC {best['val_auc']:.4f}); model exported to {cfg.output}")
    log(f"trials.csv, best_config.yaml{', heatmap.png' if heatmap else ''} in {out}")
    return Path(cfg.output)


def _plain(value: Any) -> Any:
    """numpy scalars from the table back to plain Python (YAML and JSON want those)."""
    return value.item() if hasattr(value, "item") else value


def plot_heatmap(table: pd.DataFrame, path: Path) -> Path | None:
    """Best val AUC by head count x fusion (the max over any other searched parameter)."""
    heads = next((c for c in (HEADS, "transfer_heads", "interest_heads") if c in table), None)
    if heads is None or "fusion" not in table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best_rows = table.dropna(subset=["val_auc"]).sort_values("val_auc").groupby([heads, "fusion"]).tail(1)
    grid = best_rows.pivot(index=heads, columns="fusion", values="val_auc")
    epochs = best_rows.pivot(index=heads, columns="fusion", values="epochs")  # ASHA gives trials unequal budgets
    fig, ax = plt.subplots(figsize=(1.6 * len(grid.columns) + 2, 0.8 * len(grid.index) + 1.8))
    image = ax.imshow(grid.to_numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid.columns)), grid.columns)
    ax.set_yticks(range(len(grid.index)), [str(h) for h in grid.index])
    ax.set(
        xlabel="fusion",
        ylabel=heads.replace("_", " "),
        title="best val AUC by heads x fusion (and the epochs that trial ran)",
    )
    middle = np.nanmean([np.nanmin(grid.to_numpy()), np.nanmax(grid.to_numpy())])
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        if not np.isnan(value):
            ax.text(
                j,
                i,
                f"{value:.4f}\n{int(epochs.iloc[i, j])} epochs",
                ha="center",
                va="center",
                fontsize=9,
                color="black" if value > middle else "white",
            )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
