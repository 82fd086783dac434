"""Finding and opening scene-log files: a file, a directory of shards or a glob, on any
filesystem pyarrow supports (local paths, s3://, gs://, hdfs://)."""

from __future__ import annotations

import fnmatch
import glob as globlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from msit.errors import DataValidationError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv"}


@dataclass
class Sources:
    """The resolved input files of one format on one filesystem."""

    files: list[str]
    format: str  # "parquet" | "csv"
    filesystem: pafs.FileSystem

    def describe(self) -> str:
        return self.files[0] if len(self.files) == 1 else f"{len(self.files)} {self.format} files"


def _format_of(path: str) -> str | None:
    lower = path.lower()
    for ext, fmt in FORMATS.items():
        if lower.endswith(ext):
            return fmt
    return None


def _is_data_file(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith((".", "_")) and _format_of(path) is not None


def resolve(inputs: list[str] | str) -> Sources:
    """Expand `inputs` into data files; refuse no match, mixed formats or mixed filesystems."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if not inputs:
        raise DataValidationError("no input given: pass a file, a directory of shards or a glob")
    files: list[str] = []
    filesystem = None
    for spec in inputs:
        fs, path = _filesystem_for(spec)
        if filesystem is not None and type(fs) is not type(filesystem):
            raise DataValidationError(f"inputs mix filesystems ({spec}); give inputs on one filesystem")
        filesystem = fs
        found = _expand(fs, path)
        if not found:
            raise DataValidationError(f"no .parquet or .csv files found at {spec!r}")
        files += found
    formats = {_format_of(f) for f in files}
    if len(formats) > 1:
        raise DataValidationError(f"inputs mix Parquet and CSV files ({files[:3]}...); convert them to one format")
    # Not None: _expand keeps only files of a known format.
    return Sources(files=sorted(dict.fromkeys(files)), format=cast(str, formats.pop()), filesystem=filesystem)


def _filesystem_for(spec: str) -> tuple[pafs.FileSystem, str]:
    if "://" in spec:
        try:
            return pafs.FileSystem.from_uri(spec.split("*")[0].rstrip("/") or spec)[0], spec.split("://", 1)[1]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise DataValidationError(f"cannot open {spec!r}: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(spec)


def _expand(fs: pafs.FileSystem, path: str) -> list[str]:
    if any(ch in path for ch in "*?["):
        if isinstance(fs, pafs.LocalFileSystem):
            return sorted(p for p in globlib.glob(path, recursive=True) if os.path.isfile(p) and _is_data_file(p))
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
        listing = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path for i in listing if i.is_file and fnmatch.fnmatch(i.path, path) and _is_data_file(i.path))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        if _format_of(path) is None:
            raise DataValidationError(f"{path}: unknown file type; expected .parquet or .csv")
        return [path]
    if info.type == pafs.FileType.Directory:
        listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(i.path for i in listing if i.is_file and _is_data_file(i.path))
    raise DataValidationError(f"input not found: {path}")


# Leading bytes of files that are not CSV text, whatever their name says.
_NOT_TEXT = {
    b"\x1f\x8b": "gzip-compressed data (name it .csv.gz)",
    b"PAR1": "a Parquet file (name it .parquet)",
    b"BZh": "bzip2-compressed data",
    b"\x28\xb5\x2f\xfd": "zstd-compressed data",
    b"PK\x03\x04": "a zip archive",
}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _csv_header(sources: Sources, path: str) -> list[str]:
    fs = sources.filesystem
    compressed = path.lower().endswith(".gz")
    with fs.open_input_stream(path) as stream:
        head = stream.read(4096)
    if not compressed:
        for magic, what in _NOT_TEXT.items():
            if head.startswith(magic):
                raise DataValidationError(f"{path}: not CSV text but {what}")
        if b"\x00" in head:
            raise DataValidationError(
                f"{path}: not CSV text (it holds NUL bytes: binary data or UTF-16 text); save it as UTF-8 CSV"
            )
    elif not head.startswith(b"\x1f\x8b"):
        raise DataValidationError(f"{path}: named .gz but not gzip-compressed")
    try:
        with fs.open_input_stream(path, compression="detect") as stream:
            # Only the header is used; the values are checked row by row later.
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=1 << 16),
                convert_options=pacsv.ConvertOptions(check_utf8=False),
            )
            return list(reader.schema.names)
    except UnicodeDecodeError:
        raise DataValidationError(f"{path}: the header line is not valid UTF-8 text") from None
    except (pa.ArrowInvalid, OSError) as e:
        if "Empty CSV file" in str(e):
            raise DataValidationError(f"{path}: no header line (the file holds no CSV text)") from None
        raise DataValidationError(f"{path}: cannot read it as CSV: {_one_line(e)}") from None


def inspect_files(sources: Sources) -> dict[str, pa.Schema]:
    """The schema of every input file, from its footer (Parquet) or header line (CSV: every column as bytes,
    since each value is parsed later). A file that is empty, is not what its name says, or repeats a
    column name is an error that names it."""
    schemas = {}
    infos = sources.filesystem.get_file_info(sources.files)
    for path, info in zip(sources.files, infos, strict=True):
        if info.size == 0:
            raise DataValidationError(
                f"{path}: the file is empty (0 bytes), so it is not a {sources.format} file; "
                "remove it or write it again"
            )
        if sources.format == "parquet":
            try:
                schema = pq.read_schema(path, filesystem=sources.filesystem)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataValidationError(f"{path}: not a readable Parquet file: {_one_line(e)}") from None
        else:
            schema = pa.schema([pa.field(name, pa.binary()) for name in _csv_header(sources, path)])
        repeated = sorted({n for n in schema.names if schema.names.count(n) > 1})
        if repeated:
            raise DataValidationError(
                f"{path}: column name(s) {repeated} appear more than once; give every column its own name"
            )
        schemas[path] = schema
    return schemas


def _kind(type_: pa.DataType) -> str:
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    if pa.types.is_null(type_):
        return "null"
    if pa.types.is_boolean(type_) or pa.types.is_integer(type_):
        return "int"
    if pa.types.is_floating(type_) or pa.types.is_decimal(type_):
        return "float"
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return "string"
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_fixed_size_binary(type_):
        return "binary"
    if pa.types.is_timestamp(type_) or pa.types.is_date(type_):
        return "time"
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return "list"
    return "other"


_COMMON = {  # kinds that differ between files -> the type they are all read as (then parsed per value)
    frozenset({"int", "float"}): pa.float64(),
    frozenset({"string", "binary"}): pa.binary(),
    frozenset({"time", "string"}): pa.string(),
    frozenset({"int", "string"}): pa.string(),
    frozenset({"float", "string"}): pa.string(),
    frozenset({"int", "float", "string"}): pa.string(),
}


def read_schema(schemas: dict[str, pa.Schema], columns: list[str], lists: Sequence[str] = ()) -> pa.Schema:
    """One schema for `columns` of every file, so that shards written with drifting types (an id int64 in one
    shard and string in another, int and float, string and dictionary) are read alike; values are parsed
    per role afterwards. Types that cannot be read alike, or that no role takes, are an error naming the
    files. `lists`: the columns that may be lists (multi-valued features)."""
    fields = []
    for col in columns:
        by_type: dict[pa.DataType, str] = {}
        for path, schema in schemas.items():
            by_type.setdefault(schema.field(col).type, path)
        for type_, path in by_type.items():
            if _kind(type_) == "other" or (_kind(type_) == "list" and col not in lists):
                raise DataValidationError(
                    f"{path}: column {col!r} has type {type_}, which msit cannot read; "
                    "expected numbers, strings, booleans or datetimes"
                )
        if len(by_type) == 1:
            fields.append(pa.field(col, next(iter(by_type))))
            continue
        kinds = {_kind(t) for t in by_type} - {"null"}
        target = None
        if len(kinds) == 1:
            kind = kinds.pop()
            target = {
                "int": pa.int64(),
                "float": pa.float64(),
                "string": pa.string(),
                "binary": pa.binary(),
                "time": pa.string(),
                "list": pa.list_(pa.string()),
            }[kind]
        elif kinds:
            target = _COMMON.get(frozenset(kinds))
        if target is None or not all(_castable(t, target) for t in by_type):
            (t1, p1), (t2, p2) = list(by_type.items())[:2]
            raise DataValidationError(
                f"column {col!r} has type {t1} in {p1} but {t2} in {p2}; write every shard with one type for it"
            )
        fields.append(pa.field(col, target))
    return pa.schema(fields)


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    try:
        pa.array([], type=source).cast(target)
        return True
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return False


def read_sample(sources: Sources, max_rows: int = 100_000) -> pd.DataFrame:
    """The first rows of the inputs, in the driver, for inferring the spec (call `inspect_files` first)."""
    frames, total = [], 0
    for path in sources.files:
        try:
            batches = _sample_file(sources, path, max_rows - total)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataValidationError(f"{path}: cannot read it as {sources.format}: {_one_line(e)}") from None
        frames += [b.to_pandas(ignore_metadata=True) for b in batches]
        total += sum(b.num_rows for b in batches)
        if total >= max_rows:
            break
    return pd.concat(frames, ignore_index=True).head(max_rows) if frames else pd.DataFrame()


def _sample_file(sources: Sources, path: str, max_rows: int) -> list[pa.RecordBatch]:
    if sources.format == "parquet":
        batches = pq.ParquetFile(path, filesystem=sources.filesystem).iter_batches(batch_size=min(max_rows, 65_536))
        return _first_rows(batches, max_rows)
    # As in the real read, only an empty cell is null. The sample only guides inference: a file that is
    # not UTF-8 is sampled as Latin-1 here, and validation reports its bad rows.
    convert = pacsv.ConvertOptions(null_values=[""], strings_can_be_null=True)
    try:
        with sources.filesystem.open_input_stream(path, compression="detect") as stream:
            return _first_rows(pacsv.open_csv(stream, convert_options=convert), max_rows)
    except pa.ArrowInvalid as e:
        if "UTF8" not in str(e):
            raise
    with sources.filesystem.open_input_stream(path, compression="detect") as stream:
        return _first_rows(
            pacsv.open_csv(stream, read_options=pacsv.ReadOptions(encoding="latin-1"), convert_options=convert),
            max_rows,
        )


def _first_rows(batches, max_rows: int) -> list[pa.RecordBatch]:
    out, total = [], 0
    for batch in batches:
        out.append(batch)
        total += batch.num_rows
        if total >= max_rows:
            break
    return out
