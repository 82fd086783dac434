"""Ray Tune: a small heads x fusion search over Ray Train trials, its outputs, and the best config re-training."""

import pandas as pd
import pytest
import yaml

from msit.data.feature_spec import FeatureSpec
from msit.data.prepared import load_split
from msit.errors import ConfigError
from msit.model import ModelConfig
from msit.model.model_dir import load_model_dir
from msit.training.ray_train import RunSpec, ScalingSpec, TrainRunConfig, run_training
from msit.training.trainer import TrainConfig, evaluate
from msit.tuning.ray_tune import AshaSpec, SearchSpec, TuneRunConfig, expand_space, run_search, search_outputs_dir


def _search(prepared, tmp_path, **search) -> TuneRunConfig:
    return TuneRunConfig(
        data=str(prepared),
        output=str(tmp_path / "best"),
        model=ModelConfig(embed_dim=12, mlp_dims=(16,), transfer_layers=1),
        train=TrainConfig(epochs=2, batch_size=256, lr=5e-3),
        scaling=ScalingSpec(num_workers=1, use_gpu=False),
        search=SearchSpec(**search),
        run=RunSpec(name="search", storage_path=str(tmp_path / "ray_results")),
    )


def test_invalid_combinations_are_pruned_before_running(tmp_path):
    cfg = _search("unused", tmp_path, space={"heads": [1, 2, 8], "fusion": ["sum", "gate"]})
    trials, pruned = expand_space(cfg)
    assert sorted((t["heads"], t["fusion"]) for t in trials) == [(1, "gate"), (1, "sum"), (2, "gate"), (2, "sum")]
    assert sorted(p["fusion"] for p in pruned) == ["gate", "sum"] and {p["heads"] for p in pruned} == {8}

    random_cfg = _search(
        "unused",
        tmp_path,
        algorithm="random",
        num_samples=30,
        seed=3,
        space={"heads": [1, 8], "lr": {"log_uniform": [1e-4, 1e-2]}},
    )
    trials, pruned = expand_space(random_cfg)
    assert len(trials) + len(pruned) == 30 and all(t["heads"] == 1 for t in trials) and pruned
    assert all(1e-4 <= t["lr"] <= 1e-2 for t in trials) and len({t["lr"] for t in trials}) == len(trials)
    assert expand_space(random_cfg) == (trials, pruned)  # seeded


def test_optuna_only_offers_head_counts_that_divide_the_sampled_width(tmp_path):
    optuna = pytest.importorskip("optuna", reason="optuna is in the test extra")  # installed by `make test`
    from msit.tuning.ray_tune import _optuna_searcher, _optuna_space, _params

    cfg = _search(
        "unused",
        tmp_path,
        algorithm="optuna",
        space={"embed_dim": [12, 16], "heads": [1, 3, 4, 8], "dropout": {"uniform": [0.0, 0.3]}},
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define = _optuna_space(cfg)
    seen = set()
    for _ in range(40):
        trial = study.ask()
        returned = define(trial)  # as Ray's OptunaSearch builds a config: the suggestions, then what define returns
        params = _params({**trial.params, **returned})
        width, heads = params["embed_dim"], params["heads"]
        assert width % heads == 0 and 0.0 <= params["dropout"] <= 0.3 and set(params) == set(cfg.search.space)
        seen.add((width, heads))
    assert {(12, 3), (16, 8)} <= seen  # both widths, each with a head count only it allows
    assert _optuna_searcher(cfg) is not None


@pytest.mark.parametrize(
    "search, message",
    [
        ({"space": {"hedas": [1, 2]}}, "unknown parameter(s) ['hedas']"),
        ({"space": {"heads": 4}}, "search.space.heads: expected a non-empty list"),
        ({"space": {"lr": {"log_uniform": [1e-4, 1e-2]}}}, "search.space.lr"),  # ranges need random or optuna
        ({"algorithm": "bayes"}, "search.algorithm must be one of"),
    ],
)
def test_bad_search_specs_are_refused_with_their_field(search, message):
    with pytest.raises(ConfigError) as error:
        SearchSpec(**search)
    assert message in str(error.value)


def test_a_small_search_reports_every_trial_and_exports_a_model_that_retrains(small_prepared, tmp_path):
    _, prepared = small_prepared
    cfg = _search(
        prepared,
        tmp_path,
        space={"heads": [1, 2, 8], "fusion": ["sum", "gate"]},
        max_concurrent_trials=2,
        asha=AshaSpec(grace_period=1, reduction_factor=2),
    )
    logs = []
    best_dir = run_search(cfg, log=logs.append)
    assert any("pruned 2 invalid combination(s)" in line for line in logs)

    out = search_outputs_dir(cfg)
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 4 and set(zip(table["heads"], table["fusion"], strict=True)) == {
        (1, "sum"),
        (1, "gate"),
        (2, "sum"),
        (2, "gate"),
    }
    assert table["epochs"].min() >= 1 and table["val_auc"].notna().all()  # every trial reported
    assert table["val_auc"].is_monotonic_decreasing  # best first
    assert (out / "heatmap.png").stat().st_size > 5_000

    best = table.iloc[0]
    loaded = load_model_dir(best_dir)
    assert (loaded.config.transfer_heads, loaded.config.fusion) == (best["heads"], best["fusion"])
    spec = FeatureSpec.load(prepared)
    val_auc = evaluate(loaded.model, load_split(prepared, "val", spec), spec)["overall"]["auc"]
    assert val_auc == pytest.approx(best["val_auc"], abs=1e-9)  # the exported weights are the best epoch's

    best_yaml = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best_yaml["model"]["interest_heads"] == best["heads"] and best_yaml["model"]["fusion"] == best["fusion"]
    # The same name and storage path resume: here every trial had finished, so nothing reruns.
    logs.clear()
    run_search(cfg, log=logs.append)
    assert any(line.startswith("resuming search 'search'") for line in logs)
    assert pd.read_csv(out / "trials.csv").drop(columns="checkpoint_path").equals(table.drop(columns="checkpoint_path"))

    retrain = TrainRunConfig.load(out / "best_config.yaml")
    retrain.train.epochs = 1
    retrained = load_model_dir(run_training(retrain, log=lambda _: None))
    assert retrained.config == loaded.config
