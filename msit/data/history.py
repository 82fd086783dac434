"""Per-user event order, chronological splits and behaviour histories.

Each function takes the events of one or more whole users as a dict of numpy arrays (Ray
Data's "numpy" batch format, as `groupby(user).map_groups` hands them over) and is vectorised:
no Python loop over rows.

A behaviour history of an event is the user's last N events with a *strictly earlier*
timestamp, across all scenes, most recent first, padded with 0 at the end:

    history_item_ids   (N,) int64   item index of each past event (0 = padding)
    history_scene_ids  (N,) int64   scene index
    history_labels     (N,) int64   0/1 label of the past event (0 also in padding: use the mask)
    history_time_gaps  (N,) int64   seconds between the past event and this one (> 0)
    history_length     ()   int64   how many of the N slots are real
"""

from __future__ import annotations

import numpy as np
import pandas as pd

HISTORY_FIELDS = ("history_item_ids", "history_scene_ids", "history_labels", "history_time_gaps")
NO_TRAIN = "_no_train"  # assign_split: 2 on the first row of a user left without a training event, 1 on the rest
DUPLICATE = "_duplicate"  # add_histories: the row exactly repeats an earlier one of the same user
ROW_HASH = "_row_hash"  # validate: a hash of each row's canonical values


def event_order(user_keys: np.ndarray, timestamps: np.ndarray, item_keys: np.ndarray) -> np.ndarray:
    """Indices that sort events by (user, timestamp, item), on the raw keys (encoded ids would
    merge all out-of-vocabulary users into one). Items compare as numbers when all of them are
    numeric, so that ties are broken as in the MovieLens protocol (item 9 before item 10)."""
    items = pd.to_numeric(pd.Series(item_keys, dtype=object), errors="coerce")
    tiebreak = items.to_numpy() if not items.isna().any() else np.asarray(item_keys, dtype=str)
    return np.lexsort((tiebreak, timestamps, np.asarray(user_keys, dtype=str)))


def _group_starts(keys: list[np.ndarray]) -> np.ndarray:
    """For sorted rows, the index of the first row of each row's run of equal `keys`."""
    n = len(keys[0])
    new_run = np.zeros(n, dtype=bool)
    new_run[:1] = True
    for k in keys:
        new_run[1:] |= k[1:] != k[:-1]
    return np.maximum.accumulate(np.where(new_run, np.arange(n), 0))


def assign_split(events: dict[str, np.ndarray], ratios: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """Per-user chronological split: the newest `round(test * n)` events are test, the `round(val * n)`
    before them val, the rest train; test and val get at least one event each when their ratio is above 0,
    so a user with 2 events or fewer (at the default ratios) has none in train (marked in `NO_TRAIN`).
    Rounding is half-to-even, as in the shared MovieLens protocol."""
    order = event_order(events["user_id"], events["timestamp"], events["item_id"])
    events = {k: v[order] for k, v in events.items()}
    user_start = _group_starts([np.asarray(events["user_id"], dtype=str)])
    position = np.arange(len(user_start)) - user_start
    sizes = np.bincount(user_start, minlength=len(user_start))[user_start]
    _, val_ratio, test_ratio = ratios

    def take(ratio: float) -> np.ndarray:
        k = np.round(sizes * ratio).astype(np.int64)
        return np.maximum(k, 1) if ratio > 0 else np.zeros_like(k)

    n_test, n_val = take(test_ratio), take(val_ratio)
    split = np.full(len(position), "train", dtype=object)
    split[position >= sizes - n_test - n_val] = "val"
    split[position >= sizes - n_test] = "test"
    events["split"] = split
    without_train = sizes - n_test - n_val <= 0
    events[NO_TRAIN] = np.where(without_train, np.where(position == 0, 2, 1), 0).astype(np.int8)
    return events


def add_histories(events: dict[str, np.ndarray], history_length: int) -> dict[str, np.ndarray]:
    """Adds the history_* columns (see module docstring) to encoded events of whole users."""
    order = event_order(events["user_key"], events["timestamp"], events["item_key"])
    events = {k: v[order] for k, v in events.items()}
    users, ts = np.asarray(events["user_key"], dtype=str), events["timestamp"]
    user_start = _group_starts([users])
    first_at_same_time = _group_starts([users, ts])  # events before this index are strictly earlier

    # Slot k of row r holds the event at first_at_same_time[r] - 1 - k, if it is the same user's.
    past = first_at_same_time[:, None] - 1 - np.arange(history_length)[None, :]  # (rows, N)
    real = past >= user_start[:, None]
    past = np.where(real, past, 0)

    def gather(values: np.ndarray) -> np.ndarray:
        return np.where(real, values[past], 0).astype(np.int64)

    events["history_item_ids"] = gather(events["item_id"])
    events["history_scene_ids"] = gather(events["scene_id"])
    events["history_labels"] = gather(events["label"])
    events["history_time_gaps"] = np.where(real, ts[:, None] - ts[past], 0).astype(np.int64)
    events["history_length"] = real.sum(axis=1).astype(np.int64)
    if ROW_HASH in events:  # the rows are whole users, so a repeat of a row is within the same batch
        events[DUPLICATE] = pd.Series(events.pop(ROW_HASH)).duplicated().to_numpy()
    return events
