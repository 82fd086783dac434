"""Per-user event order, chronological splits and positions in the user's sequence, vectorised.

A user's events are ordered by (timestamp, item) on the raw keys (`event_order`); the split and each
event's position (how many of the user's events lie strictly before it: where its history window ends,
msit.data.sequences) follow from that order. No Python loop over rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

NO_TRAIN = "_no_train"  # assign_split: 2 on the first row of a user left without a training event, 1 on the rest
DUPLICATE = "_duplicate"  # the row exactly repeats an earlier one of the same user


def event_order(user_keys: np.ndarray, timestamps: np.ndarray, item_keys: np.ndarray) -> np.ndarray:
    """Indices that sort events by (user, timestamp, item), on the raw keys (encoded ids would
    merge all out-of-vocabulary users into one). Items compare as numbers when all of them are
    numeric, so that ties are broken as in the MovieLens protocol (item 9 before item 10)."""
    items = pd.to_numeric(pd.Series(item_keys, dtype=object), errors="coerce")
    tiebreak = items.to_numpy() if not items.isna().any() else np.asarray(item_keys, dtype=str)
    return np.lexsort((tiebreak, timestamps, np.asarray(user_keys, dtype=str)))


def items_are_numbers(item_keys: pa.Array | pa.ChunkedArray) -> bool:
    """Whether every item key reads as a finite number (then ties are broken by number: item 9 before 10)."""
    try:
        x = pc.cast(item_keys, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return x.null_count == 0 and bool(pc.all(pc.is_finite(x)).as_py() is not False)


def sorted_event_order(
    user_keys: pa.Array, timestamps: pa.Array, item_keys: pa.Array, items_numeric: bool
) -> np.ndarray:
    """`event_order` on Arrow columns (a stable Arrow sort): `items_numeric` says how items break ties, decided
    once for the whole log (`items_are_numbers`), so that every part of the log orders alike."""
    tiebreak = pc.cast(item_keys, pa.float64()) if items_numeric else item_keys
    table = pa.table({"u": user_keys, "t": timestamps, "i": tiebreak})
    return pc.sort_indices(table, sort_keys=[("u", "ascending"), ("t", "ascending"), ("i", "ascending")]).to_numpy()


def run_starts(*keys: np.ndarray | pa.Array) -> np.ndarray:
    """For rows sorted by `keys`, the index of the first row of each row's run of equal keys."""
    n = len(keys[0])
    new_run = np.zeros(n, dtype=bool)
    new_run[:1] = True
    for k in keys:
        if isinstance(k, pa.Array | pa.ChunkedArray):
            new_run[1:] |= np.asarray(pc.not_equal(k[1:], k[:-1]).to_numpy(zero_copy_only=False), dtype=bool)
        else:
            new_run[1:] |= k[1:] != k[:-1]
    return np.maximum.accumulate(np.where(new_run, np.arange(n), 0))


def user_runs(user_keys: pa.Array, timestamps: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For events in event order: (each event's user index 0..U-1 in this order, its index within its user's
    events, its position: how many of its user's events have a strictly earlier timestamp)."""
    user_start = run_starts(user_keys)
    index_in_user = np.arange(len(user_start)) - user_start
    position = run_starts(user_keys, timestamps) - user_start
    return np.cumsum(index_in_user == 0) - 1, index_in_user, position


def split_codes(
    position: np.ndarray,
    sizes: np.ndarray,
    ratios: tuple[float, float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user chronological split of sorted events, from each event's index in its user's run and the run's
    size: (codes 0 train / 1 val / 2 test as int8, mask of events whose user has no training event)."""
    _, val_ratio, test_ratio = ratios

    def take(ratio: float) -> np.ndarray:
        k = np.round(sizes * ratio).astype(np.int64)
        return np.maximum(k, 1) if ratio > 0 else np.zeros_like(k)

    n_test, n_val = take(test_ratio), take(val_ratio)
    codes = np.zeros(len(position), dtype=np.int8)
    codes[position >= sizes - n_test - n_val] = 1
    codes[position >= sizes - n_test] = 2
    return codes, sizes - n_test - n_val <= 0


def assign_split(events: dict[str, np.ndarray], ratios: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """Per-user chronological split: the newest `round(test * n)` events are test, the `round(val * n)`
    before them val, the rest train; test and val get at least one event each when their ratio is above 0,
    so a user with 2 events or fewer (at the default ratios) has none in train (marked in `NO_TRAIN`).
    Rounding is half-to-even, as in the shared MovieLens protocol."""
    order = event_order(events["user_id"], events["timestamp"], events["item_id"])
    events = {k: v[order] for k, v in events.items()}
    user_start = run_starts(np.asarray(events["user_id"], dtype=str))
    position = np.arange(len(user_start)) - user_start
    sizes = np.bincount(user_start, minlength=len(user_start))[user_start]
    codes, without_train = split_codes(position, sizes, ratios)
    events["split"] = np.array(["train", "val", "test"], dtype=object)[codes]
    events[NO_TRAIN] = np.where(without_train, np.where(position == 0, 2, 1), 0).astype(np.int8)
    return events
