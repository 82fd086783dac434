"""Event order, positions and chronological splits as prepare computes them, on hand-built logs (no Ray):
the history windows they give (msit.data.sequences) hold strictly earlier events, most recent first."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from msit.data.history import NO_TRAIN, assign_split, items_are_numbers, sorted_event_order, user_runs
from msit.data.schema import WINDOW_FIELDS
from msit.data.sequences import Sequences, history_windows


def add_histories(events: dict[str, np.ndarray], history_length: int) -> dict[str, np.ndarray]:
    """Events in prepare's event order with the windows of their positions (as the prepared layout gives them)."""
    keys = pa.array(events["user_key"].astype(str)), pa.array(events["item_key"].astype(str))
    order = sorted_event_order(keys[0], pa.array(events["timestamp"]), keys[1], items_are_numbers(keys[1]))
    events = {k: v[order] for k, v in events.items()}
    user_index, _, position = user_runs(pa.array(events["user_key"].astype(str)), pa.array(events["timestamp"]))
    sequences = Sequences.from_arrays(
        np.bincount(user_index), events["item_id"], events["scene_id"], events["label"], events["timestamp"]
    )
    windows = history_windows(
        sequences,
        torch.from_numpy(user_index),
        torch.from_numpy(events["timestamp"]),
        history_length,
        positions=torch.from_numpy(position),
    )
    return events | {k: windows[k].numpy() for k in WINDOW_FIELDS}


def _events(rows):
    df = pd.DataFrame(rows, columns=["user_key", "item_key", "item_id", "scene_id", "label", "timestamp"])
    return {c: df[c].to_numpy(dtype=object if c.endswith("_key") else np.int64) for c in df}


def _by_item(out):
    return {(u, i): k for k, (u, i) in enumerate(zip(out["user_key"], out["item_key"], strict=True))}


def test_history_holds_only_strictly_earlier_events_most_recent_first():
    # user a: items 10..14 at t = 100, 200, 200, 300, 400 across two scenes; user b: one event.
    events = _events(
        [
            ("a", "13", 13, 2, 1, 300),
            ("a", "10", 10, 2, 1, 100),
            ("b", "20", 20, 3, 0, 150),
            ("a", "11", 11, 3, 0, 200),
            ("a", "14", 14, 3, 1, 400),
            ("a", "12", 12, 2, 1, 200),
        ]
    )
    out = add_histories(events, history_length=3)
    row = _by_item(out)

    first = row[("a", "10")]
    assert out["history_length"][first] == 0
    assert out["history_item_ids"][first].tolist() == [0, 0, 0]

    # Same-timestamp events (11 and 12 at t=200) never see each other.
    for item in ("11", "12"):
        r = row[("a", item)]
        assert out["history_item_ids"][r].tolist() == [10, 0, 0]
        assert out["history_time_gaps"][r].tolist() == [100, 0, 0]

    r = row[("a", "13")]  # sees 12 and 11 (t=200, tie broken by item) then 10
    assert out["history_item_ids"][r].tolist() == [12, 11, 10]
    assert out["history_scene_ids"][r].tolist() == [2, 3, 2]
    assert out["history_labels"][r].tolist() == [1, 0, 1]
    assert out["history_time_gaps"][r].tolist() == [100, 100, 200]

    r = row[("a", "14")]  # four earlier events, truncated to the newest three
    assert out["history_length"][r] == 3
    assert out["history_item_ids"][r].tolist() == [13, 12, 11]

    # Other users' events never leak in.
    assert out["history_length"][row[("b", "20")]] == 0


def test_history_groups_by_raw_user_key_not_encoded_id():
    # Two users unseen in training both encode to OOV user id 1: they must not share a history.
    events = _events([("x", "1", 5, 2, 1, 10), ("y", "2", 6, 2, 1, 20)])
    events["user_id"] = np.array([1, 1])
    out = add_histories(events, history_length=2)
    assert out["history_length"].tolist() == [0, 0]


def test_history_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame(
        {
            "user_key": rng.choice(list("abcdefg"), n).astype(object),
            "item_id": rng.integers(2, 50, n),
            "scene_id": rng.integers(2, 5, n),
            "label": rng.integers(0, 2, n),
            "timestamp": rng.integers(0, 60, n),  # many ties
        }
    )
    df["item_key"] = df["item_id"].astype(str).astype(object)
    events = {c: df[c].to_numpy() for c in df}
    out = add_histories(events, history_length=5)
    for r in range(len(out["user_key"])):
        u, t = out["user_key"][r], out["timestamp"][r]
        earlier = df[(df.user_key == u) & (df.timestamp < t)]
        earlier = earlier.assign(k=earlier.item_key.astype(int)).sort_values(["timestamp", "k"], ascending=False)
        expected = earlier.item_id.head(5).tolist()
        assert out["history_item_ids"][r][: len(expected)].tolist() == expected
        assert out["history_length"][r] == len(expected)
        assert (out["history_time_gaps"][r][: len(expected)] > 0).all()


def test_chronological_split_ratios_and_minimums():
    rows = [("u", str(i), 0, 0, 0, i) for i in range(20)] + [("v", "1", 0, 0, 0, 5)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "a", "b", "label", "timestamp"])
    out = assign_split({c: df[c].to_numpy() for c in ["user_id", "item_id", "timestamp"]}, (0.8, 0.1, 0.1))
    u = out["split"][out["user_id"] == "u"].tolist()
    assert u == ["train"] * 16 + ["val"] * 2 + ["test"] * 2  # oldest first
    assert out["split"][out["user_id"] == "v"].tolist() == ["test"]  # one event: test gets at least one
    # v is left without a training event: marked on its first row, for prepare's note
    assert out[NO_TRAIN][out["user_id"] == "v"].tolist() == [2] and not out[NO_TRAIN][out["user_id"] == "u"].any()


def test_chronological_split_reproduces_the_movielens_protocol(shared_data):
    df = pd.read_csv(shared_data / "ml100k_genre.csv", usecols=["user_id", "item_id", "timestamp", "split"])
    events = {
        "user_id": df.user_id.astype(str).to_numpy(dtype=object),
        "item_id": df.item_id.astype(str).to_numpy(dtype=object),
        "timestamp": df.timestamp.to_numpy(),
        "expected": df.split.to_numpy(dtype=object),
    }
    out = assign_split(events, (0.8, 0.1, 0.1))
    assert (out["split"] == out["expected"]).all()


@pytest.mark.parametrize("ratios", [(1.0, 0.0, 0.0), (0.7, 0.0, 0.3)])
def test_zero_ratio_gives_no_rows_to_that_split(ratios):
    df = pd.DataFrame({"user_id": ["u"] * 10, "item_id": [str(i) for i in range(10)], "timestamp": range(10)})
    out = assign_split({c: df[c].to_numpy(dtype=object) for c in df}, ratios)
    for name, ratio in zip(("train", "val", "test"), ratios, strict=True):
        assert ((out["split"] == name).sum() > 0) == (ratio > 0)
