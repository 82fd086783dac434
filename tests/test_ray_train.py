"""Ray Train: 2-worker CPU runs that learn, checkpoint every epoch, survive a dead worker and export a model."""

import json

import pytest
import yaml

from msit.cli import main
from msit.data.feature_spec import FeatureSpec
from msit.data.prepared import load_split
from msit.errors import ConfigError
from msit.model import ModelConfig
from msit.model.model_dir import load_model_dir
from msit.training.ray_train import RunSpec, ScalingSpec, TrainRunConfig, run_outputs_dir, run_training
from msit.training.trainer import TrainConfig, evaluate


def _config(prepared, tmp_path, name, epochs, **run):
    return TrainRunConfig(
        data=str(prepared),
        output=str(tmp_path / "model"),
        model=ModelConfig(embed_dim=16, mlp_dims=(32,)),
        train=TrainConfig(epochs=epochs, batch_size=256, lr=5e-3, patience=epochs),
        scaling=ScalingSpec(num_workers=2, use_gpu=False, cpus_per_worker=1),
        run=RunSpec(name=name, storage_path=str(tmp_path / "ray_results"), keep_checkpoints=1, **run),
    )


def test_two_workers_learn_and_export_the_best_checkpoint(small_prepared, tmp_path):
    _, prepared = small_prepared
    cfg = _config(prepared, tmp_path, "two-workers", epochs=5)
    loaded = load_model_dir(run_training(cfg, log=lambda _: None))
    info = loaded.info["train"]
    assert 1 <= info["best_epoch"] <= 5 and info["epoch"] == info["best_epoch"]
    # Chance is 0.5; ~1,000 validation rows put a random scorer's std near 0.018, so 0.6 is over 5 std away.
    assert info["best_val_auc"] > 0.6
    spec = FeatureSpec.load(prepared)
    val = load_split(prepared, "val", spec)
    assert evaluate(loaded.model, val, spec)["overall"]["auc"] == info["val_auc"]  # the exported weights are those

    outputs = run_outputs_dir(cfg)
    history = json.loads((outputs / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert all(f"val_auc/{scene}" in history[0] for scene in spec.scenarios)
    assert (outputs / "metrics.csv").read_text().startswith("epoch,")
    assert (outputs / "curves.png").stat().st_size > 10_000
    assert any((outputs / "tensorboard").iterdir())


def test_a_dead_worker_resumes_from_the_checkpoint_not_from_epoch_one(small_prepared, tmp_path, monkeypatch):
    _, prepared = small_prepared
    monkeypatch.chdir(tmp_path)  # relative paths, as a user writes them in a config: workers run elsewhere
    cfg = _config(prepared, tmp_path, "fault-drill", epochs=3, max_failures=1, kill_worker_after_epoch=2)
    cfg.output, cfg.run.storage_path = "model", "ray_results"
    run_training(cfg, log=lambda _: None)
    assert (tmp_path / "ray_results" / "fault-drill" / ".fault_drill_done").is_file()  # a worker really died
    history = json.loads((run_outputs_dir(cfg) / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # The second attempt started from a checkpoint (epoch 3, or 2 if the kill beat the last report), not from 1.
    assert history[-1]["first_epoch_of_attempt"] in (2, 3)


def test_rank_0_killed_mid_epoch_loses_only_that_epoch_and_the_metrics_are_the_weights(small_prepared, tmp_path):
    _, prepared = small_prepared
    cfg = _config(
        prepared,
        tmp_path,
        "rank0-mid-epoch",
        epochs=3,
        max_failures=1,
        kill_worker_after_epoch=1,
        kill_rank=0,
        kill_after_batches=4,
    )
    cfg.model, cfg.run.keep_checkpoints = ModelConfig(embed_dim=8, mlp_dims=(8,)), 3
    run_training(cfg, log=lambda _: None)
    marker = tmp_path / "ray_results" / "rank0-mid-epoch" / ".fault_drill_done"
    assert marker.read_text() == "rank 0 killed 4 batches into epoch 2"  # rank 0 really died, mid-epoch
    history = json.loads((run_outputs_dir(cfg) / "metrics.json").read_text())
    spec = FeatureSpec.load(prepared)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # The second attempt began at epoch 2, from epoch 1's checkpoint: only the interrupted epoch was lost,
    # and it was trained again whole (every training row once, over both workers).
    assert [h["first_epoch_of_attempt"] for h in history] == [1, 2, 2]
    assert all(h["train_samples"] == spec.row_counts["train"] for h in history)
    # The final metrics are those of the final weights: the exported best and the latest checkpoint re-scored.
    val = load_split(prepared, "val", spec)
    exported = load_model_dir(cfg.output)
    best = history[exported.info["train"]["best_epoch"] - 1]
    assert evaluate(exported.model, val, spec)["overall"]["auc"] == best["val_auc"]
    latest = max(p for p in (tmp_path / "ray_results" / "rank0-mid-epoch").glob("checkpoint_*") if p.is_dir())
    assert json.loads((latest / "train_state.json").read_text())["history"] == history
    assert evaluate(load_model_dir(latest).model, val, spec)["overall"]["auc"] == history[-1]["val_auc"]


def test_a_truncated_latest_checkpoint_resumes_from_the_newest_valid_one(small_prepared, tmp_path, capsys):
    _, prepared = small_prepared
    cfg = _config(prepared, tmp_path, "truncated", epochs=2)
    cfg.model, cfg.scaling.num_workers, cfg.run.keep_checkpoints = ModelConfig(embed_dim=8, mlp_dims=(8,)), 1, 3
    run_training(cfg, log=lambda _: None)
    run_dir = tmp_path / "ray_results" / "truncated"
    _older, latest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    cfg.train.epochs = 3  # the same run, longer: it resumes
    run_training(cfg, log=lambda _: None)
    history = json.loads((run_outputs_dir(cfg) / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["first_epoch_of_attempt"] for h in history] == [1, 2, 2]  # epoch 2 again, from epoch 1's checkpoint
    assert history[1]["skipped_checkpoints"] == [latest.name]
    assert load_model_dir(cfg.output).info["train"]["best_epoch"] in (1, 2, 3)

    # A new learning rate or a wider model under the same name is refused at once, before Ray Train starts.
    cfg.train.lr = 1e-2
    with pytest.raises(
        ConfigError,
        match=r"was started with another config \(train\.lr: 0\.005 -> 0\.01\); .*"
        r"pick a new run name",
    ):
        run_training(cfg, log=lambda _: None)
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": str(prepared),
                "output": str(tmp_path / "model"),
                "model": {"embed_dim": 16, "mlp_dims": [8]},
                "train": {"epochs": 3, "batch_size": 256, "lr": 5e-3, "patience": 3},
                "run": {"name": "truncated", "storage_path": str(tmp_path / "ray_results")},
            }
        )
    )
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--num-workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("msit: error: run 'truncated'") and "model.embed_dim: 8 -> 16" in err
