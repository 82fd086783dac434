"""The per-row histories `msit data prepare` wrote before sequences were stored once (layout 1), kept as
the reference the window function is tested against."""

from __future__ import annotations

import numpy as np

from msit.data.history import event_order
from msit.data.schema import (
    HISTORY_ITEM_IDS,
    HISTORY_LABELS,
    HISTORY_LENGTH,
    HISTORY_SCENE_IDS,
    HISTORY_TIME_GAPS,
)


def _group_starts(keys: list[np.ndarray]) -> np.ndarray:
    n = len(keys[0])
    new_run = np.zeros(n, dtype=bool)
    new_run[:1] = True
    for k in keys:
        new_run[1:] |= k[1:] != k[:-1]
    return np.maximum.accumulate(np.where(new_run, np.arange(n), 0))


def add_histories(events: dict[str, np.ndarray], history_length: int) -> dict[str, np.ndarray]:
    """Events of whole users sorted by (user, timestamp, item), with history_* columns of `history_length`."""
    order = event_order(events["user_key"], events["timestamp"], events["item_key"])
    events = {k: v[order] for k, v in events.items()}
    users, ts = np.asarray(events["user_key"], dtype=str), events["timestamp"]
    user_start = _group_starts([users])
    first_at_same_time = _group_starts([users, ts])
    past = first_at_same_time[:, None] - 1 - np.arange(history_length)[None, :]
    real = past >= user_start[:, None]
    past = np.where(real, past, 0)

    def gather(values: np.ndarray) -> np.ndarray:
        return np.where(real, values[past], 0).astype(np.int64)

    events[HISTORY_ITEM_IDS] = gather(events["item_id"])
    events[HISTORY_SCENE_IDS] = gather(events["scene_id"])
    events[HISTORY_LABELS] = gather(events["label"])
    events[HISTORY_TIME_GAPS] = np.where(real, ts[:, None] - ts[past], 0).astype(np.int64)
    events[HISTORY_LENGTH] = real.sum(axis=1).astype(np.int64)
    return events
