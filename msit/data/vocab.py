"""Vocabularies and encoding: every categorical value becomes an integer index.

Index PAD is padding (also a missing value), OOV is out-of-vocabulary (msit.data.schema): anything not seen
at least `min_count` times in the training split, at evaluation and serving time alike. Numeric features
are standardised with training mean and std; multi-valued features become fixed-length index
arrays padded with 0.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from msit.data.history import NO_TRAIN
from msit.data.schema import FIRST_REAL, OOV, PAD, RESERVED, real_values
from msit.data.spec import SceneLogSpec

_NUM = "__num__"  # prefix of the count rows that carry numeric sums
_LEN = "__len__"  # prefix of the count rows that carry multi-valued lengths
_ALL = "__all__"  # prefix of the count rows over every split (not only training): the scenes
_STAT = "__stat__"  # field of the count rows that carry whole-log statistics


@dataclass
class Vocabulary:
    """Values in index order; `values[0]`, `values[1]` are the reserved padding and OOV entries."""

    values: list[str]

    @classmethod
    def from_counts(cls, counts: dict[str, float], min_count: int = 1, by_name: bool = False) -> Vocabulary:
        """Values seen at least `min_count` times, most frequent first (or sorted by name)."""
        kept = [v for v, n in counts.items() if n >= min_count]
        kept.sort(key=(lambda v: v) if by_name else (lambda v: (-counts[v], v)))
        return cls(values=[*RESERVED, *kept])

    def __len__(self) -> int:
        return len(self.values)

    def index(self) -> pd.Index:
        return pd.Index(real_values(self.values))

    def encode(self, keys: pd.Series | np.ndarray | list, index: pd.Index | None = None) -> np.ndarray:
        """int64 indices of normalised keys (`parse.keys`): None -> PAD, not in the vocabulary -> OOV. `index`: this
        vocabulary's `index()`, kept by a caller that encodes many times (it holds the hash table)."""
        keys = pd.Series(keys, dtype=object)
        found = (self.index() if index is None else index).get_indexer(keys.tolist())  # as the index's dtype
        codes = np.where(found >= 0, found + FIRST_REAL, OOV)
        return np.where(keys.isna().to_numpy(), PAD, codes).astype(np.int64)


def standardised(values: np.ndarray, stats: dict[str, float]) -> np.ndarray:
    """A numeric feature's model input: float32 (x - training mean) / training std; missing (NaN) -> 0."""
    return np.nan_to_num((values - stats["mean"]) / stats["std"], nan=0.0).astype(np.float32)


def encode_multi_value(
    value: str | None, sep: str, vocabulary: Vocabulary, width: int, index: pd.Index | None = None
) -> np.ndarray:
    """(width,) int64: one normalised (`parse.keys`) multi-valued feature value as `encode_table` encodes it."""
    tokens = multi_tokens(pa.array([value], pa.string()), sep)[0].to_pylist()[:width]
    return np.pad(vocabulary.encode(tokens, index), (0, width - len(tokens)))


def multi_tokens(values: pa.Array | pa.ChunkedArray, sep: str) -> tuple[pa.Array, np.ndarray]:
    """A multi-valued string column split into tokens, vectorised: (the non-empty tokens of every row, in row
    order; (rows,) how many each row has). A null row has none."""
    values = _plain(values)
    lists = pc.split_pattern(pc.fill_null(values.cast(pa.string()), ""), sep)
    flat, parent = pc.list_flatten(lists), pc.list_parent_indices(lists)
    keep = pc.not_equal(flat, "")
    parent = np.asarray(parent.filter(keep).to_numpy(zero_copy_only=False), dtype=np.int64)
    return flat.filter(keep), np.bincount(parent, minlength=len(values))


def _plain(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _value_counts(values: pa.Array) -> pd.Series:
    counts = pc.value_counts(values.drop_null())
    return pd.Series(
        counts.field("counts").to_numpy(zero_copy_only=False),
        index=np.asarray(counts.field("values").cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object),
        dtype="float64",
    )


def count_table(
    table: pa.Table, spec: SceneLogSpec, train: np.ndarray | None = None, without_train: np.ndarray | None = None
) -> pd.DataFrame:
    """Value counts of every vocabulary field over the training rows (`train`, a mask; all rows if None),
    plus the sums that give numeric means/stds and the length histogram of multi-valued fields, the scenes
    of every row, and (`without_train`: 2 on a user's first row, 1 on their other rows, when the split left
    them no training row) those users' counts. Rows (field, value, count), summed across tables."""
    numeric = [c for group in spec.groups().values() for c in group.numeric]
    rows = table.select(list(dict.fromkeys([*vocab_fields(spec), *numeric])))  # not the text: filter copies it all
    rows = rows.filter(pa.array(train)) if train is not None else rows
    parts = []

    def add(field_name: str, counts: pd.Series) -> None:
        parts.append(
            pd.DataFrame(
                {"field": field_name, "value": counts.index.astype(str), "count": counts.to_numpy(dtype="float64")}
            )
        )

    multi = multi_fields(spec)
    for col in vocab_fields(spec):
        if col in multi:
            tokens, lengths = multi_tokens(rows[col], multi[col])
            add(_LEN + col, pd.Series(lengths).value_counts())
            add(col, _value_counts(tokens))
        else:
            add(col, _value_counts(_plain(rows[col])))
    for group in spec.groups().values():
        for col in group.numeric:
            x = _plain(rows[col]).drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
            x = x[~np.isnan(x)]
            add(_NUM + col, pd.Series([len(x), x.sum(), (x * x).sum()], index=["n", "sum", "sumsq"]))
    add(_ALL + "scenario", _value_counts(_plain(table["scenario"])))
    if without_train is not None:
        add(
            _STAT,
            pd.Series(
                [(without_train == 2).sum(), (without_train > 0).sum()],
                index=["users_without_train", "events_without_train"],
            ),
        )
    return pd.concat(parts, ignore_index=True)


def count_batch(batch: pd.DataFrame, spec: SceneLogSpec) -> pd.DataFrame:
    """`count_table` of a pandas batch (its `split` column chooses the training rows)."""
    train = (batch["split"] == "train").to_numpy() if "split" in batch else None
    flags = batch[NO_TRAIN].to_numpy() if NO_TRAIN in batch else None
    return count_table(pa.Table.from_pandas(batch, preserve_index=False), spec, train, flags)


@dataclass
class SplitStats:
    scenes: dict[str, float]  # every scene (all splits) -> rows
    users_without_train: int = 0
    events_without_train: int = 0


def split_stats(counts: pd.DataFrame) -> SplitStats:
    """What `count_batch` counted over every split, beside the training vocabularies."""
    by_field = _counts_by_field(counts)
    stat = by_field.get(_STAT, {})
    return SplitStats(
        by_field.get(_ALL + "scenario", {}),
        int(stat.get("users_without_train", 0)),
        int(stat.get("events_without_train", 0)),
    )


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
            added = [v for v in real_values(fresh.vocabularies[col].values) if v not in known]
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
    return Encoders(vocabularies, stats, max_len, dict.fromkeys(max_len, 0))


# Vocabulary values as Arrow arrays per fitted Encoders object, built once per Ray worker process, not per batch.
_VALUE_CACHE: dict[str, dict[str, pa.Array]] = {}


def _values(encoders: Encoders) -> dict[str, pa.Array]:
    values = _VALUE_CACHE.get(encoders.token)
    if values is None:
        values = _VALUE_CACHE[encoders.token] = {
            n: pa.array(real_values(v.values), pa.string()) for n, v in encoders.vocabularies.items()
        }
    return values


def encode_keys(keys: pa.Array | pa.ChunkedArray, values: pa.Array) -> np.ndarray:
    """Indices of `keys` in a vocabulary's `values` (the entries after the reserved ones): null -> PAD,
    not found -> OOV. int32, vectorised (a hash lookup in Arrow)."""
    keys = _plain(keys).cast(pa.string())
    found = pc.index_in(keys, value_set=values)
    codes = pc.fill_null(pc.add(found, FIRST_REAL), OOV).to_numpy(zero_copy_only=False).astype(np.int32)
    codes[~np.asarray(keys.is_valid().to_numpy(zero_copy_only=False), dtype=bool)] = PAD
    return codes


def encode_table(table: pa.Table, encoders: Encoders, spec: SceneLogSpec, columns: list[str]) -> dict[str, pa.Array]:
    """The encoded `columns` (processed names: user_id, item_id, scene_id and features) of validated rows, in
    the prepared layout's compact types: ids and categories int32 (scenes int16), numeric float32 (training
    mean/std; null -> 0), multi-valued fixed-size lists of int32 (left-aligned, padded with 0)."""
    values = _values(encoders)
    multi = multi_fields(spec)
    out: dict[str, pa.Array] = {}
    for name in columns:
        col = "scenario" if name == "scene_id" else name
        if col in multi:
            width = encoders.multi_max_len[col]
            codes = _encode_multi(table[col], multi[col], values[col], width)
            out[name] = pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1)), width)
        elif col in encoders.numeric_stats:
            s = encoders.numeric_stats[col]
            x = _plain(table[col]).to_numpy(zero_copy_only=False).astype(np.float64)
            out[name] = pa.array(standardised(x, s))
        elif col in values:
            codes = encode_keys(table[col], values[col])
            out[name] = pa.array(codes.astype(np.int16) if name == "scene_id" else codes)
        else:
            out[name] = _plain(table[col])  # text: as validated
    return out


def encode_batch(batch: pd.DataFrame, encoders: Encoders, spec: SceneLogSpec) -> dict[str, np.ndarray]:
    """`encode_table` of a pandas batch, as numpy arrays (multi-valued fields as (rows, width))."""
    table = pa.Table.from_pandas(batch, preserve_index=False)
    names = ["scene_id" if c == "scenario" else c for c in encoders.vocabularies] + list(encoders.numeric_stats)
    out = {}
    for name, array in encode_table(table, encoders, spec, names).items():
        if pa.types.is_fixed_size_list(array.type):
            out[name] = pc.list_flatten(array).to_numpy().reshape(len(array), array.type.list_size)
        else:
            out[name] = array.to_numpy(zero_copy_only=False)
    return out


def _encode_multi(values: pa.Array | pa.ChunkedArray, sep: str, vocab: pa.Array, width: int) -> np.ndarray:
    """(rows, width) int32 token indexes, left-aligned, padded with 0; tokens past `width` are cut."""
    tokens, lengths = multi_tokens(values, sep)
    starts = np.cumsum(lengths) - lengths
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(tokens)) - starts[rows]
    kept = cols < width
    out = np.zeros((len(lengths), width), dtype=np.int32)
    out[rows[kept], cols[kept]] = encode_keys(tokens.filter(pa.array(kept)), vocab)
    return out
