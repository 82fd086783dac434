"""benchmarks/transfer.py's bookkeeping: MovieLens's runs recorded before Ciao was added are kept, each protocol's
settings stand apart, and the summary's transfer gain is MSIT minus its ablation, averaged over the scenes."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import transfer

# What transfer_runs.json recorded for MovieLens before the protocols were added: a changed record would set
# those 129 runs aside.
ML_SETTINGS_BEFORE = {
    "model": {"embed_dim": 32, "dropout": 0.1, "history_length": 20},
    "train": {"epochs": 3, "batch_size": 1024, "lr": 0.002, "weight_decay": 0.0001, "patience": 1},
    "finetune_train": {"epochs": 10, "batch_size": 256, "lr": 0.002, "weight_decay": 0.0001, "patience": 2},
    "threads": 2,
    "new_scene_fraction": 0.1,
    "subsample_seed": 0,
}


def sparse(scene: str, fraction: float, model: str, aucs: dict[str, float], seed: int = 0) -> dict:
    return {
        "scene": scene,
        "fraction": fraction,
        "model": model,
        "seed": seed,
        "test": {"scenes": {s: {"auc": a} for s, a in aucs.items()}},
    }


def test_movielens_settings_are_recorded_as_before():
    assert transfer.settings_of("ml100k_genre", threads=2) == ML_SETTINGS_BEFORE


def test_a_file_from_before_the_protocols_keeps_its_runs_under_ml100k_genre(tmp_path):
    runs = [sparse("drama", 0.05, "msit", {"drama": 0.7})]
    path = tmp_path / "transfer_runs.json"
    path.write_text(json.dumps({"settings": ML_SETTINGS_BEFORE, "sparse": runs, "new_scene": [], "device": "CPU: x"}))
    report = transfer.load_runs(path)
    assert report["device"] == "CPU: x" and "sparse" not in report
    kept = transfer.reconcile(report, "ml100k_genre", transfer.settings_of("ml100k_genre", threads=2))
    assert kept["sparse"] == runs


def test_changed_settings_set_aside_that_protocols_runs_only(capsys):
    report = {
        "ml100k_genre": {"settings": ML_SETTINGS_BEFORE, "sparse": [sparse("drama", 0.1, "msit", {})], "new_scene": []},
        "ciao": {"settings": {"old": 1}, "sparse": [sparse("dvds", 0.1, "msit", {})], "new_scene": []},
    }
    transfer.reconcile(report, "ciao", transfer.settings_of("ciao", threads=1))
    assert report["ciao"]["sparse"] == [] and len(report["ml100k_genre"]["sparse"]) == 1
    assert "ciao: the settings changed, so its 1 earlier runs are set aside" in capsys.readouterr().out
    transfer.reconcile(report, "ml100k_genre", transfer.settings_of("ml100k_genre", threads=2))
    assert len(report["ml100k_genre"]["sparse"]) == 1


def test_summary_gain_is_msit_minus_its_ablation_averaged_over_scenes():
    runs = {
        "settings": {},
        "new_scene": [],
        "sparse": [
            sparse("dvds", 0.05, "msit", {"dvds": 0.70}, seed=0),
            sparse("dvds", 0.05, "msit", {"dvds": 0.72}, seed=1),
            sparse("dvds", 0.05, "msit_no_transfer", {"dvds": 0.69}),
            sparse("beauty", 0.05, "msit", {"beauty": 0.60}),
            sparse("beauty", 0.05, "msit_no_transfer", {"beauty": 0.62}),
            sparse("travel", 0.05, "star", {"travel": 0.65}),  # no pair: not in the gain
            sparse(
                "all", 1.0, "msit", {"dvds": 0.75, "beauty": 0.66, "travel": 0.6}
            ),  # the whole log counts for every scene
            sparse("all", 1.0, "msit_no_transfer", {"dvds": 0.74, "beauty": 0.66, "travel": 0.6}),
        ],
    }
    summary = transfer.summarize(runs, ("dvds", "beauty", "travel"))
    assert summary["sparse"]["dvds"]["0.05"]["msit"] == pytest.approx(0.71)
    gain = summary["transfer_gain"]
    assert gain["0.05"] == {"mean": pytest.approx((0.02 - 0.02) / 2), "scenes": 2}  # dvds +0.02, beauty -0.02
    assert gain["1.0"] == {"mean": pytest.approx((0.01 + 0.0 + 0.0) / 3), "scenes": 3}
    assert summary["run_commits"] == ["not recorded"]


def test_ciao_runs_each_family_at_its_chosen_point_and_the_ablation_differs_in_the_transfer_only():
    ciao = transfer.PROTOCOLS["ciao"]
    msit, ablation = ciao.model_config("msit"), ciao.model_config("msit_no_transfer")
    assert msit.history_length == 20 and msit.scene_evidence and ablation.scene_evidence
    differs = {k for k, v in vars(msit).items() if vars(ablation)[k] != v}
    assert differs == {"family"}  # both chose dropout 0.25 on val; they differ in lr only
    assert ciao.train_config("msit", 0).lr == 2e-3 and ciao.train_config("msit_no_transfer", 0).lr == 4e-3
