"""Finding and opening scene-log files: a file, a directory of shards or a glob, on any
filesystem pyarrow supports (local paths, s3://, gs://, hdfs://)."""

from __future__ import annotations

import fnmatch
import glob as globlib
import os
from dataclasses import dataclass

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
    return Sources(files=sorted(dict.fromkeys(files)), format=formats.pop(), filesystem=filesystem)


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


def column_names(sources: Sources, path: str) -> list[str]:
    """The column names of one file, read from its footer or header line only."""
    try:
        if sources.format == "parquet":
            return list(pq.read_schema(path, filesystem=sources.filesystem).names)
        with sources.filesystem.open_input_stream(path, compression="detect") as stream:
            return list(pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema.names)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataValidationError(f"{path}: cannot read it as {sources.format}: {e}") from None


def read_sample(sources: Sources, max_rows: int = 100_000) -> pd.DataFrame:
    """The first rows of the inputs, in the driver, for inferring the spec."""
    frames, total = [], 0
    for path in sources.files:
        if sources.format == "parquet":
            parquet = pq.ParquetFile(path, filesystem=sources.filesystem)
            batches = parquet.iter_batches(batch_size=min(max_rows, 65_536))
        else:
            stream = sources.filesystem.open_input_stream(path, compression="detect")
            batches = pacsv.open_csv(stream)
        for batch in batches:
            frames.append(batch.to_pandas())
            total += batch.num_rows
            if total >= max_rows:
                break
        if total >= max_rows:
            break
    return pd.concat(frames, ignore_index=True).head(max_rows) if frames else pd.DataFrame()
