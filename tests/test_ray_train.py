"""Ray Train: a 2-worker CPU run that learns, checkpoints every epoch and exports a loadable model."""

from msit.data.feature_spec import FeatureSpec
from msit.model import ModelConfig
from msit.model_dir import load_model_dir
from msit.ray_train import RunSpec, ScalingSpec, TrainRunConfig, run_training
from msit.trainer import TrainConfig, evaluate, load_split


def test_two_workers_learn_and_export_the_best_checkpoint(small_prepared, tmp_path):
    _, prepared = small_prepared
    cfg = TrainRunConfig(
        data=str(prepared), output=str(tmp_path / "model"),
        model=ModelConfig(embed_dim=16, mlp_dims=(32,)),
        train=TrainConfig(epochs=5, batch_size=256, lr=5e-3, patience=5),
        scaling=ScalingSpec(num_workers=2, use_gpu=False, cpus_per_worker=1),
        run=RunSpec(name="two-workers", storage_path=str(tmp_path / "ray_results"), keep_checkpoints=1),
    )
    out = run_training(cfg, log=lambda _: None)
    loaded = load_model_dir(out)
    info = loaded.info["train"]
    assert 1 <= info["best_epoch"] <= 5 and info["epoch"] == info["best_epoch"]
    # Chance is 0.5; ~1,000 validation rows put a random scorer's std near 0.018, so 0.6 is over 5 std away.
    assert info["best_val_auc"] > 0.6
    spec = FeatureSpec.load(prepared)
    val = load_split(prepared, "val", spec)
    assert evaluate(loaded.model, val, spec)["overall"]["auc"] == info["val_auc"]  # the exported weights are those
