"""The serving scorer without Ray or HTTP: the same scores as offline, explanations, out-of-vocabulary ids, errors."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from msit.data.feature_spec import FeatureSpec
from msit.data.prepared import SEQUENCES_DIR, load_split
from msit.data.schema import scene_slot
from msit.model.model_dir import load_model_config, load_model_dir
from msit.serving.history_store import InMemoryHistoryStore
from msit.serving.scorer import RequestError, Scored, Scorer, ScoringError
from msit.training.trainer import predict
from tests.serving_helpers import MEAN, NUMERIC_CONTEXT, STD, nan_weights, numeric_context_model


@pytest.fixture(scope="module")
def scorer(small_model):
    model_dir, prepared = small_model
    spec = FeatureSpec.load(prepared)
    # Every event kept, so that a past row's history can be rebuilt from the store at that row's moment.
    store = InMemoryHistoryStore.from_prepared(prepared, spec)
    return Scorer(model_dir, store, max_candidates=50, catalogue_from=prepared)


def _test_rows(small_model, count=40):
    """A sample of the test split's rows, each with its raw user and item keys and the window training cuts for
    it (the model's history length); indexed by row number in the split."""
    model_dir, prepared = small_model
    spec = FeatureSpec.load(prepared)
    test = load_split(prepared, "test", spec)
    rows = next(test.batches(len(test), load_model_config(model_dir).history_length))
    keys = pq.read_table(prepared / SEQUENCES_DIR, columns=["sequence_row", "user_key"]).to_pandas()
    user_keys = keys.set_index("sequence_row").user_key.sort_index().to_numpy()
    items = spec.vocabularies["item_id"]
    frame = pd.DataFrame({name: list(v.numpy()) if v.ndim == 2 else v.numpy() for name, v in rows.items()})
    frame["user_key"] = user_keys[test.events["sequence_row"].numpy()]
    frame["item_key"] = [items[i] if i >= 2 else "never-seen-item" for i in frame["item_id"]]  # any unknown key
    frame["timestamp"] = test.events["timestamp"].numpy()
    return frame.sample(count, random_state=0)


def _context(spec, row):
    return {
        c: spec.vocabularies[c][getattr(row, c)]
        for c, f in spec.fields.items()
        if f.role == "context" and getattr(row, c) >= 2
    }


def test_scores_equal_the_offline_model_on_the_same_rows(scorer, small_model):
    model_dir, prepared = small_model
    spec = FeatureSpec.load(prepared)
    rows = _test_rows(small_model)
    requests = [
        {
            "user_id": r.user_key,
            "scenario": spec.scenarios[scene_slot(r.scene_id)],
            "candidates": [r.item_key],
            "timestamp": int(r.timestamp),
            "context": _context(spec, r),
        }
        for r in rows.itertuples()
    ]
    served = [s.scores[0] for s in scorer.score(requests)]

    offline = _offline(model_dir, prepared, rows)
    np.testing.assert_allclose(served, offline, rtol=0, atol=1e-6)
    assert (rows["history_length"] > 0).mean() > 0.8  # the histories really came from the store


def test_a_history_in_the_request_is_used_as_given(scorer, small_model):
    _, prepared = small_model
    spec = FeatureSpec.load(prepared)
    row = next(r for r in _test_rows(small_model).itertuples() if r.history_length >= 3)
    items, scenes = spec.vocabularies["item_id"], spec.scenarios
    history = [
        {"item_id": items[i], "scenario": scenes[s - 2], "label": int(lab), "timestamp": int(row.timestamp - gap)}
        for i, s, lab, gap in zip(
            row.history_item_ids, row.history_scene_ids, row.history_labels, row.history_time_gaps, strict=True
        )
    ][: row.history_length]
    base = {
        "user_id": row.user_key,
        "scenario": scenes[scene_slot(row.scene_id)],
        "candidates": [row.item_key],
        "timestamp": int(row.timestamp),
        "context": _context(spec, row),
    }
    from_store, given, shuffled, none = scorer.score(
        [base, {**base, "history": history}, {**base, "history": history[::-1]}, {**base, "history": []}]
    )
    assert given.scores == pytest.approx(from_store.scores, abs=1e-6) == shuffled.scores  # order does not matter
    assert none.scores != given.scores  # an empty history is a real (cold) history, not "use the store"


def test_explanations_are_distributions_over_scenes_and_past_events(scorer, small_model):
    _, prepared = small_model
    spec = FeatureSpec.load(prepared)
    row = next(r for r in _test_rows(small_model).itertuples() if r.history_length >= 6)
    (result,) = scorer.score(
        [
            {
                "user_id": row.user_key,
                "scenario": spec.scenarios[scene_slot(row.scene_id)],
                "candidates": [row.item_key, "never-seen-item"],
                "timestamp": int(row.timestamp),
                "explain": True,
            }
        ]
    )
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
    (result,) = scorer.score(
        [
            {
                "user_id": "nobody",
                "scenario": scorer.spec.scenarios[0],
                "candidates": ["no-such-item", "another"],
                "timestamp": 10**10,
            }
        ]
    )
    assert len(result.scores) == 2 and all(0 < s < 1 for s in result.scores)
    assert result.scores[0] == result.scores[1] and result.oov_ids == 3


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"scenario": "moon"}, ("scenario",), "unknown scenario 'moon'"),
        ({"candidates": []}, ("candidates",), "candidates is empty"),
        ({"candidates": ["x"] * 51}, ("candidates",), "at most 50 candidates per request, got 51"),
        ({"context": {"weather": "rain"}}, ("context", "weather"), "unknown context feature 'weather'"),
        (
            {"history": [{"item_id": "1", "scenario": "moon", "timestamp": 1}]},
            ("history", 0, "scenario"),
            "unknown scenario",
        ),
    ],
)
def test_client_mistakes_name_their_field_and_do_not_fail_other_requests(scorer, change, field, message):
    good = {"user_id": "1", "scenario": scorer.spec.scenarios[0], "candidates": ["1"]}
    bad, ok = scorer.score([{**good, **change}, good])
    assert isinstance(bad, RequestError) and bad.field == field and message in bad.message
    assert len(ok.scores) == 1


def test_recommend_ranks_the_scene_catalogue_without_seen_items(scorer, small_model):
    _, prepared = small_model
    user = next(iter(pq.read_table(prepared / SEQUENCES_DIR, columns=["user_key"]).column(0).to_pylist()))
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
    store = InMemoryHistoryStore.from_prepared(copy, spec)
    record = store.user(next(iter(store)))
    categorical = [c for c, f in spec.fields.items() if f.role == "user" and f.type == "categorical"]
    assert categorical and all(record.features[c].dtype == np.int64 for c in categorical)
    assert record.features["score"].dtype == np.float32


def _offline(model_dir, prepared, rows):
    spec = FeatureSpec.load(prepared)
    test = load_split(prepared, "test", spec)
    return predict(load_model_dir(model_dir).model, test.select(torch.as_tensor(rows.index.to_numpy())))


def test_a_poisoned_request_fails_alone_and_the_others_get_the_offline_scores(scorer, small_model):
    """Requests past the HTTP schema (a library caller, or a schema gap) are still isolated within a batch."""
    model_dir, prepared = small_model
    spec = FeatureSpec.load(prepared)
    rows = _test_rows(small_model, count=6)
    good = [
        {
            "user_id": r.user_key,
            "scenario": spec.scenarios[scene_slot(r.scene_id)],
            "candidates": [r.item_key],
            "timestamp": int(r.timestamp),
            "context": _context(spec, r),
        }
        for r in rows.itertuples()
    ]
    base, scene = good[0], spec.scenarios[0]
    poisoned = [
        {**base, "candidates": ["\ud800"]},
        {**base, "user_id": "\udfff"},
        {**base, "timestamp": 2**63},
        {**base, "history": [{"item_id": "\ud800", "scenario": scene, "timestamp": 1}]},
        {**base, "history": [{"item_id": "1", "scenario": scene, "timestamp": 2**64}]},
        {**base, "timestamp": float("nan")},
        {**base, "context": {"\ud800": 1}},
    ]
    batch = [good[0], *poisoned[:3], good[1], good[2], *poisoned[3:], *good[3:]]  # poison among the good
    results = scorer.score(batch)
    assert len(results) == len(batch)
    served = [results[batch.index(g)].scores[0] for g in good]
    np.testing.assert_allclose(served, _offline(model_dir, prepared, rows), rtol=0, atol=1e-6)
    failed = [results[next(j for j, r in enumerate(batch) if r is p)] for p in poisoned]
    assert isinstance(failed[0], ScoringError) and "UnicodeEncodeError" in str(failed[0])  # the schema says 422
    assert isinstance(failed[1], ScoringError)
    assert isinstance(failed[2], RequestError) and failed[2].field == ("timestamp",)
    assert "timestamp must be an integer from 0 to 2^63-1" in failed[2].message
    assert isinstance(failed[3], ScoringError)
    assert isinstance(failed[4], RequestError) and failed[4].field == ("history", 0, "timestamp")
    assert isinstance(failed[5], RequestError) and failed[5].field == ("timestamp",)
    assert isinstance(failed[6], RequestError) and failed[6].field == ("context", "\ud800")


class _Faulty(torch.nn.Module):
    """The model, except on candidates holding the poison item: scoring raises, or gives NaN there."""

    def __init__(self, model, poison: int, nan: bool):
        super().__init__()
        self.model, self.poison, self.nan = model, poison, nan

    def encode_user(self, batch):
        return self.model.encode_user(batch)

    def score(self, user, item_ids, explain=False):
        hit = item_ids == self.poison
        if hit.any() and not self.nan:
            raise RuntimeError("simulated fault in the forward pass")
        output = self.model.score(user, item_ids, explain)
        output.logits[hit] = float("nan")
        return output


@pytest.mark.parametrize("nan, message", [(False, "could not be scored (RuntimeError)"), (True, "non-finite score")])
def test_a_request_that_breaks_the_forward_pass_fails_alone(scorer, monkeypatch, nan, message):
    items = scorer.spec.vocabularies["item_id"]
    good = [
        {"user_id": "1", "scenario": scorer.spec.scenarios[0], "candidates": items[2 + i : 4 + i], "timestamp": 10**9}
        for i in range(4)
    ]
    alone = [scorer.score([g])[0].scores for g in good]
    poison = {**good[0], "candidates": [items[2], items[20]]}
    monkeypatch.setattr(scorer, "model", _Faulty(scorer.model, poison=20, nan=nan))  # items[20] is id 20
    results = scorer.score([good[0], good[1], poison, good[2], good[3]])
    assert isinstance(results[2], ScoringError) and message in str(results[2])
    np.testing.assert_allclose([r.scores for r in results[:2] + results[3:]], alone, rtol=0, atol=1e-6)


def test_timestamp_zero_is_1970_not_now(scorer):
    user = next(u for u in scorer.store if len(scorer.store.user(u).item_ids) >= 3)
    base = {"user_id": user, "scenario": scorer.spec.scenarios[0], "candidates": ["1", "2"]}
    at_zero, cold_at_zero, now = scorer.score([{**base, "timestamp": 0}, {**base, "timestamp": 0, "history": []}, base])
    assert at_zero.scores == cold_at_zero.scores  # no event is before 1970: the history is empty
    assert now.scores != at_zero.scores  # "now" sees the user's history


def test_the_self_test_scores_a_tiny_request_and_fails_on_a_model_that_cannot(
    scorer, small_model, tmp_path, monkeypatch
):
    scorer.self_test()
    broken = Scorer(nan_weights(small_model[1], tmp_path / "nan"))  # loads fine
    with pytest.raises(ScoringError, match=r"self-test failed.*non-finite"):
        broken.self_test()
    monkeypatch.setattr(scorer, "model", _Faulty(scorer.model, poison=2, nan=False))
    with pytest.raises(RuntimeError, match="simulated fault"):
        scorer.self_test()


@pytest.fixture(scope="module")
def numeric_scorer(small_model, tmp_path_factory):
    _, prepared = small_model
    return Scorer(numeric_context_model(prepared, tmp_path_factory.mktemp("numeric") / "model"))


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf"), 1e300, -1e40, MEAN + 2e6 * STD, 10**400, "warm", True]
)
def test_numeric_context_must_stay_finite_once_standardised(numeric_scorer, value):
    good = {"user_id": "1", "scenario": numeric_scorer.spec.scenarios[0], "candidates": ["1"]}
    bad, ok, far = numeric_scorer.score(
        [{**good, "context": {NUMERIC_CONTEXT: value}}, good, {**good, "context": {NUMERIC_CONTEXT: MEAN - 1e6 * STD}}]
    )
    assert isinstance(bad, RequestError) and bad.field == ("context", NUMERIC_CONTEXT), bad
    assert (
        "must be a number"
        if isinstance(value, str | bool)
        else f"within 1e+06 standard deviations of its training mean (mean {MEAN:g}, std {STD:g})"
    ) in bad.message
    assert len(bad.message) < 300  # a 400-digit int is cut short in the message
    assert isinstance(ok, Scored) and isinstance(far, Scored) and all(0 <= x <= 1 for x in far.scores)


def test_request_ids_are_normalised_as_prepare_normalises_them(scorer, small_model):
    """7, 7.0, "7" and " 7 " are one id in the scene logs; serving finds the same user and items for each."""
    _, prepared = small_model
    spec = FeatureSpec.load(prepared)
    row = next(r for r in _test_rows(small_model).itertuples() if r.history_length >= 3 and r.item_id >= 2)
    user, item = int(row.user_key), int(row.item_key)
    base = {"scenario": spec.scenarios[scene_slot(row.scene_id)], "timestamp": int(row.timestamp)}
    spellings = [(user, item), (str(user), str(item)), (float(user), float(item)), (f" {user}.0 ", f" {item} ")]
    scored = scorer.score([{**base, "user_id": u, "candidates": [i]} for u, i in spellings])
    assert all(s.oov_ids == 0 for s in scored)
    assert len({s.scores[0] for s in scored}) == 1


def test_serving_encodes_raw_values_as_prepare_encoded_them(ray_session, tmp_path):
    """Booleans, integer-looking floats and ids in whitespace, as Parquet holds them: a request that spells them
    as a client would gets the codes prepare wrote for them (ids, a categorical and a multi-valued context)."""
    from msit.data.prepare import PrepareConfig, prepare
    from msit.data.spec import FeatureGroup, SceneLogSpec
    from msit.model import ModelConfig, build_for_data
    from msit.model.model_dir import save_model_dir

    n = 10  # events per user
    users = {" alice ": (True, "x| y"), "1 ": (False, "y")}  # user -> (flag, tags), one context per user
    log = pd.DataFrame(
        [
            {
                "user_id": user,
                "item_id": float(7 + i % 3),
                "scenario": f"s{i % 2}",
                "label": i % 2,
                "timestamp": 1_000 + 10 * i,
                "split": "train" if i < n - 2 else ("val", "test")[i - n + 2],
                "flag": flag,
                "tags": tags,
            }
            for user, (flag, tags) in users.items()
            for i in range(n)
        ]
    )
    (tmp_path / "log").mkdir()
    log.to_parquet(tmp_path / "log" / "part-0.parquet")
    spec = SceneLogSpec(context=FeatureGroup(categorical=["flag"], multi={"tags": "|"}))
    prepared = tmp_path / "prepared"
    prepare(PrepareConfig(inputs=[str(tmp_path / "log")], out=str(prepared), spec=spec), log=lambda _: None)
    feature_spec = FeatureSpec.load(prepared)
    config = ModelConfig(embed_dim=8, mlp_dims=(8,))
    model_dir = save_model_dir(tmp_path / "model", build_for_data(config, prepared, feature_spec), config, feature_spec)
    scorer = Scorer(model_dir)

    events = pd.concat([pd.read_parquet(prepared / split) for split in ("train", "val", "test")])
    user_codes = pd.read_parquet(prepared / "users.parquet").set_index("user_key").user_id
    item_codes = pd.read_parquet(prepared / "items.parquet").set_index("item_key").item_id
    assert sorted(user_codes.index) == ["1", "alice"] and sorted(item_codes.index) == ["7", "8", "9"]
    for raw_user, request_user, (flag, tags) in [(" alice ", "alice", users[" alice "]), ("1 ", True, users["1 "])]:
        rows = events[events.user_id == user_codes[raw_user.strip()]]
        for context in ({"flag": flag, "tags": tags}, {"flag": flag, "tags": tags.split("|")}):
            request = {
                "user_id": request_user,
                "scenario": "s0",
                "candidates": [7, 7.0, "7.0", " 7 ", 8.0],
                "context": context,
                "timestamp": 2_000,
            }
            encoded = scorer.encode(request, record=None)
            assert encoded.shared["user_id"] == user_codes[raw_user.strip()] and encoded.oov_ids == 0
            assert encoded.item_ids.tolist() == [item_codes["7"]] * 4 + [item_codes["8"]]
            assert (rows.flag == encoded.shared["flag"]).all()
            assert all(list(t) == encoded.shared["tags"].tolist() for t in rows.tags)
    assert events.flag.nunique() == 2 and events.tags.map(tuple).nunique() == 2  # the two users differ
