"""The serving history store and the scorer's windows on hand-made sequences (no prepare, no Ray)."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from msit.data.schema import WINDOW_FIELDS
from msit.data.sequences import Sequences, history_windows
from msit.errors import MsitError
from msit.model import ModelConfig, build_model
from msit.model.model_dir import save_model_dir
from msit.serving.history_store import InMemoryHistoryStore, latest_events
from msit.serving.scorer import Scorer
from tests.model_helpers import SCENES, item_table, tiny_spec

N = 4  # the model's history_length
# Three users' sequences in event order (timestamp, ties by item key): u1 has a tie at t=300, u2 one event.
USERS = {
    "u0": [],
    "u1": [
        (2, 2, 1, 100),
        (7, 3, 0, 200),
        (3, 2, 1, 300),
        (9, 4, 1, 300),
        (4, 2, 1, 400),
        (5, 3, 1, 500),
        (6, 2, 0, 600),
    ],
    "u2": [(8, 4, 1, 250)],
}


def _sequences(users: dict[str, list[tuple]]) -> Sequences:
    events = [e for sequence in users.values() for e in sequence]
    columns = np.array(events, dtype=np.int64).reshape(-1, 4).T
    return Sequences.from_arrays(np.array([len(s) for s in users.values()]), *columns)


@pytest.fixture(scope="module")
def store() -> InMemoryHistoryStore:
    return InMemoryHistoryStore(
        list(USERS), _sequences(USERS), user_ids=np.array([2, 3, 4]), features={"gender": np.array([2, 3, 2])}
    )


@pytest.fixture(scope="module")
def scorer(store, tmp_path_factory) -> Scorer:
    spec, config = tiny_spec(), ModelConfig(embed_dim=8, mlp_dims=(8,), history_length=N)
    torch.manual_seed(0)
    model_dir = save_model_dir(
        tmp_path_factory.mktemp("m") / "model", build_model(config, spec, item_table()), config, spec
    )
    return Scorer(model_dir, store)


def test_a_record_is_the_users_sequence_in_event_order(store):
    record = store.user("u1")
    assert record.user_id == 3 and record.features == {"gender": 3}
    assert record.item_ids.tolist() == [2, 7, 3, 9, 4, 5, 6]
    assert record.timestamps.tolist() == [100, 200, 300, 300, 400, 500, 600]
    assert store.user("u0").item_ids.tolist() == [] and store.user("nobody") is None
    assert len(store) == 3 and list(store) == ["u0", "u1", "u2"] and store.events() == 8


def test_latest_events_keeps_each_users_last_k():
    kept = latest_events(_sequences(USERS), 3)
    assert kept.lengths().tolist() == [0, 3, 1]
    assert kept.item_ids.tolist() == [4, 5, 6, 8] and kept.timestamps.tolist() == [400, 500, 600, 250]


def test_from_prepared_reads_the_sequences_and_the_user_features(tmp_path):
    """sequences/ rows in any order (sequence_row says which is which); users.parquet in yet another order,
    missing one user (who gets padding); each feature in its own dtype."""
    (tmp_path / "sequences").mkdir()
    rows = [2, 0, 1]
    keys, sequences = list(USERS), list(USERS.values())
    table = pa.table(
        {
            "sequence_row": pa.array(rows, pa.int32()),
            "user_key": [keys[r] for r in rows],
            **{
                name: pa.array([[e[i] for e in sequences[r]] for r in rows], pa.list_(kind))
                for i, (name, kind) in enumerate(
                    [
                        ("item_ids", pa.int32()),
                        ("scene_ids", pa.int16()),
                        ("labels", pa.int8()),
                        ("timestamps", pa.int64()),
                    ]
                )
            },
        }
    )
    pq.write_table(table, tmp_path / "sequences" / "part-0.parquet")
    pd.DataFrame({"user_id": [4, 3], "user_key": ["u2", "u1"], "gender": [3, 2]}).to_parquet(tmp_path / "users.parquet")
    store = InMemoryHistoryStore.from_prepared(tmp_path, tiny_spec())
    assert store.user("u1").item_ids.tolist() == [2, 7, 3, 9, 4, 5, 6] and store.user("u1").user_id == 3
    assert store.user("u2").features["gender"] == 3 and store.user("u2").features["gender"].dtype == np.int64
    assert store.user("u0").user_id == 1 and store.user("u0").features == {"gender": 0}  # not in users.parquet
    short = InMemoryHistoryStore.from_prepared(tmp_path, tiny_spec(), events_per_user=2)
    assert short.user("u1").timestamps.tolist() == [500, 600] and short.events() == 3
    with pytest.raises(MsitError, match="events_per_user must be at least 1"):
        InMemoryHistoryStore.from_prepared(tmp_path, tiny_spec(), events_per_user=0)


REQUESTS = [
    ("u1", 10**9),
    ("u1", 300),
    ("u1", 301),
    ("u1", 100),
    ("u1", 50),
    ("u2", 250),
    ("u2", 251),
    ("u0", 500),
    ("nobody", 500),
]  # (user, request timestamp): ties, before the first event, short users


def test_served_windows_are_the_window_function_on_the_stores_rows(scorer, store):
    """Each request's window is `history_windows` on the user's row of the stored sequences at the request's
    moment, whatever else shares its batch; strictly earlier events only (at t=300 neither event of 300)."""
    requests = [{"user_id": user, "scenario": SCENES[0], "candidates": ["i1"], "timestamp": t} for user, t in REQUESTS]
    served = scorer.windows([scorer.encode(r) for r in requests])
    known = [i for i, (user, _) in enumerate(REQUESTS) if user in USERS]
    rows = torch.tensor([list(USERS).index(REQUESTS[i][0]) for i in known])
    expected = history_windows(_sequences(USERS), rows, torch.tensor([REQUESTS[i][1] for i in known]), N)
    for name in WINDOW_FIELDS:
        assert served[name][known].tolist() == expected[name].tolist(), name
    assert served["history_item_ids"][1].tolist() == [7, 2, 0, 0]  # at t=300: 200 and 100
    assert served["history_item_ids"][2].tolist() == [9, 3, 7, 2]  # at t=301: the tie most recent first, 9 after 3
    assert served["history_length"].tolist() == [4, 2, 4, 0, 0, 0, 1, 0, 0]
    alone = [scorer.windows([scorer.encode(r)]) for r in requests]
    assert all(torch.equal(served["history_item_ids"][i], w["history_item_ids"][0]) for i, w in enumerate(alone))


def _history(user: str) -> list[dict]:
    vocab = tiny_spec().vocabularies["item_id"]
    return [
        {"item_id": vocab[item], "scenario": SCENES[scene - 2], "label": label, "timestamp": t}
        for item, scene, label, t in USERS[user]
    ]


def test_a_request_history_in_any_order_gets_the_stores_window_and_scores(scorer):
    """A request's own history is put in prepare's event order (timestamp, ties by item key) before it is cut:
    shuffled, it gives the window and the scores the stored sequence gives."""
    history = _history("u1")
    rng = np.random.default_rng(0)
    base = {"user_id": "u1", "scenario": SCENES[1], "candidates": ["i3", "i8"]}
    for t in (301, 10**9, 300):
        requests = [{**base, "timestamp": t}] + [
            {**base, "timestamp": t, "history": list(rng.permutation(history))} for _ in range(4)
        ]
        windows = scorer.windows([scorer.encode(r) for r in requests])
        for name in WINDOW_FIELDS:
            assert all(torch.equal(windows[name][0], windows[name][i]) for i in range(1, 5)), (t, name)
        scores = [s.scores for s in scorer.score(requests)]
        assert all(s == pytest.approx(scores[0], abs=1e-6) for s in scores[1:])
    # Ties by item *key*: "i7" (id 9) sorts after "i1" (id 3) as text; given in reverse, the order is the same.
    tie = [
        {"item_id": "i7", "scenario": SCENES[0], "timestamp": 300},
        {"item_id": "i1", "scenario": SCENES[0], "timestamp": 300},
    ]
    window = scorer.windows([scorer.encode({**base, "timestamp": 400, "history": tie})])
    assert window["history_item_ids"][0].tolist() == [9, 3, 0, 0]


def test_explanations_list_the_window_slots_most_recent_first(scorer):
    (result,) = scorer.score(
        [{"user_id": "u1", "scenario": SCENES[0], "candidates": ["i3", "i9"], "timestamp": 301, "explain": True}]
    )
    vocab = tiny_spec().vocabularies["item_id"]
    window = [(vocab[item], SCENES[scene - 2]) for item, scene in [(9, 4), (3, 2), (7, 3), (2, 2)]]  # at t=301
    for explanation in result.explanations:
        top = explanation["top_history"]
        assert len(top) == N and sorted(t["position"] for t in top) == list(range(N))
        assert all((t["item_id"], t["scenario"]) == window[t["position"]] for t in top)
    (cold,) = scorer.score(
        [{"user_id": "u1", "scenario": SCENES[0], "candidates": ["i3"], "timestamp": 100, "explain": True}]
    )
    assert "top_history" not in cold.explanations[0]  # no past event, nothing to list


@pytest.mark.parametrize("numeric", [False, True])
def test_ties_in_a_request_history_break_by_item_key_as_prepare_breaks_them(tmp_path, numeric):
    """Prepare orders a timestamp's events by item key, as numbers when every item key of the log is one (the
    spec records which): "9" before "10" then, "10" before "9" as text. The scenes tell the two events apart."""
    spec, config = tiny_spec(), ModelConfig(embed_dim=8, mlp_dims=(8,), history_length=N)
    spec.source["items_numeric"] = numeric
    scorer = Scorer(save_model_dir(tmp_path / "m", build_model(config, spec, item_table()), config, spec))
    history = [
        {"item_id": "10", "scenario": SCENES[0], "timestamp": 300},
        {"item_id": 9, "scenario": SCENES[2], "timestamp": 300},
    ]
    for given in (history, history[::-1]):
        window = scorer.windows(
            [
                scorer.encode(
                    {"user_id": "u1", "scenario": SCENES[0], "candidates": ["i1"], "timestamp": 400, "history": given}
                )
            ]
        )
        # Most recent first: the later of the tie first.
        assert window["history_scene_ids"][0, :2].tolist() == ([2, 4] if numeric else [4, 2])
