"""Where serving finds a user's features and recent behaviour when a request brings no history.

`HistoryStore` is the interface (one method); `InMemoryHistoryStore` builds it at start-up from the
processed logs beside a model (every split of a prepared directory) and keeps each user's latest
events in memory. A Redis-backed store only has to implement `user`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from msit.data.feature_spec import FeatureSpec
from msit.data.history import event_order
from msit.model.features import fields_of


@dataclass
class UserRecord:
    user_id: int  # encoded
    features: dict[str, np.ndarray]  # encoded user side features, as the prepared shards hold them
    item_ids: np.ndarray  # (E,) the user's latest events, most recent first (encoded)
    scene_ids: np.ndarray  # (E,)
    labels: np.ndarray  # (E,)
    timestamps: np.ndarray  # (E,) seconds


class HistoryStore(Protocol):
    def user(self, user_key: str) -> UserRecord | None:
        """The user's record, or None for a user the store has never seen."""


class InMemoryHistoryStore:
    def __init__(self, records: dict[str, UserRecord]):
        self._records = records

    def user(self, user_key: str) -> UserRecord | None:
        return self._records.get(user_key)

    def __len__(self) -> int:
        return len(self._records)

    @classmethod
    def from_prepared(cls, prepared_dir: str | Path, spec: FeatureSpec, events_per_user: int | None = None,
                      ) -> InMemoryHistoryStore:
        """Each user's latest `events_per_user` events (default: the model's history length) over all splits."""
        keep = events_per_user or spec.history_length
        columns = ["user_key", "item_key", "user_id", "item_id", "scene_id", "label", "timestamp"]
        frames = [pq.read_table(Path(prepared_dir) / split, columns=columns).to_pandas()
                  for split in ("train", "val", "test") if (Path(prepared_dir) / split).is_dir()]
        events = pd.concat(frames, ignore_index=True)
        # Most recent first, ties in the reverse of prepare's event order: histories come out as prepare's do.
        order = event_order(events["user_key"].to_numpy(), events["timestamp"].to_numpy(),
                            events["item_key"].to_numpy())[::-1]
        events = events.iloc[order].groupby("user_key", sort=False).head(keep)
        users = pd.read_parquet(Path(prepared_dir) / "users.parquet")
        # Column by column, in each field's own dtype (a row of a mixed frame would turn ids into floats).
        dtypes = {"categorical": np.int64, "multi": np.int64, "numeric": np.float32}
        features = {c: [np.asarray(v, dtype=dtypes[kind]) for v in users[c]]
                    for kind in dtypes for c in fields_of(spec, "user", kind)}
        position = {key: i for i, key in enumerate(users["user_key"])}
        records = {}
        for user_key, group in events.groupby("user_key", sort=False):
            row = position.get(user_key)
            records[str(user_key)] = UserRecord(
                user_id=int(group["user_id"].iloc[0]),
                features={c: values[row] for c, values in features.items()} if row is not None else {},
                item_ids=group["item_id"].to_numpy(np.int64), scene_ids=group["scene_id"].to_numpy(np.int64),
                labels=group["label"].to_numpy(np.int64), timestamps=group["timestamp"].to_numpy(np.int64))
        return cls(records)
