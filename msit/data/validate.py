"""Row validation: turn a batch of raw scene-log rows into canonical columns and flag bad rows.

`check_batch` runs inside Ray Data's `map_batches`. Every row gets `_bad_reason` (empty when
the row is good; otherwise the first problem found, so that counts per reason add up to the
number of bad rows) and bad rows keep a JSON copy of their raw values in `_bad_example`.
`BadRowReport` gathers those into the message a user sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from msit.data.spec import SceneLogSpec
from msit.errors import DataValidationError

SOURCE_FILE = "_source_file"
BAD_REASON = "_bad_reason"
BAD_EXAMPLE = "_bad_example"
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


def _column_label(spec: SceneLogSpec, role: str) -> str:
    src = spec.columns.get(role, role)
    return f"column {src!r}" if src == role else f"column {src!r} ({role})"


def to_key(raw: pd.Series) -> pd.Series:
    """Ids and categories as strings, so that 7, 7.0 and "7" are one value across files."""
    if pd.api.types.is_bool_dtype(raw):
        raw = raw.astype("Int64")
    if pd.api.types.is_float_dtype(raw):
        finite = raw.dropna()
        if (finite == np.floor(finite)).all():
            raw = raw.astype("Int64")
    out = raw.astype(object).where(raw.notna(), None).map(_key)
    return out.where(out != "", None)


def _key(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    return str(value)


def to_seconds(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Timestamps as int64 seconds since the epoch: numbers as they are, datetimes and ISO-8601
    strings converted. Returns (seconds with NA where invalid, mask of non-null unparsable values)."""
    if pd.api.types.is_datetime64_any_dtype(raw):
        utc = raw.dt.tz_convert("UTC") if raw.dt.tz is not None else raw.dt.tz_localize("UTC")
        seconds = (utc - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        return seconds.astype("Int64"), pd.Series(False, index=raw.index)
    numbers = pd.to_numeric(raw, errors="coerce") if not pd.api.types.is_bool_dtype(raw) else raw * np.nan
    unparsed = numbers.isna() & raw.notna()
    if unparsed.any():
        parsed = pd.to_datetime(raw[unparsed].astype(str), utc=True, errors="coerce", format="ISO8601")
        numbers = numbers.astype("float64")
        numbers[unparsed] = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    seconds = np.floor(numbers.astype("float64"))
    return seconds.astype("Int64"), seconds.isna() & raw.notna()


def check_batch(batch: pd.DataFrame, spec: SceneLogSpec) -> pd.DataFrame:
    """Canonical columns for every row, plus `_bad_reason` / `_bad_example` / `_source_file`."""
    bad = pd.Series("", index=batch.index, dtype=object)

    def flag(mask: pd.Series, reason: str) -> None:
        bad[(bad == "") & mask.fillna(False).astype(bool)] = reason

    out = pd.DataFrame(index=batch.index)
    for role in ("user_id", "item_id", "scenario"):
        out[role] = to_key(batch[spec.columns[role]])
        flag(out[role].isna(), f"{_column_label(spec, role)}: null or empty")

    raw_ts = batch[spec.columns["timestamp"]]
    seconds, unparsable = to_seconds(raw_ts)
    flag(raw_ts.isna(), f"{_column_label(spec, 'timestamp')}: null")
    flag(unparsable, f"{_column_label(spec, 'timestamp')}: not a number or ISO-8601 datetime")
    out["timestamp"] = seconds.fillna(0).astype("int64")

    raw_label = batch[spec.columns["label"]]
    label = pd.to_numeric(raw_label.astype("Int64") if pd.api.types.is_bool_dtype(raw_label) else raw_label,
                          errors="coerce")
    flag(raw_label.isna(), f"{_column_label(spec, 'label')}: null")
    flag(label.isna() & raw_label.notna(), f"{_column_label(spec, 'label')}: not a number")
    flag(~label.isin([0, 1]) & label.notna(), f"{_column_label(spec, 'label')}: outside {{0, 1}}")
    out["label"] = label.where(label.isin([0, 1]), 0).astype("int8")

    if "split" in spec.columns:
        raw_split = batch[spec.columns["split"]]
        split = raw_split.astype(object).map(lambda v: SPLIT_ALIASES.get(str(v).strip().lower()) if v is not None
                                             and v == v else None)
        flag(split.isna(), f"{_column_label(spec, 'split')}: not one of train/val/test")
        out["split"] = split.fillna("")

    for group in spec.groups().values():
        for col in group.numeric:
            raw = batch[col]
            values = pd.to_numeric(raw, errors="coerce")
            flag(values.isna() & raw.notna(), f"column {col!r}: not a number")
            out[col] = values.astype("float64")
        for col in [*group.categorical, *group.multi, *group.text]:
            out[col] = to_key(batch[col])

    out[SOURCE_FILE] = batch["path"].astype(str) if "path" in batch else ""
    out[BAD_REASON] = bad
    out[BAD_EXAMPLE] = ""
    is_bad = bad != ""
    if is_bad.any():
        raw_cols = [*dict.fromkeys([*spec.columns.values(), *spec.feature_columns()])]
        examples = batch.loc[is_bad, raw_cols].astype(object).where(batch.loc[is_bad, raw_cols].notna(), None)
        out.loc[is_bad, BAD_EXAMPLE] = [json.dumps(r, default=str) for r in examples.to_dict("records")]
    return out


def summarize_bad_rows(batch: pd.DataFrame) -> pd.DataFrame:
    """One row per (reason, file) in this batch: how many bad rows, and one example."""
    bad = batch[batch[BAD_REASON] != ""]
    if bad.empty:
        return pd.DataFrame({"reason": [], "file": [], "rows": [], "example": []})
    grouped = bad.groupby([BAD_REASON, SOURCE_FILE], sort=False)
    summary = grouped[BAD_EXAMPLE].agg(["size", "first"]).reset_index()
    summary.columns = ["reason", "file", "rows", "example"]
    return summary


def drop_bad_rows(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch[BAD_REASON] == ""].drop(columns=[BAD_REASON, BAD_EXAMPLE, SOURCE_FILE])


@dataclass
class BadRowReport:
    """Bad rows by reason and file, with one example each."""

    total_rows: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # reason -> file -> rows
    examples: dict[str, str] = field(default_factory=dict)  # reason -> raw row as JSON

    @classmethod
    def from_summaries(cls, rows: list[dict], total_rows: int) -> BadRowReport:
        report = cls(total_rows=total_rows)
        for row in rows:
            per_file = report.counts.setdefault(row["reason"], {})
            per_file[row["file"]] = per_file.get(row["file"], 0) + int(row["rows"])
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


__all__ = ["SPLITS", "BadRowReport", "check_batch", "drop_bad_rows", "summarize_bad_rows", "to_key", "to_seconds"]
