"""Where serving finds a user's features and behaviour sequence when a request brings no history.

`HistoryStore` is the interface (one method, `user`); a `UserRecord` is what it returns: the user's
encoded side features and chronological sequence, the same sequence `msit data prepare` stores in
`sequences/` (`msit.data.prepared`). The scorer cuts the history window of the request's moment from
it with `msit.data.sequences.history_windows`, the function training cuts its windows with, so a
served request at an event's timestamp sees the window that event had in training.

`InMemoryHistoryStore` loads the prepared `sequences/` and `users.parquet` at start-up and keeps every
user's sequence (or the last `events_per_user` events: at least the model's history length, so that
requests "now" lose nothing) as flat arrays; a record is a view into them, nothing is copied per user.
It is read-only: events posted to `/v1/events` need a shared store (`msit.serving.redis_store`), since
each replica holds its own copy.

Beyond `user`, a store may offer `users` (many records in one round trip), `append` (new events,
`NewEvents`) and `health` (its state for /v1/health). A store that cannot be reached raises
`HistoryUnavailable` (a 503, never an empty history); one that takes no events raises `ReadOnlyHistory`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from msit.data.feature_spec import FeatureSpec
from msit.data.history import items_are_numbers
from msit.data.prepared import SEQUENCES_DIR, load_sequences
from msit.data.schema import real_values
from msit.data.sequences import Sequences
from msit.errors import MsitError
from msit.model.features import fields_of

USER_FEATURE_DTYPES = {"categorical": np.int64, "multi": np.int64, "numeric": np.float32}


@dataclass
class UserRecord:
    """One user, as the store holds them. The four sequence arrays are in event order (oldest first:
    by timestamp, ties by item key, as prepare orders them) and of one length E."""

    user_id: int  # encoded (1 = out of the model's vocabulary)
    item_ids: np.ndarray  # (E,) encoded items
    scene_ids: np.ndarray  # (E,) encoded scenes
    labels: np.ndarray  # (E,) 0/1
    timestamps: np.ndarray  # (E,) seconds, non-decreasing
    features: dict[str, np.ndarray] = field(default_factory=dict)  # encoded user side features (absent: padding)


class HistoryUnavailable(RuntimeError):
    """The history store cannot be reached or failed: requests that need it get a 503 saying so."""


class ReadOnlyHistory(RuntimeError):
    """The deployment's history store takes no events (the in-memory one): a 409 for POST /v1/events."""


@dataclass
class NewEvents:
    """One user's new events, validated and encoded, in any order (the store puts them in event order)."""

    user_key: str
    user_id: int  # encoded, for a user the store has never seen
    item_ids: np.ndarray  # (E,) encoded
    scene_ids: np.ndarray  # (E,)
    labels: np.ndarray  # (E,)
    timestamps: np.ndarray  # (E,)
    item_keys: list[str]  # (E,) the raw (normalised) item keys: ties at one timestamp are broken by them
    event_ids: list[str | None]  # (E,) for de-duplication (None: always applied)


@dataclass
class Appended:
    applied: int = 0  # events added to users' sequences
    duplicates: int = 0  # events skipped: their event id was seen before


def items_numeric(spec: FeatureSpec) -> bool:
    """How prepare broke ties between a user's events at one timestamp: by item key as numbers when every item key
    of the log was one (recorded in the spec; older specs: judged by the model's item vocabulary)."""
    numeric = spec.source.get("items_numeric")
    return (
        bool(numeric)
        if numeric is not None
        else items_are_numbers(pa.array(real_values(spec.vocabularies["item_id"]), pa.string()))
    )


class HistoryStore(Protocol):
    def user(self, user_key: str) -> UserRecord | None:
        """The user's record (`user_key`: the raw id, normalised as in the scene logs), or None for a user
        the store has never seen."""


class InMemoryHistoryStore:
    """Every user's sequence in memory, as flat arrays with offsets (the layout of `Sequences`)."""

    def __init__(
        self,
        user_keys: list[str],
        sequences: Sequences,
        user_ids: np.ndarray | None = None,
        features: dict[str, np.ndarray] | None = None,
    ):
        """`user_keys[u]` owns row u of `sequences`; `user_ids` (U,) encoded ids (default: unknown, 1);
        `features`: name -> (U,) or (U, L) encoded user features, row u for user u."""
        if len(user_keys) != len(sequences):
            raise ValueError(f"history store: {len(user_keys)} user keys for {len(sequences)} sequences")
        self._rows = {str(key): row for row, key in enumerate(user_keys)}
        if len(self._rows) != len(user_keys):
            raise ValueError("history store: a user key occurs twice")
        sequences = sequences.to("cpu")
        self._offsets = sequences.offsets.numpy()
        self._events = {
            name: getattr(sequences, name).numpy() for name in ("item_ids", "scene_ids", "labels", "timestamps")
        }
        self._user_ids = np.ones(len(user_keys), np.int64) if user_ids is None else np.asarray(user_ids, np.int64)
        self._features = features or {}

    def user(self, user_key: str) -> UserRecord | None:
        row = self._rows.get(user_key)
        if row is None:
            return None
        events = slice(self._offsets[row], self._offsets[row + 1])
        e = self._events
        return UserRecord(
            int(self._user_ids[row]),
            e["item_ids"][events],
            e["scene_ids"][events],
            e["labels"][events],
            e["timestamps"][events],
            features={name: values[row] for name, values in self._features.items()},
        )

    def users(self, user_keys: list[str]) -> list[UserRecord | None]:
        return [self.user(key) for key in user_keys]

    def append(self, events: list[NewEvents]) -> Appended:
        raise ReadOnlyHistory(
            "this deployment's history store is read-only (in memory, loaded from the prepared "
            "data at start-up, one copy per replica); serve with --history redis://HOST:PORT/DB "
            "(serve/config.yaml `history`) to accept events"
        )

    def health(self) -> dict:
        return {"kind": "in-memory", "state": "ok", "users": len(self), "writable": False}

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[str]:
        """The user keys, in sequence-row order."""
        return iter(self._rows)

    def events(self) -> int:
        """Events held, over all users."""
        return int(self._offsets[-1])

    @classmethod
    def from_prepared(
        cls,
        prepared_dir: str | Path,
        spec: FeatureSpec,
        events_per_user: int | None = None,
    ) -> InMemoryHistoryStore:
        """The sequences of a prepared directory (all of each user's events, or the last `events_per_user`),
        with the user features of its users.parquet encoded as `spec` says."""
        if events_per_user is not None and events_per_user < 1:
            raise MsitError(f"history store: events_per_user must be at least 1, got {events_per_user}")
        sequences = load_sequences(prepared_dir)
        keys = pq.read_table(Path(prepared_dir) / SEQUENCES_DIR, columns=["sequence_row", "user_key"])
        user_keys = keys["user_key"].to_numpy(zero_copy_only=False)[np.argsort(keys["sequence_row"].to_numpy())]
        if events_per_user is not None:
            sequences = latest_events(sequences, events_per_user)
        user_ids, features = _user_features(Path(prepared_dir), spec, user_keys)
        return cls([str(k) for k in user_keys], sequences, user_ids, features)


def latest_events(sequences: Sequences, keep: int) -> Sequences:
    """Each user's last `keep` events (all of a shorter sequence)."""
    lengths = sequences.lengths().numpy()
    position = np.arange(int(sequences.offsets[-1])) - np.repeat(sequences.offsets[:-1].numpy(), lengths)
    kept = position >= np.repeat(lengths - keep, lengths)  # (E,) the event is among its user's last `keep`
    return Sequences.from_arrays(
        np.minimum(lengths, keep),
        *(getattr(sequences, name).numpy()[kept] for name in ("item_ids", "scene_ids", "labels", "timestamps")),
    )


def _user_features(
    prepared_dir: Path,
    spec: FeatureSpec,
    user_keys: np.ndarray,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Encoded user ids (U,) and user side features in sequence-row order, each feature in its own dtype
    (a row of a mixed frame would turn ids into floats). A user users.parquet lacks gets padding."""
    path = prepared_dir / "users.parquet"
    try:
        users = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise MsitError(
            f"{path}: the user table cannot be read ({' '.join(str(e).split())[:200]}); prepare the data again"
        ) from None
    names = {kind: fields_of(spec, "user", kind) for kind in USER_FEATURE_DTYPES}
    missing = [c for c in ["user_key", "user_id", *(c for cs in names.values() for c in cs)] if c not in users]
    if missing:
        raise MsitError(f"{path} lacks column(s) {missing} that the model's feature spec needs; prepare the data again")
    row = pd.Index(users["user_key"].astype(str)).get_indexer(pd.Index(user_keys).astype(str))  # -1: absent
    found = row >= 0
    user_ids = np.ones(len(user_keys), np.int64)  # absent: out of vocabulary
    user_ids[found] = users["user_id"].to_numpy(np.int64)[row[found]]
    features = {}
    for kind, dtype in USER_FEATURE_DTYPES.items():
        for name in names[kind]:
            column = users[name]
            values = (
                np.stack([np.asarray(v, dtype) for v in column])
                if kind == "multi" and len(column)
                else column.to_numpy(dtype)
            )
            out = np.zeros((len(user_keys), *values.shape[1:]), dtype)  # padding: the "no value" of every feature
            out[found] = values[row[found]]
            features[name] = out
    return user_ids, features
