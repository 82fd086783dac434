"""Fine-tuning from a trained model: grown vocabularies, transplanted and frozen weights, a new scene,
and a refresh on a later window through `msit finetune` on Ray Train."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from msit.data import synth
from msit.data.feature_spec import FeatureSpec
from msit.data.prepare import PrepareConfig, prepare
from msit.data.prepared import load_split
from msit.data.spec import SceneLogSpec
from msit.errors import ConfigError, MsitError
from msit.evaluation.metrics import auc
from msit.model import FAMILIES, ModelConfig, build_for_data, build_model
from msit.model.model_dir import load_model_dir, save_model_dir
from msit.model.parameters import declared_names, part_parameters
from msit.training.finetune import FinetuneSpec, check_encoding_extends, start_from
from msit.training.trainer import TrainConfig, fit, predict, select_scenes
from tests.model_helpers import N_ITEMS, SCENES, item_table, tiny_spec

QUIET = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def logs(ray_session, tmp_path_factory):
    """An old log without the last scene and without some items, and the whole log (new scene, new items)."""
    root = tmp_path_factory.mktemp("finetune")
    synth.write(
        synth.SynthConfig(users=400, items=300, scenes=3, events_per_user=25, sparse_scene_share=0.2, seed=5),
        root / "log",
        progress=False,
    )
    spec = SceneLogSpec.load(root / "log" / "spec.yaml")
    events = pd.concat(pd.read_parquet(f) for f in sorted((root / "log").glob("**/*.parquet")))
    new_scene = sorted(events["scenario"].unique())[-1]
    held_out_items = set(events["item_id"].drop_duplicates().sample(30, random_state=0))
    old = events[(events["scenario"] != new_scene) & ~events["item_id"].isin(held_out_items)]
    (root / "old").mkdir()
    old.to_parquet(root / "old" / "part.parquet")
    prepare(PrepareConfig(inputs=[str(root / "old")], out=str(root / "old_prepared"), spec=spec), **QUIET)
    return root, spec, new_scene, {str(i) for i in held_out_items}


@pytest.fixture(scope="module")
def old_model(logs):
    root, _, _, _ = logs
    prepared = root / "old_prepared"
    spec = FeatureSpec.load(prepared)
    config = ModelConfig(embed_dim=16, mlp_dims=(32,), history_length=10)
    model = build_for_data(config, prepared, spec)
    fit(
        model,
        load_split(prepared, "train", spec),
        load_split(prepared, "val", spec),
        spec,
        TrainConfig(epochs=1, batch_size=256, lr=5e-3),
        **QUIET,
    )
    return save_model_dir(root / "old_model", model, config, spec)


@pytest.fixture(scope="module")
def extended(logs, old_model):
    root, spec, _, _ = logs
    out = root / "new_prepared"
    prepare(
        PrepareConfig(
            inputs=[str(root / "log")], out=str(out), spec=spec, encoding_from=str(old_model), extend_vocab=True
        ),
        **QUIET,
    )
    return out


def test_extended_vocabularies_keep_every_old_index_and_append_the_new(logs, old_model, extended):
    _, _, new_scene, held_out_items = logs
    old, new = FeatureSpec.load(old_model), FeatureSpec.load(extended)
    for name, values in old.vocabularies.items():
        assert new.vocabularies[name][: len(values)] == values
    assert new.scenarios == [*old.scenarios, new_scene]
    added = new.vocabularies["item_id"][len(old.vocabularies["item_id"]) :]
    assert held_out_items <= set(added) and not set(added) & set(old.vocabularies["item_id"])
    check_encoding_extends(old_model, new, extended)  # no error (the history length is the model's, not the data's)
    with pytest.raises(MsitError, match="--extend-vocab"):
        check_encoding_extends(extended, old, old_model)  # the other way round is not an extension


def test_extend_vocab_needs_encoding_from(tmp_path):
    with pytest.raises(ConfigError, match="encoding_from"):
        PrepareConfig(inputs=["x"], out=str(tmp_path), extend_vocab=True)


def _tiny_model(family: str, text: bool) -> torch.nn.Module:
    # With text, MSIT also has the optional transfer pair bias (a per-scene part), so every declared part is tried
    config = ModelConfig(
        family=family,
        embed_dim=16,
        mlp_dims=(32,),
        history_length=6,
        use_text=text,
        text_dim=8,
        transfer_pair_bias=text,
    )
    return build_model(
        config,
        tiny_spec(),
        item_table(),
        np.zeros((N_ITEMS, 8), np.float32) if text else None,
        np.zeros((len(SCENES) + 2, 8), np.float32) if text else None,
    )


@pytest.mark.parametrize("text", [False, True], ids=["no text", "text"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_declares_fine_tuned_parts_that_exist_and_hold_its_parameters(family, text):
    """The parts fine-tuning trains are declared by each family as its modules and parameters (so a renamed
    module breaks the declaration here, instead of silently training nothing), and each holds parameters."""
    model = _tiny_model(family, text)
    params = {id(p) for p in model.parameters()}
    head, scene = model.head_parts(), model.scene_parts()
    assert "scene embedding" in head and "scene embedding" in scene
    for label, part in [*head.items(), *((label, p.part) for label, p in scene.items())]:
        held = part_parameters(part)
        assert held and all(id(p) in params for p in held), label
    assert (family == "msit") == ("transfer" in head)
    if "msit" in family:
        assert ("scene text projection" in head) == text
    assert ("transfer pair bias" in scene) == (family == "msit" and text)

    # Each scene's rows: some in every per-row part, and no row of one scene is another scene's.
    scene_ids = range(2, len(SCENES) + 2)
    for label, part in scene.items():
        for p in part_parameters(part.part):
            masks = torch.stack([part.rows(p, [i]) for i in scene_ids])
            assert masks.sum(0).max() <= 1, label
            assert part.scene_id is not None or masks.any(1).all(), label
    towers = {part.scene_id for part in scene.values() if part.scene_id is not None}
    assert not towers or set(scene_ids) <= towers  # a family with whole per-scene parts has one for every scene


def test_a_declared_part_that_holds_no_parameter_is_an_error():
    model = _tiny_model("msit", text=False)
    assert declared_names(model, {"empty": model.interest.empty}, "head part") == {"empty": ["interest.empty"]}
    for part in (model.scenes, torch.nn.Linear(2, 2)):  # no text projection without scene text; not the model's
        with pytest.raises(MsitError, match="MSIT declares head part 'x', which holds no parameter of the model"):
            declared_names(model, {"x": part}, "head part")


def test_head_mode_trains_the_scene_specific_parts_whole_and_freezes_the_rest(old_model, extended):
    spec = FeatureSpec.load(extended)
    old = load_model_dir(old_model)
    model = build_for_data(old.config, extended, spec)
    start_from(model, FinetuneSpec(str(old_model), "head"), spec)
    for whole in (
        model.transfer.layers[0].key_value.weight,
        model.predictor.mlp[0].weight,
        model.interest.empty,
        model.embed.scene.weight,
    ):
        assert whole.requires_grad and getattr(whole, "trained_rows", torch.ones(1, dtype=torch.bool)).all()
    assert not model.interest.encoder[0].query.weight.requires_grad
    known_items = len(old.spec.vocabularies["item_id"])
    item_rows = model.embed.item.weight.trained_rows  # only the new items' rows train
    assert not item_rows[:known_items].any() and item_rows[known_items:].all()


def test_scene_mode_trains_the_new_scene_and_leaves_frozen_weights_and_old_scenes_alone(logs, old_model, extended):
    root, _, new_scene, _ = logs
    spec = FeatureSpec.load(extended)
    old = load_model_dir(old_model)
    torch.manual_seed(0)  # the new rows' initial weights: the same whichever tests ran before
    model = build_for_data(old.config, extended, spec)
    summary = start_from(model, FinetuneSpec(str(old_model), "scene"), spec)
    assert summary.grown["embed.item.weight"] == (
        len(old.spec.vocabularies["item_id"]),
        len(spec.vocabularies["item_id"]),
    )
    assert 0 < summary.trainable < summary.frozen
    assert not model.interest.encoder[0].query.weight.requires_grad
    assert not model.transfer.layers[0].key_value.weight.requires_grad  # shared by every scene
    assert model.embed.scene.weight.trained_rows.tolist() == [False] * (len(spec.scenarios) + 1) + [True]

    new_scene_id = spec.scene_ids([new_scene])
    test_new = select_scenes(load_split(extended, "test", spec), new_scene_id)
    auc_at_start = auc(test_new.events["label"].numpy(), predict(model, test_new))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train = select_scenes(load_split(extended, "train", spec), new_scene_id)
    val = load_split(extended, "val", spec)
    result = fit(model, train, val, spec, TrainConfig(epochs=2, batch_size=128, lr=5e-3, patience=2), **QUIET)
    assert result.best_epoch >= 1

    learned, tuned = old.model.state_dict(), model.state_dict()
    # Every learned weight is exactly as it was (the old scenes' rows of scene tables too); new rows moved.
    for name, weights in learned.items():
        if name not in dict(model.named_buffers()):
            assert torch.equal(tuned[name][: len(weights)] if weights.ndim else tuned[name], weights), name
    for name in ("embed.item.weight", "embed.scene.weight", "interest.empty"):
        fresh = model.get_parameter(name).detach()[len(learned[name]) :]
        assert len(fresh) and not torch.equal(fresh, start[name][len(learned[name]) :]), name

    # The new scene is scored better than before its rows were trained on (its test split is small: over the
    # initial-weight seeds 0-3 the gain was 0.013-0.037); old scenes barely move (they attend to the new scene's
    # interest too) and are not scored worse.
    assert auc(test_new.events["label"].numpy(), predict(model, test_new)) > auc_at_start + 0.005
    old_test = load_split(root / "old_prepared", "test", old.spec)  # old encoding: a prefix of the new one
    before, after = predict(old.model, old_test), predict(model, old_test)
    old_labels = old_test.events["label"].numpy()
    assert np.abs(after - before).mean() < 0.05
    assert auc(old_labels, after) > auc(old_labels, before) - 0.02


def test_start_from_refuses_another_architecture(logs, old_model, extended):
    spec = FeatureSpec.load(extended)
    other = build_for_data(ModelConfig(embed_dim=8, mlp_dims=(32,), history_length=10), extended, spec)
    with pytest.raises(MsitError, match="cannot start"):
        start_from(other, FinetuneSpec(str(old_model)), spec)


def test_finetune_cli_refreshes_on_newer_logs_on_ray_train(logs, old_model, extended, tmp_path):
    """A full refresh on logs with more users, items and a scene: val AUC on them improves on the start."""
    from msit.cli import main

    out = tmp_path / "refreshed"
    config = tmp_path / "refresh.yaml"
    config.write_text(
        f"data: {extended}\noutput: {out}\ntrain: {{epochs: 2, batch_size: 256, lr: 0.005}}\n"
        "scaling: {num_workers: 2, use_gpu: false}\n"
        f"run: {{name: refresh, storage_path: {tmp_path}}}\n"
    )
    code = main(["finetune", "--from", str(old_model), "--config", str(config), "--mode", "full"])
    assert code == 0
    refreshed = load_model_dir(out)
    assert refreshed.info["finetuned_from"] == {"from_model": str(old_model), "mode": "full"}
    history = json.loads((tmp_path / "refreshed_training" / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1, 2]  # epoch 0: the starting model on the new window
    start, best = history[0]["val_auc"], max(row["val_auc"] for row in history)
    assert best > start  # training on the new window helped
    assert refreshed.info["train"]["best_val_auc"] == pytest.approx(best)


@pytest.mark.parametrize(
    "data, message",
    [("new_prepared_missing", "feature_spec.json"), ("old_prepared", "no scene new to")],
    ids=["data not prepared", "scene mode without a scene to tune"],
)
def test_finetune_cli_refuses_before_training(logs, old_model, tmp_path, capsys, data, message):
    from msit.cli import main

    root, _, _, _ = logs
    code = main(
        [
            "finetune",
            "--from",
            str(old_model),
            "--data",
            str(root / data),
            "--output",
            str(tmp_path / "x"),
            "--use-gpu",
            "false",
        ]
    )
    assert code == 1
    assert message in capsys.readouterr().err
