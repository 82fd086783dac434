"""Metrics against scikit-learn and brute-force references on seeded random data."""

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import ndcg_score, roc_auc_score

from msit.evaluation.metrics import auc, format_table, gauc, log_loss, ranking_metrics, scene_metrics


def _gauc_reference(labels, scores, users) -> float:
    total, weight = 0.0, 0
    for u in np.unique(users):
        m = users == u
        if labels[m].min() == labels[m].max():
            continue
        total += roc_auc_score(labels[m], scores[m]) * m.sum()
        weight += m.sum()
    return total / weight if weight else math.nan


def _recall_reference(scores, relevant, k) -> float:
    recalls = []
    for s, r in zip(scores, relevant, strict=True):
        if r.sum() == 0:
            continue
        top = sorted(range(len(s)), key=lambda i: -s[i])[:k]
        recalls.append(sum(bool(r[i]) for i in top) / r.sum())
    return sum(recalls) / len(recalls)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 2000)
    s = np.round(rng.random(2000) * 0.5 + 0.3 * y, 1)  # few distinct values: many ties across classes
    assert len(np.unique(s)) < 12
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    assert auc(y.tolist(), s.astype(np.float32)) == pytest.approx(roc_auc_score(y, s.astype(np.float32)), rel=1e-12)


def test_auc_edge_cases():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))
    assert math.isnan(auc([], []))
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert auc([True, False, True], [0.9, 0.1, 0.8]) == 1.0
    assert auc([1, 0], [0.1, 0.9]) == 0.0
    with pytest.raises(ValueError):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        auc([0, 1, 1], [0.1, 0.2])


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 5000)
    p = rng.uniform(0.01, 0.99, 5000)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p), rel=1e-12)


def test_log_loss_clips():
    eps = 1e-7
    assert log_loss([1, 0], [0.0, 1.0], eps=eps) == pytest.approx(-math.log(eps), rel=1e-9)
    assert log_loss([1, 0], [1.0, 0.0]) == pytest.approx(-math.log1p(-1e-7), rel=1e-9)
    assert math.isnan(log_loss([], []))


@pytest.mark.parametrize("seed", [0, 1])
def test_gauc_matches_per_user_reference(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    users = rng.integers(0, 150, n)
    y = rng.integers(0, 2, n)
    y[users < 10] = 1  # some users with a single class, to be skipped
    s = np.round(rng.random(n) + 0.2 * y, 1)
    expected = _gauc_reference(y, s, users)
    assert gauc(y, s, users) == pytest.approx(expected, rel=1e-12)
    # user ids of another type, in another order, give the same answer
    assert gauc(y, s, np.array([f"u{x}" for x in users])) == pytest.approx(expected, rel=1e-12)


def test_gauc_differs_from_auc_and_handles_single_class():
    # Each user perfectly ranked but users on different score scales: GAUC 1, global AUC < 1.
    y = np.array([0, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9])
    u = np.array([1, 1, 2, 2])
    assert gauc(y, s, u) == 1.0
    assert auc(y, s) == 0.75
    assert math.isnan(gauc([1, 1, 0], [0.1, 0.2, 0.3], ["a", "a", "b"]))


def test_gauc_on_a_large_input_is_finite_and_between_0_and_1():
    rng = np.random.default_rng(0)
    n = 100_000
    users, y, s = rng.integers(0, 1000, n), rng.integers(0, 2, n), rng.random(n)
    assert 0.45 < gauc(y, s, users) < 0.55  # random scores: about 0.5


@pytest.mark.parametrize("k", [1, 5, 10, 40])
def test_ranking_metrics_match_references(k):
    rng = np.random.default_rng(k)
    scores = rng.random((60, 30))
    relevant = rng.random((60, 30)) < 0.15
    relevant[np.arange(60), rng.integers(0, 30, 60)] = True  # every query has a relevant item
    got = ranking_metrics(scores, relevant, k)
    assert got[f"ndcg@{k}"] == pytest.approx(ndcg_score(relevant, scores, k=k), rel=1e-9)
    assert got[f"recall@{k}"] == pytest.approx(_recall_reference(scores, relevant, k), rel=1e-12)


def test_ranking_metrics_skip_queries_without_relevant_items():
    scores = np.array([[0.9, 0.1, 0.5], [0.3, 0.2, 0.1]])
    relevant = np.array([[False, True, False], [False, False, False]])
    got = ranking_metrics(scores, relevant, 2)
    assert got == {"recall@2": 0.0, "ndcg@2": 0.0}
    got = ranking_metrics(scores, relevant, 3)
    assert got["recall@3"] == 1.0
    assert got["ndcg@3"] == pytest.approx(0.5)  # hit at rank 3: 1/log2(4)
    nothing = ranking_metrics(scores, np.zeros_like(relevant), 2)
    assert math.isnan(nothing["recall@2"]) and math.isnan(nothing["ndcg@2"])


def _scene_data(seed=0, n=4000):
    rng = np.random.default_rng(seed)
    scenes = rng.integers(0, 4, n)  # scene 3 has no name
    users = rng.integers(0, 200, n)
    y = rng.integers(0, 2, n)
    p = np.clip(np.round(rng.random(n) * 0.6 + 0.3 * y, 2), 0.01, 0.99)
    return y, p, scenes, users


def test_scene_metrics_per_scene_equals_subset():
    y, p, scenes, users = _scene_data()
    names = {0: "home", 1: "search", 2: "detail"}
    out = scene_metrics(y.tolist(), p.astype(np.float32), scenes.astype(np.float64), users, names)
    assert list(out["scenes"]) == ["home", "search", "detail", "<unknown>"]
    p32 = p.astype(np.float32).astype(np.float64)
    for idx, name in [*names.items(), (3, "<unknown>")]:
        m = scenes == idx
        got = out["scenes"][name]
        assert got["rows"] == m.sum()
        assert got["positive_rate"] == pytest.approx(y[m].mean(), rel=1e-12)
        assert got["auc"] == pytest.approx(roc_auc_score(y[m], p32[m]), rel=1e-12)
        assert got["logloss"] == pytest.approx(sk_log_loss(y[m], p32[m]), rel=1e-9)
        assert got["gauc"] == pytest.approx(_gauc_reference(y[m], p32[m], users[m]), rel=1e-12)
    assert out["overall"]["rows"] == len(y)
    assert out["overall"]["auc"] == pytest.approx(roc_auc_score(y, p32), rel=1e-12)
    assert out["overall"]["gauc"] == pytest.approx(_gauc_reference(y, p32, users), rel=1e-12)


def test_scene_metrics_single_class_scene_is_nan_and_rejects_fractional_ids():
    out = scene_metrics([1, 1, 0, 1], [0.9, 0.8, 0.2, 0.7], [0, 0, 1, 1], [1, 2, 3, 3], {0: "a", 1: "b"})
    assert math.isnan(out["scenes"]["a"]["auc"]) and math.isnan(out["scenes"]["a"]["gauc"])
    assert out["scenes"]["b"]["auc"] == 1.0
    with pytest.raises(ValueError):
        scene_metrics([1, 0], [0.5, 0.5], [0.5, 1.0], [1, 1], {})


def test_format_table():
    y, p, scenes, users = _scene_data(1)
    out = scene_metrics(y, p, scenes, users, {0: "home", 1: "search", 2: "a_very_long_scene_name"})
    out["scenes"]["home"]["gauc"] = float("nan")
    table = format_table(out)
    lines = table.splitlines()
    assert len(lines) == 1 + 4 + 1
    assert lines[0].split() == ["scene", "rows", "pos%", "AUC", "LogLoss", "GAUC"]
    for name in ["home", "search", "a_very_long_scene_name", "<unknown>"]:
        assert any(line.startswith(name) for line in lines)
    assert lines[-1].startswith("overall")
    assert len({len(line) for line in lines}) == 1  # aligned
    assert "n/a" in next(line for line in lines if line.startswith("home"))
    assert f"{out['overall']['auc']:.4f}" in lines[-1]
