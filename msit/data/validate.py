"""Row validation: turn a batch of raw scene-log rows into canonical columns and flag bad rows.

`check_batch` runs inside Ray Data's `map_batches` on pyarrow batches, parsing each value with
msit.data.parse. Every row gets `_bad_reason` (empty when the row is good; otherwise the first problem
found, so that counts per reason add up to the number of bad rows); the first bad row of each reason and
file in a batch keeps a JSON copy of its raw values in `_bad_example`. `BadRowReport` gathers those into
the message a user sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from msit.data import parse
from msit.data.spec import SceneLogSpec
from msit.errors import DataValidationError

SOURCE_FILE = "_source_file"
BAD_REASON = "_bad_reason"
BAD_EXAMPLE = "_bad_example"
TIME_UNIT = "_time_unit"
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


def column_label(spec: SceneLogSpec, role: str) -> str:
    src = spec.columns.get(role, role)
    return f"column {src!r}" if src == role else f"column {src!r} ({role})"


def check_batch(batch: pa.Table, spec: SceneLogSpec) -> pa.Table:
    """Canonical columns for every row, plus `_bad_reason` / `_bad_example` / `_source_file` and `_time_unit`
    (what a timestamp was converted from). Each value is parsed against its column's role (msit.data.parse),
    whatever type the file gave the column. (Exact duplicates are counted later, on the few rows that can be
    one: `row_hash`.)"""
    n = batch.num_rows
    reasons: list[str] = [""]
    code = np.zeros(n, dtype=np.int32)  # index into `reasons`: the first problem of each row

    def flag(mask: np.ndarray, reason: str) -> None:
        hit = mask & (code == 0)
        if hit.any():
            if reason not in reasons:
                reasons.append(reason)
            code[hit] = reasons.index(reason)

    out: dict[str, pa.Array] = {}
    for role in ("user_id", "item_id", "scenario"):
        values, bad_utf8 = parse.keys(batch[spec.columns[role]])
        flag(bad_utf8, f"{column_label(spec, role)}: not valid UTF-8 text")
        flag(~_valid(values), f"{column_label(spec, role)}: null or empty")
        out[role] = values

    ts = parse.seconds(batch[spec.columns["timestamp"]])
    label = column_label(spec, "timestamp")
    flag(ts.missing, f"{label}: null")
    flag(ts.unparsable, f"{label}: not a number or ISO-8601 datetime")
    flag(
        ts.out_of_range,
        f"{label}: out of range (expected a time from 1900 to 2300, in seconds since the epoch, "
        "milliseconds, microseconds or nanoseconds, or a datetime)",
    )
    out["timestamp"] = pa.array(ts.values, pa.int64())

    lab = parse.labels(batch[spec.columns["label"]])
    label = column_label(spec, "label")
    flag(lab.missing, f"{label}: null")
    flag(lab.not_a_number, f"{label}: not a number")
    flag(lab.outside, f"{label}: outside {{0, 1}}")
    out["label"] = pa.array(lab.values, pa.int8())

    if "split" in spec.columns:
        split, missing, unknown = parse.choices(batch[spec.columns["split"]], SPLIT_ALIASES)
        flag(missing, f"{column_label(spec, 'split')}: null (expected train/val/test)")
        flag(unknown, f"{column_label(spec, 'split')}: not one of train/val/test")
        out["split"] = pc.fill_null(split, "")

    for group in spec.groups().values():
        for col in group.numeric:
            num = parse.numbers(batch[col])
            flag(num.not_a_number, f"column {col!r}: not a number")
            flag(np.isinf(num.values), f"column {col!r}: not a finite number")
            out[col] = pa.array(num.values, pa.float64(), mask=~np.isfinite(num.values))
        for col, sep in [
            *((c, None) for c in group.categorical),
            *group.multi.items(),
            *((c, None) for c in group.text),
        ]:
            raw = batch[col]
            if sep is not None and pa.types.is_list(parse.plain(raw).type):
                raw = parse.joined(raw, sep)
            values, bad_utf8 = parse.keys(raw)
            flag(bad_utf8, f"column {col!r}: not valid UTF-8 text")
            out[col] = values

    out[TIME_UNIT] = pa.array(ts.unit, pa.string())
    files = batch["path"].cast(pa.string()) if "path" in batch.column_names else pa.array([""] * n, pa.string())
    out[SOURCE_FILE] = parse.plain(files)
    out[BAD_REASON] = pa.array(np.array(reasons, dtype=object)[code], pa.string())
    out[BAD_EXAMPLE] = pa.array(_examples(batch, spec, code, out[SOURCE_FILE]), pa.string())
    return pa.table(out)


def _valid(values: pa.Array) -> np.ndarray:
    return np.asarray(values.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def row_hash(columns: dict[str, pa.Array]) -> np.ndarray:
    """A 64-bit hash of each row's canonical values (`check_batch`'s columns): equal for exact duplicates (in
    any block: the hash depends on the values only). Text columns hash each distinct value once."""
    combined = np.zeros(next(iter(columns.values())).__len__(), dtype=np.uint64)
    for column in columns.values():
        combined = (combined * np.uint64(0x100000001B3)) ^ _column_hash(column)
    return combined


_NULL_HASH = np.uint64(0x9E3779B97F4A7C15)


def _column_hash(column: pa.Array) -> np.ndarray:
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = column.to_numpy(zero_copy_only=False)  # null -> NaN for floats; ints here have no nulls
        return pd.util.hash_array(values, categorize=False)
    encoded = pc.dictionary_encode(column)
    per_value = pd.util.hash_array(np.asarray(encoded.dictionary.to_numpy(zero_copy_only=False), dtype=object))
    indices = encoded.indices
    hashes = (
        per_value[np.asarray(pc.fill_null(indices, 0).to_numpy(zero_copy_only=False), dtype=np.int64)]
        if len(per_value)
        else np.zeros(len(column), dtype=np.uint64)
    )
    return np.where(np.asarray(indices.is_valid().to_numpy(zero_copy_only=False), dtype=bool), hashes, _NULL_HASH)


def _examples(batch: pa.Table, spec: SceneLogSpec, code: np.ndarray, files: pa.Array) -> list[str | None]:
    """The raw row as JSON for the first bad row of each (reason, file) in the batch; None elsewhere
    (a report shows one example per reason, so the others need not be built)."""
    examples: list[str | None] = [None] * batch.num_rows
    bad = np.flatnonzero(code)
    if len(bad):
        file_ids = np.asarray(pc.dictionary_encode(files).indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        _, first = np.unique(code[bad] * (int(file_ids.max()) + 1) + file_ids[bad], return_index=True)
        raw_cols = [*dict.fromkeys([*spec.columns.values(), *spec.feature_columns()])]
        raw = batch.select(raw_cols)
        for i in bad[first]:
            row = {k: _jsonable(v) for k, v in raw.slice(int(i), 1).to_pylist()[0].items()}
            examples[i] = json.dumps(row, default=str)
    return examples


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


SUMMARY_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("reason", pa.string()),
        ("file", pa.string()),
        ("rows", pa.int64()),
        ("example", pa.string()),
    ]
)


def summarize_bad_rows(batch: pa.Table) -> pa.Table:
    """One row per (reason, file) of this batch's bad rows, with how many and one example (kind "bad"),
    and per (unit, file) the good rows whose timestamps were converted from that unit (kind "unit")."""
    bad = batch.filter(pc.not_equal(batch[BAD_REASON], ""))
    parts = []
    if bad.num_rows:
        grouped = bad.group_by([BAD_REASON, SOURCE_FILE], use_threads=False).aggregate(
            [(BAD_REASON, "count"), (BAD_EXAMPLE, "first")]
        )
        parts.append(
            pa.table(
                {
                    "kind": pa.array(["bad"] * grouped.num_rows, pa.string()),
                    "reason": grouped[BAD_REASON],
                    "file": grouped[SOURCE_FILE],
                    "rows": grouped[f"{BAD_REASON}_count"].cast(pa.int64()),
                    "example": grouped[f"{BAD_EXAMPLE}_first"],
                }
            )
        )
    converted = batch.filter(pc.and_(pc.equal(batch[BAD_REASON], ""), pc.not_equal(batch[TIME_UNIT], "")))
    if converted.num_rows:
        grouped = converted.group_by([TIME_UNIT, SOURCE_FILE], use_threads=False).aggregate([(TIME_UNIT, "count")])
        parts.append(
            pa.table(
                {
                    "kind": pa.array(["unit"] * grouped.num_rows, pa.string()),
                    "reason": grouped[TIME_UNIT],
                    "file": grouped[SOURCE_FILE],
                    "rows": grouped[f"{TIME_UNIT}_count"].cast(pa.int64()),
                    "example": pa.nulls(grouped.num_rows, pa.string()),
                }
            )
        )
    return pa.concat_tables([p.cast(SUMMARY_SCHEMA) for p in parts]) if parts else SUMMARY_SCHEMA.empty_table()


def drop_bad_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch[BAD_REASON], "")).drop_columns([BAD_REASON, BAD_EXAMPLE, SOURCE_FILE, TIME_UNIT])


@dataclass
class BadRowReport:
    """Bad rows by reason and file, with one example each."""

    total_rows: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # reason -> file -> rows
    examples: dict[str, str] = field(default_factory=dict)  # reason -> raw row as JSON
    time_units: dict[str, int] = field(default_factory=dict)  # "ms" / "us" / "ns" -> good rows converted from it

    @classmethod
    def from_summaries(cls, rows: list[dict], total_rows: int) -> BadRowReport:
        report = cls(total_rows=total_rows)
        for row in rows:
            if row["kind"] == "unit":
                report.time_units[row["reason"]] = report.time_units.get(row["reason"], 0) + int(row["rows"])
                continue
            per_file = report.counts.setdefault(row["reason"], {})
            per_file[row["file"]] = per_file.get(row["file"], 0) + int(row["rows"])
            if row["example"] is not None:
                report.examples.setdefault(row["reason"], row["example"])
        return report

    @property
    def bad_rows(self) -> int:
        return sum(sum(files.values()) for files in self.counts.values())

    def per_reason(self) -> dict[str, int]:
        return {reason: sum(files.values()) for reason, files in sorted(self.counts.items())}

    def lines(self) -> list[str]:
        out = []
        for reason, files in sorted(self.counts.items()):
            where = ", ".join(f"{n:,} in {f}" for f, n in sorted(files.items()))
            rows = sum(files.values())
            out.append(f"{reason}: {rows:,} row{'s' if rows != 1 else ''} ({where}); e.g. {self.examples[reason]}")
        return out

    def raise_if_any(self) -> None:
        if self.bad_rows:
            detail = "; ".join(self.lines())
            raise DataValidationError(
                f"{self.bad_rows:,} of {self.total_rows:,} rows are invalid: {detail}. "
                "Fix the input, or pass --on-bad-rows drop to drop them (counts are reported)."
            )


def check_not_empty(total_rows: int, where: str) -> None:
    if total_rows == 0:
        raise DataValidationError(f"{where}: the input has no rows")


__all__ = ["SPLITS", "BadRowReport", "check_batch", "drop_bad_rows", "row_hash", "summarize_bad_rows"]
