"""Vocabularies and encoding: every categorical value becomes an integer index.

Index 0 is padding (also a missing value), 1 is out-of-vocabulary: anything not seen at least
`min_count` times in the training split, at evaluation and serving time alike. Numeric features
are standardised with training mean and std; multi-valued features become fixed-length index
arrays padded with 0.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from msit.data.history import NO_TRAIN, ROW_HASH
from msit.data.spec import SceneLogSpec

PAD, OOV = 0, 1
RESERVED = ["<pad>", "<oov>"]
_NUM = "__num__"  # prefix of the count rows that carry numeric sums
_LEN = "__len__"  # prefix of the count rows that carry multi-valued lengths
_ALL = "__all__"  # prefix of the count rows over every split (not only training): the scenes
_STAT = "__stat__"  # field of the count rows that carry whole-log statistics


@dataclass
class Vocabulary:
    """Values in index order; `values[0]`, `values[1]` are the reserved padding and OOV entries."""

    values: list[str]

    @classmethod
    def from_counts(cls, counts: dict[str, int], min_count: int = 1, by_name: bool = False) -> Vocabulary:
        """Values seen at least `min_count` times, most frequent first (or sorted by name)."""
        kept = [v for v, n in counts.items() if n >= min_count]
        kept.sort(key=(lambda v: v) if by_name else (lambda v: (-counts[v], v)))
        return cls(values=RESERVED + kept)

    def __len__(self) -> int:
        return len(self.values)

    def index(self) -> pd.Index:
        return pd.Index(self.values[len(RESERVED):])

    def encode(self, keys: pd.Series | np.ndarray, index: pd.Index | None = None) -> np.ndarray:
        keys = pd.Series(keys, dtype=object)
        found = (self.index() if index is None else index).get_indexer(keys)
        codes = np.where(found >= 0, found + len(RESERVED), OOV)
        return np.where(keys.isna().to_numpy(), PAD, codes).astype(np.int64)


def multi_tokens(values: pd.Series, sep: str) -> pd.Series:
    """A multi-valued string column as lists of tokens (empty list for null)."""
    return values.map(lambda v: [t for t in v.split(sep) if t] if isinstance(v, str) else [])


def count_batch(batch: pd.DataFrame, spec: SceneLogSpec) -> pd.DataFrame:
    """Value counts of every vocabulary field over the training rows of a batch, plus the sums
    that give numeric means/stds and the length histogram of multi-valued fields.
    Returns rows (field, value, count) for a groupby-sum across batches."""
    train = batch[batch["split"] == "train"] if "split" in batch else batch
    parts = []

    def add(field_name: str, counts: pd.Series) -> None:
        parts.append(pd.DataFrame({"field": field_name, "value": counts.index.astype(str),
                                   "count": counts.to_numpy(dtype="float64")}))

    multi = multi_fields(spec)
    for col in vocab_fields(spec):
        if col in multi:
            tokens = multi_tokens(train[col], multi[col])
            add(_LEN + col, tokens.map(len).value_counts())
            add(col, tokens.explode().dropna().value_counts())
        else:
            add(col, train[col].dropna().value_counts())
    for group in spec.groups().values():
        for col in group.numeric:
            x = train[col].dropna()
            add(_NUM + col, pd.Series([len(x), x.sum(), (x * x).sum()], index=["n", "sum", "sumsq"]))
    add(_ALL + "scenario", batch["scenario"].dropna().value_counts())
    if NO_TRAIN in batch:  # 2 on a user's first row, 1 on their other rows, when the split left them no train row
        flags = batch[NO_TRAIN].to_numpy()
        add(_STAT, pd.Series([(flags == 2).sum(), (flags > 0).sum()], index=["users_without_train",
                                                                              "events_without_train"]))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["field", "value", "count"])


@dataclass
class SplitStats:
    scenes: dict[str, float]  # every scene (all splits) -> rows
    users_without_train: int = 0
    events_without_train: int = 0


def split_stats(counts: pd.DataFrame) -> SplitStats:
    """What `count_batch` counted over every split, beside the training vocabularies."""
    by_field = _counts_by_field(counts)
    stat = by_field.get(_STAT, {})
    return SplitStats(by_field.get(_ALL + "scenario", {}), int(stat.get("users_without_train", 0)),
                      int(stat.get("events_without_train", 0)))


def vocab_fields(spec: SceneLogSpec) -> list[str]:
    fields = ["user_id", "item_id", "scenario"]
    for group in spec.groups().values():
        fields += group.categorical + list(group.multi)
    return fields


def multi_fields(spec: SceneLogSpec) -> dict[str, str]:
    return {col: sep for group in spec.groups().values() for col, sep in group.multi.items()}


@dataclass
class Encoders:
    """Everything fitted on the training split that encoding needs."""

    vocabularies: dict[str, Vocabulary]
    numeric_stats: dict[str, dict[str, float]] = field(default_factory=dict)  # col -> {"mean", "std"}
    multi_max_len: dict[str, int] = field(default_factory=dict)
    multi_truncated: dict[str, int] = field(default_factory=dict)  # col -> rows with more tokens than kept
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # identifies this fit in worker caches

    @classmethod
    def fit(cls, counts: pd.DataFrame, spec: SceneLogSpec, min_count: int, multi_cap: int) -> Encoders:
        """`counts`: (field, value, count) rows summed over the whole training split."""
        by_field = _counts_by_field(counts)
        vocabularies = {}
        for col in vocab_fields(spec):
            # Scenes are few and each matters: never drop one for being rare; order them by name so
            # their indices stay put when a later window of logs has other counts.
            scenes = col == "scenario"
            vocabularies[col] = Vocabulary.from_counts(by_field.get(col, {}), 1 if scenes else min_count, scenes)
        stats = {}
        for group in spec.groups().values():
            for col in group.numeric:
                s = by_field.get(_NUM + col, {})
                n = s.get("n", 0.0)
                mean = s.get("sum", 0.0) / n if n else 0.0
                var = s.get("sumsq", 0.0) / n - mean * mean if n else 0.0
                stats[col] = {"mean": float(mean), "std": float(np.sqrt(max(var, 0.0))) or 1.0}
        max_len, truncated = {}, {}
        for col in multi_fields(spec):
            lengths = {int(k): int(v) for k, v in by_field.get(_LEN + col, {}).items()}
            longest = max(lengths, default=1)
            max_len[col] = max(1, min(longest, multi_cap))
            truncated[col] = _truncated(by_field, col, max_len[col])
        return cls(vocabularies, stats, max_len, truncated)

    def extended(self, counts: pd.DataFrame, spec: SceneLogSpec, min_count: int) -> Encoders:
        """These encoders grown by the values of `counts` (a newer training split) that they lack:
        every known value keeps its index, new ids and scenes are appended after them. Numeric
        statistics and multi-valued widths stay as they were, so old inputs encode exactly as before."""
        fresh = Encoders.fit(counts, spec, min_count, multi_cap=1)
        vocabularies = {}
        for col, vocab in self.vocabularies.items():
            known = set(vocab.values)
            added = [v for v in fresh.vocabularies[col].values[len(RESERVED):] if v not in known]
            vocabularies[col] = Vocabulary(vocab.values + added)
        by_field = _counts_by_field(counts)
        truncated = {col: _truncated(by_field, col, width) for col, width in self.multi_max_len.items()}
        return Encoders(vocabularies, dict(self.numeric_stats), dict(self.multi_max_len), truncated)


def _counts_by_field(counts: pd.DataFrame) -> dict[str, dict[str, float]]:
    return {f: dict(zip(g["value"], g["count"], strict=True)) for f, g in counts.groupby("field")}


def _truncated(by_field: dict[str, dict[str, float]], col: str, width: int) -> int:
    """Training rows of multi-valued field `col` with more than `width` values."""
    return int(sum(n for k, n in by_field.get(_LEN + col, {}).items() if int(k) > width))


def encoders_from_feature_spec(spec) -> Encoders:
    """The encoders of an earlier `prepare` (e.g. a model's), to encode new logs exactly the same way."""
    vocabularies = {name: Vocabulary(values) for name, values in spec.vocabularies.items()}
    stats = {c: {"mean": f.mean, "std": f.std} for c, f in spec.fields.items() if f.type == "numeric"}
    max_len = {c: f.max_len for c, f in spec.fields.items() if f.type == "multi"}
    return Encoders(vocabularies, stats, max_len, {c: 0 for c in max_len})


# Lookup indexes per fitted Encoders object, built once per Ray worker process, not per batch.
_INDEX_CACHE: dict[str, dict[str, pd.Index]] = {}


def encode_batch(batch: pd.DataFrame, encoders: Encoders, spec: SceneLogSpec) -> dict[str, np.ndarray]:
    """Encoded columns of a batch of validated rows. Raw user/item keys stay on the rows
    (`user_key`, `item_key`): the user/item tables and the serving history store need them."""
    indexes = _INDEX_CACHE.get(encoders.token)
    if indexes is None:
        indexes = _INDEX_CACHE[encoders.token] = {n: v.index() for n, v in encoders.vocabularies.items()}
    multi = multi_fields(spec)
    out: dict[str, np.ndarray] = {}
    for col, vocab in encoders.vocabularies.items():
        name = "scene_id" if col == "scenario" else col
        if col in multi:
            out[name] = _encode_multi(batch[col], multi[col], vocab, indexes[col], encoders.multi_max_len[col])
        else:
            out[name] = vocab.encode(batch[col], indexes[col])
    for col, s in encoders.numeric_stats.items():
        out[col] = np.nan_to_num((batch[col].to_numpy("float64") - s["mean"]) / s["std"], nan=0.0).astype(np.float32)
    out["label"] = batch["label"].to_numpy(np.int64)
    out["timestamp"] = batch["timestamp"].to_numpy(np.int64)
    out["split"] = batch["split"].to_numpy(dtype=object)
    if ROW_HASH in batch:  # carried to the histories step, which counts exact duplicates
        out[ROW_HASH] = batch[ROW_HASH].to_numpy(np.uint64)
    out["user_key"] = batch["user_id"].to_numpy(dtype=object)
    out["item_key"] = batch["item_id"].to_numpy(dtype=object)
    for col in spec.item.text:
        out[col] = batch[col].to_numpy(dtype=object)
    return out


def _encode_multi(values: pd.Series, sep: str, vocab: Vocabulary, index: pd.Index, width: int) -> np.ndarray:
    """(rows, width) token indexes, left-aligned, padded with 0."""
    tokens = multi_tokens(values, sep).map(lambda t: t[:width])
    lengths = tokens.map(len).to_numpy()
    flat = vocab.encode(tokens.explode().dropna().to_numpy(), index)
    rows = np.repeat(np.arange(len(values)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out = np.zeros((len(values), width), dtype=np.int64)
    out[rows, cols] = flat
    return out
