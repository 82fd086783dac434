"""The transfer report: files written, HTML self-contained, numbers consistent with `msit evaluate`."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from msit.data.feature_spec import FEATURE_SPEC_FILE, FeatureSpec
from msit.data.prepared import load_sequences, load_split
from msit.errors import MsitError
from msit.evaluation.report import (
    HISTORY_BUCKET_EDGES,
    bucket_labels,
    bucket_rows,
    build_report,
    history_buckets,
    target_scene_counts,
    target_scene_history,
)
from msit.model.model_dir import load_model_config, load_model_dir
from msit.training.trainer import evaluate


def _train_and_save(prepared, family, directory, train=True):
    from msit.model import ModelConfig, build_for_data
    from msit.model.model_dir import save_model_dir
    from msit.training.trainer import TrainConfig, fit

    spec = FeatureSpec.load(prepared)
    config = ModelConfig(family=family, embed_dim=16, mlp_dims=(32,), history_length=10)  # as `small_model`
    model = build_for_data(config, prepared, spec)
    if train:  # trained as the `small_model` fixture is
        fit(
            model,
            load_split(prepared, "train", spec),
            load_split(prepared, "val", spec),
            spec,
            TrainConfig(epochs=1, batch_size=256, lr=5e-3),
            log=lambda _: None,
        )
    return save_model_dir(directory, model, config, spec)


@pytest.fixture(scope="module")
def ablation_model(small_prepared, tmp_path_factory):
    """`msit_no_transfer` trained one epoch on the same data as `small_model`."""
    _, prepared = small_prepared
    return _train_and_save(prepared, "msit_no_transfer", tmp_path_factory.mktemp("ablation") / "model")


@pytest.fixture(scope="module")
def report(small_model, ablation_model, tmp_path_factory):
    model_dir, prepared = small_model
    out = tmp_path_factory.mktemp("report")
    lines = []
    path = build_report(model_dir, prepared, out, ablation_dir=ablation_model, log=lines.append)
    return path, json.loads((out / "metrics.json").read_text()), lines


def _flat(value, prefix=""):
    """{"a": {"b": 1.0}} -> {"a/b": 1.0}, NaN -> None (as metrics.json stores it)."""
    if isinstance(value, dict):
        return {k: v for key, inner in value.items() for k, v in _flat(inner, f"{prefix}{key}/").items()}
    return {prefix.rstrip("/"): None if isinstance(value, float) and math.isnan(value) else value}


def test_report_writes_every_file(report):
    path, metrics, lines = report
    out = path.parent
    assert path.name == "report.html" and path.is_file()
    for name in ("metrics.json", "transfer_attention.png", "transfer_attention_ablation.png", "auc_by_history.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" or name == "metrics.json", name
    assert metrics["split"] == "test" and metrics["model"]["family"] == "msit"
    assert metrics["ablation"]["family"] == "msit_no_transfer"
    assert any("[4/4]" in line for line in lines)


def test_html_is_self_contained_and_names_every_scene(report, small_model):
    path, _, _ = report
    text = path.read_text()
    spec = FeatureSpec.load(small_model[0])
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:|//|file:)', text)  # nothing to fetch: the file can be mailed
    for scene in spec.scenarios:
        assert scene in text
    assert small_model[0].name in text and "msit_no_transfer" in text


def test_attention_rows_are_distributions(report, small_model):
    _, metrics, _ = report
    spec = FeatureSpec.load(small_model[0])
    attention = metrics["model"]["transfer_attention"]
    assert attention["target_scenes"] == spec.scenarios
    matrix = np.array(attention["matrix"], dtype=float)
    assert matrix.shape == (len(spec.scenarios), len(spec.scenarios))
    present = [i for i, s in enumerate(spec.scenarios) if s in metrics["model"]["metrics"]["scenes"]]
    assert present and (matrix[present] >= 0).all()
    np.testing.assert_allclose(matrix[present].sum(axis=1), 1.0, atol=1e-5)
    # the ablation transfers nothing: all its weight is on the target scene itself
    ablation = np.array(metrics["ablation"]["transfer_attention"]["matrix"], dtype=float)
    np.testing.assert_allclose(ablation[present][:, present], np.eye(len(spec.scenarios))[present][:, present])


def test_history_rows_add_up_to_the_split(report, small_model):
    _, metrics, _ = report
    model_dir, prepared = small_model
    spec = FeatureSpec.load(model_dir)
    data = load_split(prepared, "test", spec)
    history = metrics["model"]["auc_by_history"]
    assert history["buckets"] == bucket_labels(load_model_config(model_dir).history_length)
    for i, scene in enumerate(spec.scenarios):
        rows = sum(b["rows"] for b in history["scenes"].get(scene, []))
        assert rows == int((data.events["scene_id"] == i + 2).sum()), scene
        for bucket in history["scenes"].get(scene, []):  # AUC undefined (null) or a real AUC
            assert bucket["auc"] is None or 0.0 <= bucket["auc"] <= 1.0


def test_metrics_match_evaluate(report, small_model, ablation_model):
    _, metrics, _ = report
    model_dir, prepared = small_model
    for key, directory in (("model", model_dir), ("ablation", ablation_model)):
        loaded = load_model_dir(directory)
        expected = evaluate(loaded.model, load_split(prepared, "test", loaded.spec), loaded.spec)
        got, want = _flat(metrics[key]["metrics"]), _flat(expected)
        assert got.keys() == want.keys(), key
        for name, value in want.items():
            assert got[name] == (value if value is None else pytest.approx(value, rel=1e-9)), f"{key}: {name}"
    assert metrics["model"]["metrics"]["overall"]["auc"] != metrics["ablation"]["metrics"]["overall"]["auc"]


def test_a_known_relatedness_is_held_against_the_heat_map(report, small_model, tmp_path):
    """Given the scenes' true relatedness (a synth.json, its scenes in any order), the report states the rank
    correlation of the mean attention with it and draws it: here the truth is the model's own mean attention
    (Spearman 1) and then its negation (-1), written in reversed scene order to check the alignment."""
    _, metrics, _ = report
    model_dir, prepared = small_model
    scenes = metrics["model"]["transfer_attention"]["target_scenes"]
    attention = np.array(metrics["model"]["transfer_attention"]["matrix"], dtype=float)
    assert np.isfinite(attention).all()
    for sign in (1, -1):
        truth = tmp_path / f"truth{sign}.json"
        reverse = slice(None, None, -1)
        truth.write_text(
            json.dumps({"scenes": scenes[reverse], "scene_relatedness": (sign * attention)[reverse, reverse].tolist()})
        )
        out = tmp_path / f"out{sign}"
        path = build_report(model_dir, prepared, out, log=lambda _: None, relatedness_file=truth)
        got = json.loads((out / "metrics.json").read_text())["relatedness"]
        assert got["spearman"]["model"]["pooled"] == pytest.approx(sign)
        np.testing.assert_allclose(got["matrix"], sign * attention)
        assert (out / "relatedness.png").read_bytes()[:4] == b"\x89PNG"
        assert "true scene relatedness" in path.read_text().lower()
    truth.write_text(
        json.dumps({"scenes": scenes[:-1], "scene_relatedness": [[1.0] * (len(scenes) - 1)] * (len(scenes) - 1)})
    )
    with pytest.raises(MsitError, match=f"no relatedness for scene.*{scenes[-1]}"):
        build_report(model_dir, prepared, tmp_path / "out", log=lambda _: None, relatedness_file=truth)


def test_model_without_attention_gets_a_note(small_model, tmp_path):
    _, prepared = small_model
    baseline = _train_and_save(prepared, "shared_bottom", tmp_path / "baseline", train=False)
    path = build_report(baseline, prepared, tmp_path / "out", split="val", log=lambda _: None)
    metrics = json.loads((path.parent / "metrics.json").read_text())
    assert metrics["model"]["transfer_attention"] is None and metrics["split"] == "val"
    assert not (path.parent / "transfer_attention.png").exists()
    assert "no transfer attention" in path.read_text() and "ablation" not in metrics


def test_other_encoding_is_refused(small_model, tmp_path):
    model_dir, prepared = small_model
    other = shutil.copytree(prepared, tmp_path / "other")
    spec = json.loads((other / FEATURE_SPEC_FILE).read_text())
    name = next(iter(spec["vocabularies"]))
    spec["vocabularies"][name] = [*spec["vocabularies"][name], "a value the model never saw"]
    (other / FEATURE_SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(MsitError, match="--encoding-from") as e:
        build_report(model_dir, other, tmp_path / "out", log=lambda _: None)
    assert str(model_dir) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_target_scene_counts_are_of_the_models_window(small_prepared):
    """Per row: of the user's last N events strictly before the row, those in the row's scene; counted here
    one row at a time from the sequences, against the report's counts from windows cut per batch."""
    _, prepared = small_prepared
    spec = FeatureSpec.load(prepared)
    data = load_split(prepared, "test", spec)
    sequences = load_sequences(prepared)
    offsets, scenes, stamps = (sequences.offsets.numpy(), sequences.scene_ids.numpy(), sequences.timestamps.numpy())
    rows = [
        (int(r), int(t), int(s))
        for r, t, s in zip(data.events["sequence_row"], data.events["timestamp"], data.events["scene_id"], strict=True)
    ][:300]
    for n in (3, 10):
        expected = []
        for row, t, scene in rows:
            user = slice(offsets[row], offsets[row + 1])
            before = scenes[user][stamps[user] < t][-n:]
            expected.append(int((before == scene).sum()))
        assert target_scene_counts(data.select(torch.arange(len(rows))), n).tolist() == expected
        assert max(expected) > 0


def test_history_bucketing_counts_exactly():
    # scene ids: 2 and 3 are scenes, 0 is padding; histories are most recent first
    scene_ids = torch.tensor([2, 3, 2, 2, 3])
    history_scene_ids = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # no history
            [3, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # two in scene 3
            [2, 2, 2, 3, 2, 2, 0, 0, 0, 0, 0, 0],  # five in scene 2
            [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2],  # twelve, but only the first 7 are within history_length
            [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3],  # twelve in scene 3
        ]
    )
    history_length = torch.tensor([0, 3, 6, 7, 12])
    counts = target_scene_history(scene_ids, history_scene_ids, history_length)
    assert counts.tolist() == [0, 2, 5, 7, 12]

    assert HISTORY_BUCKET_EDGES == (0, 1, 3, 6, 11, 21)
    assert bucket_labels(12) == ["0", "1–2", "3–5", "6–10", "11–12"]  # 21+ dropped: it cannot occur
    assert bucket_labels(50) == ["0", "1–2", "3–5", "6–10", "11–20", "21–50"]
    assert bucket_labels(1) == ["0", "1"]
    buckets = history_buckets(counts, 12)
    assert buckets.tolist() == [0, 1, 2, 3, 4]
    assert history_buckets(np.array([0, 1, 2, 3, 5, 6, 10, 11, 20, 21, 50]), 50).tolist() == [
        0,
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
        5,
        5,
    ]
    rows = bucket_rows(scene_ids.numpy(), buckets, 5, {2: "home", 3: "search", 4: "unseen"})
    assert rows == {"home": [1, 0, 1, 1, 0], "search": [0, 1, 0, 0, 1]}


def test_auc_by_bucket_leaves_out_buckets_too_small_to_mean_anything():
    import math

    import numpy as np

    from msit.evaluation.metrics import auc
    from msit.evaluation.report import MIN_BUCKET_ROWS, auc_by_bucket

    rng = np.random.default_rng(0)
    n = MIN_BUCKET_ROWS + 5
    labels = np.r_[rng.integers(0, 2, n), [0, 1, 1]]
    probs = rng.random(n + 3)
    buckets = np.r_[np.zeros(n, dtype=int), [1, 1, 1]]  # bucket 0 is large enough, bucket 1 has 3 rows
    result = auc_by_bucket(labels, probs, np.full(n + 3, 2), buckets, 3, {2: "feed"})
    assert result["feed"][0] == auc(labels[:n], probs[:n])
    assert math.isnan(result["feed"][1]) and math.isnan(result["feed"][2])
