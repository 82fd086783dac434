"""The single-process trainer and `msit evaluate`, on a small prepared synthetic log."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from msit.cli import main
from msit.data.feature_spec import FeatureSpec
from msit.data.prepare import PrepareConfig, prepare
from msit.data.prepared import load_split
from msit.errors import MsitError
from msit.model import FAMILIES, ModelConfig, build_model, load_item_table
from msit.model.baselines import _StarLinear
from msit.model.model_dir import load_model_dir, save_model_dir
from msit.training.trainer import TrainConfig, evaluate, fit, make_optimizer, seed_everything
from tests.model_helpers import N_ITEMS, SCENES, item_table, tiny_spec


@pytest.fixture(scope="module")
def data(small_prepared):
    _, prepared = small_prepared
    spec = FeatureSpec.load(prepared)
    return prepared, spec, {s: load_split(prepared, s, spec) for s in ("train", "val", "test")}


def _fit(data, seed=0, epochs=2, family="msit", lr=2e-3):
    prepared, spec, splits = data
    seed_everything(seed)
    model = build_model(ModelConfig(embed_dim=16, mlp_dims=(32,), family=family), spec, load_item_table(prepared, spec))
    cfg = TrainConfig(epochs=epochs, seed=seed, batch_size=256, lr=lr)
    result = fit(model, splits["train"], splits["val"], spec, cfg, log=lambda _: None)
    return model, result


def test_training_is_deterministic_with_a_seed(data):
    _, a = _fit(data, seed=1)
    _, b = _fit(data, seed=1)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert a.best_val["overall"]["auc"] == b.best_val["overall"]["auc"]


def test_msit_learns_the_synthetic_signal(data):
    _, spec, splits = data
    model, result = _fit(data, epochs=4, lr=5e-3)
    # Chance is 0.5: with ~1,000 rows per split a random scorer's AUC has a std of about 0.018, so 0.6 is
    # over 5 std away. (This small log trains 31 steps an epoch; the bar is about learning at all.)
    assert result.best_val["overall"]["auc"] > 0.6
    test = evaluate(model, splits["test"], spec)
    assert set(test["scenes"]) == set(spec.scenarios)
    assert test["overall"]["auc"] > 0.6


def test_early_stopping_keeps_the_best_epoch(data):
    _, result = _fit(data, epochs=3)
    best = max(h["val_auc"] for h in result.history)
    assert result.best_val["overall"]["auc"] == best
    assert result.history[result.best_epoch - 1]["val_auc"] == best


def test_evaluate_command_prints_the_per_scene_table(data, small_prepared, tmp_path, capsys):
    prepared, spec, _ = data
    model, _ = _fit(data, epochs=1)
    save_model_dir(tmp_path / "model", model, ModelConfig(embed_dim=16, mlp_dims=(32,)), spec)
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(prepared),
                "--json",
                str(tmp_path / "m.json"),
                "--ranking-k",
                "5",
                "--ranking-queries",
                "20",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert all(scene in out for scene in spec.scenarios) and "overall" in out and "GAUC" in out
    ranking = json.loads((tmp_path / "m.json").read_text())["ranking"]
    assert set(ranking) <= set(spec.scenarios) and ranking
    assert all(0 <= m["recall@5"] <= 1 and 0 <= m["ndcg@5"] <= 1 and m["queries"] <= 20 for m in ranking.values())

    # New logs encoded with the model's vocabularies evaluate; a differently encoded directory is refused.
    log, _ = small_prepared
    again = prepare(
        PrepareConfig(inputs=[str(log)], out=str(tmp_path / "again"), encoding_from=str(tmp_path / "model")),
        log=lambda _: None,
    )
    assert again.feature_spec.fingerprint() == load_model_dir(tmp_path / "model").spec.fingerprint()
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "again")]) == 0
    other = prepare(PrepareConfig(inputs=[str(log)], out=str(tmp_path / "other"), min_count=3), log=lambda _: None)
    assert other.feature_spec.fingerprint() != spec.fingerprint()
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "other")]) == 1
    assert "--encoding-from" in capsys.readouterr().err


def test_deterministic_kernels_by_default_on_the_cpu_only_and_compile_when_asked():
    import torch

    from msit.training.trainer import prepare_for_training
    from tests.model_helpers import item_table, tiny_spec

    model = build_model(ModelConfig(embed_dim=16, history_length=6), tiny_spec(), item_table())
    try:
        prepare_for_training(model, TrainConfig(), torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
        prepare_for_training(model, TrainConfig(), torch.device("cuda"))  # a device object: no GPU needed
        assert not torch.are_deterministic_algorithms_enabled()
        prepare_for_training(model, TrainConfig(deterministic=True), torch.device("cuda"))
        assert torch.are_deterministic_algorithms_enabled()
        assert model._compiled_call_impl is None
        prepare_for_training(model, TrainConfig(compile=True), torch.device("cpu"))
        assert model._compiled_call_impl is not None  # compiled in place: the state dict keeps its names
        assert not any(k.startswith("_orig_mod") for k in model.state_dict())
    finally:
        seed_everything(0)  # deterministic again, as every other test expects


def _tiny_model(family: str) -> nn.Module:
    """A model of `family` with every optional part: numeric item features, item and scene text, scene bias."""
    config = ModelConfig(family=family, embed_dim=16, mlp_dims=(32,), history_length=6, use_text=True, text_dim=8)
    return build_model(
        config,
        tiny_spec(),
        item_table(),
        np.zeros((N_ITEMS, 8), np.float32),
        np.zeros((len(SCENES) + 2, 8), np.float32),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_decay_goes_to_matmul_weights_and_never_to_tables_biases_or_norms(family):
    model = _tiny_model(family)
    decay, no_decay = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    groups = Counter(id(p) for group in (decay, no_decay) for p in group["params"])
    assert set(groups) == {id(p) for p in model.parameters()} and set(groups.values()) == {1}  # each in one group
    decayed = {id(p) for p in decay["params"]}

    # Decayed: the weight of every nn.Linear (those under `embed.` too) and STAR's per-scene weight factors.
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    star = {id(m.scene_weight) for m in model.modules() if isinstance(m, _StarLinear)}
    assert decayed == linear | star
    embed = model.embed if "msit" in family else model.inputs.embed
    assert {id(embed.text_projection.weight), id(embed.numeric["item"].weight)} <= decayed
    # Never decayed: embedding tables (label, time gap, position, scene bias among them), biases, norms, vectors.
    never = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    never += [m.bias for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    never += [p for m in model.modules() if isinstance(m, nn.LayerNorm | nn.BatchNorm1d) for p in m.parameters()]
    never += [p for p in model.parameters() if p.ndim < 2]
    if "msit" in family:
        never += [model.interest.empty, model.predictor.scene_bias.weight, model.interest.position.weight]
    if family == "star":
        never += [model.norm.scene_gamma, model.norm.scene_beta, *(layer.scene_bias for layer in model.layers)]
    assert never and not any(id(p) in decayed for p in never)


def test_frozen_parameters_are_left_out_and_partly_trained_ones_are_not_decayed():
    model = _tiny_model("msit")
    frozen, partly = model.interest.query.weight, model.transfer.query.weight
    frozen.requires_grad_(False)
    partly.trained_rows = torch.arange(len(partly)) < 3
    decay, no_decay = make_optimizer(model, TrainConfig()).param_groups
    assert all(p is not frozen for p in decay["params"] + no_decay["params"])
    assert any(p is partly for p in no_decay["params"]) and all(p is not partly for p in decay["params"])


def test_a_parameter_of_no_declared_kind_is_an_error():
    model = _tiny_model("msit")
    model.interest.extra = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(MsitError, match=r"InterestNetwork\.extra is an nn\.Parameter of no declared kind"):
        make_optimizer(model, TrainConfig())
