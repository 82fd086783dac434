"""The serving scorer without Ray or HTTP: the same scores as offline, explanations, out-of-vocabulary ids, errors."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from msit.data.feature_spec import FeatureSpec
from msit.model_dir import load_model_dir
from msit.serving.history_store import InMemoryHistoryStore
from msit.serving.scorer import RequestError, Scorer
from msit.trainer import load_split, predict


@pytest.fixture(scope="module")
def scorer(small_model):
    model_dir, prepared = small_model
    spec = FeatureSpec.load(prepared)
    # Every event kept, so that a past row's history can be rebuilt from the store at that row's moment.
    store = InMemoryHistoryStore.from_prepared(prepared, spec, events_per_user=10_000)
    return Scorer(model_dir, store, max_candidates=50, catalogue_from=prepared)


def _test_rows(prepared, count=40):
    table = pq.read_table(prepared / "test")
    rows = {name: list(np.stack(table.column(name).to_numpy(zero_copy_only=False)))
            if name.startswith("history_") and name != "history_length" else table.column(name).to_numpy()
            for name in table.column_names}
    return pd.DataFrame(rows).sample(count, random_state=0)


def _context(spec, row):
    return {c: spec.vocabularies[c][getattr(row, c)] for c, f in spec.fields.items()
            if f.role == "context" and getattr(row, c) >= 2}


def test_scores_equal_the_offline_model_on_the_same_rows(scorer, small_model):
    model_dir, prepared = small_model
    spec = FeatureSpec.load(prepared)
    rows = _test_rows(prepared)
    requests = [{"user_id": r.user_key, "scenario": spec.scenarios[r.scene_id - 2], "candidates": [r.item_key],
                 "timestamp": int(r.timestamp), "context": _context(spec, r)} for r in rows.itertuples()]
    served = [s.scores[0] for s in scorer.score(requests)]

    test = load_split(prepared, "test", spec)
    offline = predict(load_model_dir(model_dir).model, {k: v[rows.index.to_numpy()] for k, v in test.items()})
    np.testing.assert_allclose(served, offline, rtol=0, atol=1e-6)
    assert (rows["history_length"] > 0).mean() > 0.8  # the histories really came from the store


def test_a_history_in_the_request_is_used_as_given(scorer, small_model):
    model_dir, prepared = small_model
    spec = FeatureSpec.load(prepared)
    row = next(r for r in _test_rows(prepared).itertuples() if r.history_length >= 3)
    items, scenes = spec.vocabularies["item_id"], spec.scenarios
    history = [{"item_id": items[i], "scenario": scenes[s - 2], "label": int(lab),
                "timestamp": int(row.timestamp - gap)}
               for i, s, lab, gap in zip(row.history_item_ids, row.history_scene_ids, row.history_labels,
                                         row.history_time_gaps, strict=True)][: row.history_length]
    base = {"user_id": row.user_key, "scenario": scenes[row.scene_id - 2], "candidates": [row.item_key],
            "timestamp": int(row.timestamp), "context": _context(spec, row)}
    from_store, given, shuffled, none = scorer.score([base, {**base, "history": history},
                                                      {**base, "history": history[::-1]}, {**base, "history": []}])
    assert given.scores == pytest.approx(from_store.scores, abs=1e-6) == shuffled.scores  # order does not matter
    assert none.scores != given.scores  # an empty history is a real (cold) history, not "use the store"


def test_explanations_are_distributions_over_scenes_and_past_events(scorer, small_model):
    _, prepared = small_model
    spec = FeatureSpec.load(prepared)
    row = next(r for r in _test_rows(prepared).itertuples() if r.history_length >= 6)
    result, = scorer.score([{"user_id": row.user_key, "scenario": spec.scenarios[row.scene_id - 2],
                             "candidates": [row.item_key, "never-seen-item"], "timestamp": int(row.timestamp),
                             "explain": True}])
    assert len(result.explanations) == 2
    for explanation in result.explanations:
        transfer = explanation["transfer_attention"]
        assert set(transfer) == set(spec.scenarios) and min(transfer.values()) >= 0
        assert sum(transfer.values()) == pytest.approx(1.0, abs=1e-5)
        top = explanation["top_history"]
        assert 1 <= len(top) <= 5 and all(t["scenario"] in spec.scenarios for t in top)
        weights = [t["weight"] for t in top]
        assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1 + 1e-5


def test_unknown_users_and_items_are_scored_as_out_of_vocabulary(scorer):
    result, = scorer.score([{"user_id": "nobody", "scenario": scorer.spec.scenarios[0],
                             "candidates": ["no-such-item", "another"], "timestamp": 10**10}])
    assert len(result.scores) == 2 and all(0 < s < 1 for s in result.scores)
    assert result.scores[0] == result.scores[1] and result.oov_ids == 3


@pytest.mark.parametrize("change, field, message", [
    ({"scenario": "moon"}, ("scenario",), "unknown scenario 'moon'"),
    ({"candidates": []}, ("candidates",), "candidates is empty"),
    ({"candidates": ["x"] * 51}, ("candidates",), "at most 50 candidates per request, got 51"),
    ({"context": {"weather": "rain"}}, ("context", "weather"), "unknown context feature 'weather'"),
    ({"history": [{"item_id": "1", "scenario": "moon", "timestamp": 1}]}, ("history", 0, "scenario"),
     "unknown scenario"),
])
def test_client_mistakes_name_their_field_and_do_not_fail_other_requests(scorer, change, field, message):
    good = {"user_id": "1", "scenario": scorer.spec.scenarios[0], "candidates": ["1"]}
    bad, ok = scorer.score([{**good, **change}, good])
    assert isinstance(bad, RequestError) and bad.field == field and message in bad.message
    assert len(ok.scores) == 1


def test_recommend_ranks_the_scene_catalogue_without_seen_items(scorer, small_model):
    _, prepared = small_model
    user = next(iter(pq.read_table(prepared / "train", columns=["user_key"]).column(0).to_pylist()))
    scene = scorer.spec.scenarios[0]
    top, size = scorer.recommend({"user_id": user, "scenario": scene, "k": 5, "exclude_seen": True})
    assert len(top) == 5 and [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    seen = {scorer.spec.vocabularies["item_id"][i] for i in scorer.store.user(user).item_ids}
    assert not seen & {t["item_id"] for t in top}
    _, everything = scorer.recommend({"user_id": user, "scenario": scene, "k": 5, "exclude_seen": False})
    assert everything > size


def test_the_store_keeps_each_user_feature_in_its_own_dtype(small_model, tmp_path):
    """A numeric user feature beside categorical ones must not turn the categorical ids into floats."""
    import shutil

    _, prepared = small_model
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    spec = FeatureSpec.load(copy)
    users = pd.read_parquet(copy / "users.parquet")
    users["score"] = np.linspace(0, 1, len(users)).astype(np.float32)
    users.to_parquet(copy / "users.parquet")
    spec.fields["score"] = type(spec.fields["user_id"])(role="user", type="numeric", mean=0.5, std=0.3)
    record = next(iter(InMemoryHistoryStore.from_prepared(copy, spec)._records.values()))
    categorical = [c for c, f in spec.fields.items() if f.role == "user" and f.type == "categorical"]
    assert categorical and all(record.features[c].dtype == np.int64 for c in categorical)
    assert record.features["score"].dtype == np.float32
