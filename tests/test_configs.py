"""The YAML configs shipped in train/ and tune/ load, so that a user copying one gets a config that runs."""

from pathlib import Path

import pytest

from msit.training.ray_train import TrainRunConfig
from msit.tuning.ray_tune import TuneRunConfig, expand_space

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "train" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_train_configs_load(path):
    cfg = TrainRunConfig.load(path)
    assert cfg.data and cfg.output


@pytest.mark.parametrize("path", sorted((ROOT / "tune" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_tune_configs_load_and_expand(path):
    cfg = TuneRunConfig.load(path)
    valid, _ = expand_space(cfg)
    assert valid, f"{path.name}: no valid trial in the search space"


def test_gpu_check_config_shares_a_gpu_between_two_trials():
    cfg = TuneRunConfig.load(ROOT / "tune" / "configs" / "gpu_check.yaml")
    assert cfg.scaling.use_gpu in (True, "true")
    assert cfg.scaling.gpus_per_worker * cfg.search.max_concurrent_trials <= 1
