"""benchmarks/quality.py's bookkeeping: each protocol's settings apart, so that a run on one protocol never
discards another's recorded runs, and a protocol whose settings changed starts afresh."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality

COMMON = {"train": quality.TRAIN, "device": "CPU: test"}


def runs(*protocols: str) -> list[dict]:
    return [{"protocol": p, "model": "msit", "seed": 0, "point": {"lr": 1e-3, "dropout": 0.1}} for p in protocols]


def test_a_file_with_one_settings_block_keeps_its_movielens_runs_when_ciao_is_added():
    old = {"settings": quality.protocol_settings("genre", COMMON), "runs": runs("genre", "age")}
    quality.reconcile_settings(old, ["ciao"], COMMON)
    assert [r["protocol"] for r in old["runs"]] == ["genre", "age"]
    assert old["settings_by_protocol"]["ciao"]["model"]["history_length"] == 20
    assert old["settings_by_protocol"]["genre"]["model"]["history_length"] == 50
    assert "settings" not in old


def test_changed_settings_set_aside_that_protocols_runs_only(capsys):
    report = {"runs": runs("genre", "ciao", "ciao")}
    quality.reconcile_settings(report, ["genre", "ciao"], COMMON)
    assert report["runs"] == []  # nothing was recorded with these settings
    report["runs"] = runs("genre", "ciao")
    quality.reconcile_settings(report, ["ciao"], {**COMMON, "device": "GPU: test"})
    assert [r["protocol"] for r in report["runs"]] == ["genre"]
    assert "ciao: the settings changed, so its 1 earlier runs are set aside" in capsys.readouterr().out
    quality.reconcile_settings(report, ["genre"], COMMON)  # unchanged: kept
    assert [r["protocol"] for r in report["runs"]] == ["genre"]


def test_ciao_configs_use_its_window_and_movielens_keeps_its_own():
    point = {"lr": 2e-3, "dropout": 0.1}
    assert quality.model_config("msit", point, protocol="ciao").history_length == 20
    assert quality.model_config("star", point, protocol="genre").history_length == 50
    assert len(quality.SMALL_SCENES["ciao"]) == 13
