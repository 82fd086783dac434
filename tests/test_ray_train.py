"""Ray Train: 2-worker CPU runs that learn, checkpoint every epoch, survive a dead worker and export a model."""

import json

from msit.data.feature_spec import FeatureSpec
from msit.model import ModelConfig
from msit.model_dir import load_model_dir
from msit.ray_train import RunSpec, ScalingSpec, TrainRunConfig, run_outputs_dir, run_training
from msit.trainer import TrainConfig, evaluate, load_split


def _config(prepared, tmp_path, name, epochs, **run):
    return TrainRunConfig(
        data=str(prepared), output=str(tmp_path / "model"),
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
