"""Per-value parsing of raw scene-log columns, with pyarrow compute.

Every value is parsed against its column's role, whatever type the file gave the column: CSV columns
arrive as text (bytes, so that a non-UTF-8 byte is a bad row rather than a failed read), Parquet
columns as ints, floats, strings, binary, booleans, dictionaries or datetimes. The same value gives
the same result in every format. Vectorised: no Python call per value, except to locate the rows of
a column that holds invalid UTF-8 (an error path).

Rules (docs/data.md, "Scene logs"):
- ids, scenes and categories become strings: surrounding whitespace is removed, an empty string is
  null, integers written as decimals are the integer (`7`, `7.0`, `"7"`, `" 7 "` are one id),
  booleans are `1`/`0`, binary values are decoded as UTF-8;
- numbers (labels, numeric features, timestamps) accept numbers and numeric text; NaN is a missing
  value like null; in CSV only an empty cell is null (`NA` and `null` are text, as in Parquet);
- timestamps are seconds since the epoch, or a datetime or ISO-8601 string; numbers of 1e11 or more
  are taken as milliseconds (< 1e14), microseconds (< 1e17) or nanoseconds (< 1e20) and converted;
  anything outside the years 1900-2300 is out of range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_INT_AS_DECIMAL = r"^(-?\d+)\.0*$"  # "7.0", "7." -> "7"
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|infinity|nan)$"
_ISO_8601 = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}([.,]\d+)?)?)?\s*(Z|[+-]\d{2}(:?\d{2})?)?$"
_EXACT_FLOAT_INT = 2.0**53  # integral floats below this print as the integer

# Accepted time range, in seconds since the epoch: 1900-01-01 to 2300-01-01 (UTC).
MIN_SECONDS, MAX_SECONDS = -2_208_988_800, 10_413_792_000
# Numbers at or above each bound (in absolute value) are taken to be in the next unit.
UNITS = (("s", 1e11, 1.0), ("ms", 1e14, 1e3), ("us", 1e17, 1e6), ("ns", 1e20, 1e9))
TEXT_TYPES = (
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_binary,
    pa.types.is_large_binary,
    pa.types.is_fixed_size_binary,
)


def plain(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array, dictionaries decoded."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def is_text(type_: pa.DataType) -> bool:
    return any(check(type_) for check in TEXT_TYPES)


def is_number(type_: pa.DataType) -> bool:
    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_decimal(type_)


def _mask(values: pa.Array) -> np.ndarray:
    """A boolean array (null = False) as numpy."""
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


def text(column: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """A text column (string or bytes) as UTF-8 strings with surrounding whitespace removed, and the mask
    of values that are not valid UTF-8 (null in the result)."""
    arr = plain(column)
    bad = np.zeros(len(arr), dtype=bool)
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string()), bad
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        try:
            arr = arr.cast(pa.string())
        except pa.ArrowInvalid:  # some value is not UTF-8: find which (an error path, so one call per value)
            decoded = []
            for i, value in enumerate(arr.to_pylist()):
                try:
                    decoded.append(None if value is None else value.decode("utf-8"))
                except UnicodeDecodeError:
                    decoded.append(None)
                    bad[i] = True
            arr = pa.array(decoded, pa.string())
    return pc.utf8_trim_whitespace(arr.cast(pa.string())), bad


def keys(column: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Ids, scenes and categories as strings, one spelling per value in every format (module docstring).
    Returns (strings, null where missing or empty; mask of values that are not valid UTF-8)."""
    arr = plain(column)
    t = arr.type
    bad = np.zeros(len(arr), dtype=bool)
    if pa.types.is_boolean(t):
        out = arr.cast(pa.int8()).cast(pa.string())
    elif pa.types.is_integer(t):
        out = arr.cast(pa.string())
    elif pa.types.is_floating(t) or pa.types.is_decimal(t):
        x = arr.cast(pa.float64(), safe=False)  # int64 beyond 2**53: nearest float
        x = pc.if_else(pc.is_nan(x), pa.scalar(None, pa.float64()), x)
        integral = pc.and_(pc.equal(pc.floor(x), x), pc.less(pc.abs(x), _EXACT_FLOAT_INT))
        as_int = pc.if_else(integral, x, pa.scalar(None, pa.float64())).cast(pa.int64()).cast(pa.string())
        out = pc.if_else(integral, as_int, x.cast(pa.string()))
    elif is_text(t) or pa.types.is_null(t):
        # Each distinct value is parsed once: ids and scenes repeat over many rows.
        encoded = pc.dictionary_encode(arr) if not pa.types.is_null(t) else None
        out, bad = text(encoded.dictionary if encoded is not None else arr)
        out = pc.replace_substring_regex(out, pattern=_INT_AS_DECIMAL, replacement=r"\1")
        if encoded is not None:
            bad = (
                np.zeros(len(arr), dtype=bool)
                if not bad.any()
                else np.asarray(
                    pc.fill_null(pc.take(pa.array(bad), encoded.indices), False).to_numpy(zero_copy_only=False),
                    dtype=bool,
                )
            )
            out = pc.take(out, encoded.indices)
    elif pa.types.is_temporal(t):
        out = arr.cast(pa.string())
    else:
        raise TypeError(f"unsupported column type {t}")
    out = out.cast(pa.string())
    return pc.if_else(pc.equal(out, ""), pa.scalar(None, pa.string()), out), bad


def normalize_key(value: Any) -> str | None:
    """One raw id or category as the data layer stores it (None when missing): request ids at serving
    time must go through this, so that they meet the vocabularies' spelling."""
    return normalize_keys([value])[0]


def normalize_keys(values: list) -> list[str | None]:
    """`normalize_key` of many values at once (one vectorised call when they share a type)."""
    try:
        return keys(pa.array(values))[0].to_pylist()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError, UnicodeError):
        if len(values) > 1:  # mixed types: one at a time
            return [normalize_key(v) for v in values]
        # An int beyond int64 (no file holds one as a number) or a string that is not UTF-8-encodable (a lone
        # surrogate, which no file holds at all): as text, which meets no vocabulary entry.
        return [str(values[0]).strip() or None]


@dataclass
class Numbers:
    values: np.ndarray  # float64; NaN where missing or invalid
    missing: np.ndarray  # null, empty or NaN
    not_a_number: np.ndarray  # present but not a number (a word, a datetime, ...)


def numbers(column: pa.Array | pa.ChunkedArray) -> Numbers:
    """Numbers from a column of any type: numeric text is parsed, NaN counts as missing."""
    arr = plain(column)
    t = arr.type
    n = len(arr)
    bad = np.zeros(n, dtype=bool)
    if pa.types.is_boolean(t) or is_number(t):
        x = arr.cast(pa.float64(), safe=False)  # int64 beyond 2**53: nearest float
    elif is_text(t) or pa.types.is_null(t):
        s, bad = text(arr)
        numeric = pc.match_substring_regex(s, pattern=_NUMBER, ignore_case=True)
        x = pc.if_else(numeric, s, pa.scalar(None, pa.string())).cast(pa.float64())
        bad = bad | (_mask(pc.invert(numeric)) & _mask(pc.not_equal(s, "")))
    else:  # datetimes, lists, ...: present values are not numbers
        x = pa.nulls(n, pa.float64())
        bad = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    values = np.asarray(x.to_numpy(zero_copy_only=False), dtype=np.float64)  # null -> NaN
    return Numbers(values, np.isnan(values) & ~bad, bad)


@dataclass
class Seconds:
    values: np.ndarray  # int64 seconds since the epoch; 0 where invalid
    missing: np.ndarray
    unparsable: np.ndarray
    out_of_range: np.ndarray
    unit: np.ndarray  # per row: "" (seconds, datetime or ISO-8601), "ms", "us" or "ns": what was converted


def seconds(column: pa.Array | pa.ChunkedArray) -> Seconds:
    """Timestamps as int64 seconds since the epoch (module docstring)."""
    arr = plain(column)
    t = arr.type
    n = len(arr)
    unit = np.full(n, "", dtype=object)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
        raw = arr.cast(pa.timestamp("s" if pa.types.is_date32(t) else "ms")) if pa.types.is_date(t) else arr
        ticks = raw.cast(pa.int64())
        f = per_second[raw.type.unit]
        floor = pc.divide(pc.subtract(ticks, pc.if_else(pc.less(ticks, 0), f - 1, 0)), f)  # floor, not truncation
        secs = np.asarray(floor.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        missing = np.isnan(secs)
        unparsable = np.zeros(n, dtype=bool)
    else:
        num = numbers(arr)
        x, magnitude = num.values, np.abs(num.values)
        secs = np.full(n, np.nan)  # stays NaN beyond nanoseconds or for inf: out of range below
        lower = 0.0
        for name, upper, factor in UNITS:
            in_unit = (magnitude >= lower) & (magnitude < upper)
            secs[in_unit] = np.floor(x[in_unit] / factor)
            if name != "s":
                unit[in_unit] = name
            lower = upper
        missing, unparsable = num.missing, num.not_a_number.copy()
        if unparsable.any() and is_text(t):  # not numbers: ISO-8601 strings?
            s = text(arr)[0]
            iso = unparsable & _mask(pc.match_substring_regex(s, pattern=_ISO_8601))
            if iso.any():
                strings = pc.filter(s, pa.array(iso)).to_numpy(zero_copy_only=False)
                parsed = pd.to_datetime(pd.Series(strings, dtype=object), utc=True, errors="coerce", format="ISO8601")
                from_iso = ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(
                    dtype=np.float64, na_value=np.nan
                )
                secs[iso] = from_iso
                unparsable[iso] = np.isnan(from_iso)
    valid = ~missing & ~unparsable
    out_of_range = valid & ~((secs >= MIN_SECONDS) & (secs < MAX_SECONDS))
    good = valid & ~out_of_range
    unit[~good] = ""
    values = np.where(good, secs, 0).astype(np.int64)
    return Seconds(values, missing, unparsable, out_of_range, unit)


@dataclass
class Labels:
    values: np.ndarray  # int8 0/1; 0 where invalid
    missing: np.ndarray
    not_a_number: np.ndarray
    outside: np.ndarray  # a number, but not 0 or 1


def labels(column: pa.Array | pa.ChunkedArray) -> Labels:
    """0/1 labels: numbers, numeric text, booleans and the words true/false (any case)."""
    arr = plain(column)
    if is_text(arr.type):
        s, bad_utf8 = text(arr)
        lower = pc.utf8_lower(s)
        word = pc.index_in(lower, value_set=pa.array(["false", "true"]))  # -> 0 / 1
        num = numbers(pc.if_else(word.is_valid(), pa.scalar(None, pa.string()), s))
        is_word = np.asarray(word.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        values = np.where(is_word, word.cast(pa.float64()).to_numpy(zero_copy_only=False), num.values)
        num = Numbers(values.astype(np.float64), num.missing & ~is_word, num.not_a_number | bad_utf8)
    else:
        num = numbers(arr)
    ok = (num.values == 0) | (num.values == 1)
    outside = ~np.isnan(num.values) & ~ok
    return Labels(np.where(ok, num.values, 0).astype(np.int8), num.missing, num.not_a_number, outside)


def choices(column: pa.Array | pa.ChunkedArray, aliases: dict[str, str]) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Values looked up case-insensitively in `aliases` (e.g. the split names).
    Returns (canonical names, null where invalid; mask missing; mask not one of the aliases)."""
    s = keys(column)[0]  # trimmed; empty is null
    lower = pc.utf8_lower(s)
    names = list(aliases)
    found = pc.index_in(lower, value_set=pa.array(names))
    canonical = pc.take(pa.array([aliases[k] for k in names], pa.string()), found)
    missing = ~np.asarray(s.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    unknown = ~missing & ~np.asarray(found.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    return canonical, missing, unknown


def joined(column: pa.Array | pa.ChunkedArray, sep: str) -> pa.Array:
    """A list column (a Parquet multi-valued feature) as one separated string per row."""
    arr = plain(column)
    return pc.binary_join(arr.cast(pa.list_(pa.string())), sep)
