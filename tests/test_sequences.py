"""The window function against the per-row histories prepare used to write (`reference_histories`)."""

import numpy as np
import torch

from msit.data.schema import WINDOW_FIELDS
from msit.data.sequences import Sequences, history_windows, window_ends
from tests.reference_histories import add_histories


def random_events(seed: int = 0, users: int = 30, events: int = 600) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "user_key": rng.integers(0, users, events).astype(str),
        "item_key": rng.integers(0, 50, events).astype(str),
        "timestamp": rng.integers(0, 40, events) * 100,  # many ties
        "item_id": rng.integers(2, 52, events),
        "scene_id": rng.integers(2, 6, events),
        "label": rng.integers(0, 2, events),
    }


def as_sequences(events: dict[str, np.ndarray]) -> tuple[Sequences, dict[str, np.ndarray]]:
    """Events sorted as add_histories sorts them, each user's run one sequence; row and position per event."""
    ordered = add_histories(events, history_length=1)  # sorted by (user, timestamp, item)
    users = ordered["user_key"]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    lengths = np.diff(np.r_[starts, len(users)])
    rows = np.repeat(np.arange(len(starts)), lengths)
    sequences = Sequences.from_arrays(
        lengths, ordered["item_id"], ordered["scene_id"], ordered["label"], ordered["timestamp"]
    )
    return sequences, {**ordered, "row": rows}


def test_windows_equal_the_per_row_histories_with_and_without_positions():
    events = random_events()
    for n in (1, 5, 50):
        expected = add_histories(dict(events), history_length=n)
        sequences, ordered = as_sequences(events)
        rows, cutoffs = torch.from_numpy(ordered["row"]), torch.from_numpy(ordered["timestamp"])
        searched = history_windows(sequences, rows, cutoffs, n)
        positions = window_ends(sequences, rows, cutoffs) - sequences.offsets[rows]
        given = history_windows(sequences, rows, cutoffs, n, positions=positions)
        for name in WINDOW_FIELDS:
            np.testing.assert_array_equal(searched[name].numpy(), expected[name], err_msg=f"{name}, N={n}")
            np.testing.assert_array_equal(given[name].numpy(), expected[name], err_msg=f"{name}, N={n}")


def test_a_cutoff_before_every_event_and_an_empty_store_give_empty_windows():
    sequences = Sequences.single([5, 6], [2, 3], [1, 0], [100, 200])
    out = history_windows(sequences, torch.tensor([0, 0, 0]), torch.tensor([50, 150, 10**12]), 3)
    assert out["history_length"].tolist() == [0, 1, 2]
    assert out["history_item_ids"].tolist() == [[0, 0, 0], [5, 0, 0], [6, 5, 0]]
    assert out["history_time_gaps"].tolist()[2][:2] == [10**12 - 200, 10**12 - 100]
    empty = Sequences.single([], [], [], [])
    out = history_windows(empty, torch.tensor([0]), torch.tensor([10]), 4)
    assert out["history_length"].tolist() == [0] and out["history_item_ids"].shape == (1, 4)
