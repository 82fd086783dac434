"""A run name resumes only the same training: the config check on the driver (no Ray here)."""

import json

import pytest

from msit.errors import ConfigError
from msit.model import ModelConfig
from msit.training.ray_train import RUN_CONFIG_FILE, RunSpec, ScalingSpec, TrainRunConfig, check_run_config
from msit.training.trainer import TrainConfig
from tests.model_helpers import tiny_spec


def _config(tmp_path, **changes) -> TrainRunConfig:
    if not (tmp_path / "data").exists():
        tiny_spec().save(tmp_path / "data")
    cfg = TrainRunConfig(
        data=str(tmp_path / "data"),
        output=str(tmp_path / "model"),
        model=ModelConfig(embed_dim=8, mlp_dims=(8,)),
        train=TrainConfig(epochs=2, lr=0.002),
        run=RunSpec(name="r", storage_path=str(tmp_path / "runs")),
    )
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def test_the_first_start_records_the_config_and_a_hash(tmp_path):
    check_run_config(_config(tmp_path))
    stored = json.loads((tmp_path / "runs" / "r" / RUN_CONFIG_FILE).read_text())
    assert len(stored["hash"]) == 16
    assert stored["config"]["train"]["lr"] == 0.002 and stored["config"]["model"]["mlp_dims"] == [8]
    assert set(stored["config"]["data"]) == {"encoding", "rows"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train__lr": 0.004}, "train.lr: 0.002 -> 0.004"),
        ({"model__embed_dim": 16, "model__mlp_dims": (16,)}, "model.embed_dim: 8 -> 16; model.mlp_dims: [8] -> [16]"),
    ],
)
def test_a_different_config_under_the_same_name_is_refused_with_the_differences(tmp_path, changes, message):
    check_run_config(_config(tmp_path))
    with pytest.raises(ConfigError) as error:
        check_run_config(_config(tmp_path, **changes))
    text = str(error.value)
    assert f"run 'r' in {tmp_path / 'runs'} was started with another config ({message})" in text
    assert "pick a new run name" in text and f"remove {tmp_path / 'runs' / 'r'}" in text and "\n" not in text


def test_other_data_under_the_same_name_is_refused(tmp_path):
    check_run_config(_config(tmp_path))
    spec = tiny_spec()
    spec.vocabularies["item_id"].append("i_new")  # data prepared otherwise: another encoding
    spec.fields["item_id"].vocab_size += 1
    spec.save(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"\(data\.encoding: \"\w+\" -> \"\w+\"\)"):
        check_run_config(_config(tmp_path))


def test_what_does_not_change_the_training_still_resumes(tmp_path):
    check_run_config(_config(tmp_path))
    # More epochs, other patience, resources, failure budget, checkpoints kept, drills and output: the same run.
    check_run_config(
        _config(
            tmp_path,
            train__epochs=5,
            train__patience=9,
            train__eval_batch_size=7,
            scaling__num_workers=1,
            run__max_failures=0,
            run__keep_checkpoints=5,
            run__kill_worker_after_epoch=1,
        )
    )
    cfg = _config(tmp_path)
    cfg.output, cfg.scaling = str(tmp_path / "elsewhere"), ScalingSpec(num_workers=8, use_gpu=True)
    check_run_config(cfg)


def test_a_workers_msit_error_surfaces_as_that_one_line(monkeypatch, tmp_path):
    """Every attempt failing on an MsitError in a worker (say, no checkpoint loads) ends `msit train` with its
    message, not Ray's traceback: Train V2 wraps it in UserExceptionWithTraceback inside a WorkerGroupError."""
    import ray.train
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from msit.errors import MsitError
    from msit.training import ray_train

    class FailingTrainer:
        def fit(self):
            raise ray.train.WorkerGroupError(
                "rank 0 failed",
                {
                    0: UserExceptionWithTraceback(
                        MsitError("no checkpoint of the run in /runs/r loads (2 tried, each damaged)"), "Traceback ..."
                    )
                },
            )

    monkeypatch.setattr(ray_train, "make_trainer", lambda cfg, log: FailingTrainer())
    with pytest.raises(MsitError, match=r"^no checkpoint of the run in /runs/r loads \(2 tried, each damaged\)$"):
        ray_train.run_training(_config(tmp_path), log=lambda _: None)
