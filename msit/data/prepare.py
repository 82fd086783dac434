"""`msit data prepare`: scene logs in, processed shards and a feature spec out, on Ray Data.

    read -> validate -> (split) -> fit vocabularies -> encode -> behaviour histories -> write

The log never passes through the driver: every step is a Ray Data operation over blocks.
Only small things come back to the driver: bad-row summaries, value counts (the vocabularies)
and row counts. Everything is written into a staging folder and renamed into place (msit.output_dir).

Output directory:
    train/ val/ test/      Parquet shards of encoded events with their behaviour histories
    items.parquet          one row per item: index, raw key, side features, text
    users.parquet          one row per user: index, raw key, side features
    feature_spec.json      vocabularies, scenes, field types, history length, row counts
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray

from msit.config import from_dict
from msit.data import notes as note_on
from msit.data import sources as src
from msit.data.feature_spec import FEATURE_SPEC_FILE, FeatureSpec, FieldInfo
from msit.data.history import DUPLICATE, add_histories, assign_split
from msit.data.spec import SceneLogSpec, infer_spec, resolve_roles
from msit.data.validate import (
    SPLITS,
    BadRowReport,
    check_batch,
    check_not_empty,
    column_label,
    drop_bad_rows,
    summarize_bad_rows,
)
from msit.data.vocab import (
    Encoders,
    count_batch,
    encode_batch,
    encoders_from_feature_spec,
    multi_fields,
    split_stats,
)
from msit.errors import ConfigError, DataValidationError
from msit.output_dir import writing
from msit.ray_env import init_ray


@dataclass
class PrepareConfig:
    inputs: list[str]
    out: str
    spec: SceneLogSpec | None = None
    history_length: int = 50
    min_count: int = 1
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)  # used when the log has no split column
    on_bad_rows: str = "error"  # "error" | "drop"
    multi_max_len: int = 16  # tokens kept per multi-valued feature
    num_partitions: int | None = None  # of the per-user shuffle; default from the row count
    num_cpus: int | None = None  # of a new local Ray instance, if Ray is not running yet
    encoding_from: str | None = None  # a model or prepared directory: reuse its encoding instead of fitting one
    extend_vocab: bool = False  # with encoding_from: keep its indices, append the new ids and scenes (fine-tuning)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.on_bad_rows not in ("error", "drop"):
            raise ConfigError(f"on_bad_rows must be 'error' or 'drop', got {self.on_bad_rows!r}")
        if self.history_length < 1:
            raise ConfigError(f"history_length must be at least 1, got {self.history_length}")
        if self.min_count < 1:
            raise ConfigError(f"min_count must be at least 1, got {self.min_count}")
        ratios = tuple(float(r) for r in self.split_ratios)
        if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6 or ratios[0] <= 0:
            raise ConfigError(f"split ratios must be three non-negative numbers train,val,test summing to 1 "
                              f"with train > 0, got {self.split_ratios}")
        self.split_ratios = ratios
        if self.extend_vocab and not self.encoding_from:
            raise ConfigError("extend_vocab grows the encoding of another directory: set encoding_from as well")


@dataclass
class PrepareResult:
    out: Path
    feature_spec: FeatureSpec
    bad_rows: BadRowReport
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


class _Steps:
    """Prints numbered steps with their durations; keeps the durations for the report."""

    def __init__(self, total: int, log):
        self.total, self.n, self.log, self.seconds = total, 0, log, {}
        self._name, self._t0 = None, 0.0

    def start(self, name: str) -> None:
        self.done()
        self.n += 1
        self._name, self._t0 = name, time.perf_counter()
        self.log(f"[{self.n}/{self.total}] {name} ...")

    def done(self) -> None:
        if self._name:
            self.seconds[self._name] = round(time.perf_counter() - self._t0, 3)
            self._name = None


def prepare(cfg: PrepareConfig, log=print) -> PrepareResult:
    """Read, validate, encode and write `cfg.inputs` to `cfg.out`. Everything is written into a staging folder
    beside `cfg.out` and renamed into place at the end: a failed run leaves an earlier output as it was, a
    second run into the same `cfg.out` at once is refused, and `--overwrite` only replaces msit's own output."""
    sources = src.resolve(cfg.inputs)  # a missing input is reported before anything else
    inputs = [*sources.files, *(p for p in cfg.inputs if Path(p).is_dir())]
    with writing(cfg.out, marker=FEATURE_SPEC_FILE, overwrite=cfg.overwrite, inputs=inputs) as staging:
        result = _prepare(cfg, sources, staging, log)
    log(f"done: {result.feature_spec.row_counts['train']:,} train / {result.feature_spec.row_counts['val']:,} val / "
        f"{result.feature_spec.row_counts['test']:,} test rows in {result.out}")
    return result


def _prepare(cfg: PrepareConfig, sources: src.Sources, staging: Path, log) -> PrepareResult:
    steps = _Steps(7, log)

    def note(text: str) -> None:
        notes.append(text)
        log(f"      note: {text}")

    steps.start("finding inputs and checking columns")
    schemas = src.inspect_files(sources)
    sample = src.read_sample(sources)
    check_not_empty(len(sample), sources.describe())  # the sample reads on until it finds rows
    reused = FeatureSpec.load(cfg.encoding_from) if cfg.encoding_from else None
    if reused is not None:  # the same roles and features as the data the encoding was fitted on (the
        # caller's config is left as it was)
        cfg = replace(cfg, history_length=reused.history_length, spec=from_dict(
            SceneLogSpec, reused.source["spec"], where=f"{cfg.encoding_from} feature spec"))
    spec, notes = infer_spec(sample, cfg.spec, where=sources.files[0])
    for text in notes:
        log(f"      note: {text}")
    needed = list(dict.fromkeys([*spec.columns.values(), *spec.feature_columns()]))
    for path, schema in schemas.items():
        present = schema.names
        resolve_roles(spec, present, where=path)
        missing = [c for c in spec.feature_columns() if c not in present]
        if missing:
            raise DataValidationError(f"{path}: missing feature column(s) {missing} declared in the spec; "
                                      f"columns present: {present}")
    if "path" in needed:
        raise DataValidationError("a column named 'path' clashes with msit's record of each row's file; rename it")
    schema = src.read_schema(schemas, needed, lists=list(multi_fields(spec)))

    steps.start(f"reading and validating {sources.describe()}")
    init_ray(num_cpus=cfg.num_cpus)  # only now: input mistakes are reported without waiting for Ray
    with _reading(sources):
        checked = _read(sources, schema).map_batches(check_batch, batch_format="pyarrow", batch_size=None,
                                                     fn_kwargs={"spec": spec}).materialize()
    total_rows = checked.count()
    check_not_empty(total_rows, ", ".join(cfg.inputs))
    summaries = checked.map_batches(summarize_bad_rows, batch_format="pyarrow", batch_size=None).take_all()
    report = BadRowReport.from_summaries(summaries, total_rows)
    if cfg.on_bad_rows == "error":
        report.raise_if_any()
    for line in report.lines():
        log(f"      dropped {line}")
    if report.bad_rows == total_rows:
        raise DataValidationError(f"all {total_rows:,} rows of the input are invalid: {'; '.join(report.lines())}")
    for text in note_on.time_units(column_label(spec, "timestamp"), report.time_units):
        note(text)
    good = checked.map_batches(drop_bad_rows, batch_format="pyarrow", batch_size=None)

    if "split" not in spec.columns:
        steps.start(f"splitting each user's events chronologically {cfg.split_ratios}")
        # Materialised: the split feeds two passes (vocabularies, encoding) and the shuffle must run once.
        good = good.groupby("user_id", num_partitions=_partitions(cfg, total_rows)).map_groups(
            assign_split, batch_format="numpy", fn_kwargs={"ratios": cfg.split_ratios}).materialize()
        where = f"the chronological split {cfg.split_ratios}"
    else:
        steps.start(f"using the split column {spec.columns['split']!r}")
        where = f"the split column {spec.columns['split']!r}"
    split_counts, _ = _count_rows(good)
    if not split_counts.get("train"):
        raise DataValidationError(f"the training split is empty: {where} gives 0 train rows "
                                  f"({split_counts.get('val', 0):,} val, {split_counts.get('test', 0):,} test)")

    if reused is not None and not cfg.extend_vocab:
        steps.start(f"reusing the encoding of {cfg.encoding_from} (ids it has not seen become out-of-vocabulary)")
        encoders = encoders_from_feature_spec(reused)
    else:
        steps.start("fitting vocabularies on the training split" if reused is None else
                    f"extending the encoding of {cfg.encoding_from} by the new ids and scenes of the training split")
        counts = good.map_batches(count_batch, batch_format="pandas", fn_kwargs={"spec": spec})
        counts = counts.groupby(["field", "value"], num_partitions=_partitions(cfg, total_rows)).sum("count")
        counts = counts.to_pandas().rename(columns={"sum(count)": "count"})
        if reused is None:
            encoders = Encoders.fit(counts, spec, cfg.min_count, cfg.multi_max_len)
        else:
            encoders = encoders_from_feature_spec(reused).extended(counts, spec, cfg.min_count)
            log("      " + ", ".join(f"{name}: +{len(encoders.vocabularies[name]) - len(values):,}"
                                     for name, values in reused.vocabularies.items()))
        stats = split_stats(counts)
        for text in [*note_on.scenes(stats.scenes, encoders.vocabularies["scenario"].values[2:]),
                     *note_on.users_without_train(stats.users_without_train, stats.events_without_train,
                                                  cfg.split_ratios)]:
            note(text)
    if len(encoders.vocabularies["item_id"]) <= 2:
        raise DataValidationError("the training split is empty: no rows have split == 'train'")
    for col, n in encoders.multi_truncated.items():
        if n:
            log(f"      note: {n:,} training rows have more than {encoders.multi_max_len[col]} {col!r} values; "
                "the rest are cut (raise --multi-max-len to keep them)")

    steps.start(f"encoding and building behaviour histories (last {cfg.history_length} earlier events)")
    encoded = good.map_batches(encode_batch, batch_format="pandas", fn_kwargs={"encoders": encoders, "spec": spec})
    events = encoded.groupby("user_key", num_partitions=_partitions(cfg, total_rows)).map_groups(
        add_histories, batch_format="numpy", fn_kwargs={"history_length": cfg.history_length}).materialize()

    steps.start(f"writing shards to {cfg.out}")
    split_counts, duplicates = _count_rows(events)
    for text in note_on.duplicates(duplicates):
        note(text)
    for split in SPLITS:
        if split_counts.get(split, 0):
            rows = events.map_batches(_rows_of_split, batch_format="pyarrow", fn_kwargs={"split": split})
            rows.drop_columns([*spec.item.text, DUPLICATE]).write_parquet(str(staging / split),
                                                                          min_rows_per_file=50_000)
    _write_table(events, "item_key", ["item_id", *spec.item.columns()], staging / "items.parquet")
    _write_table(events, "user_key", ["user_id", *spec.user.columns()], staging / "users.parquet")

    steps.start("writing the feature spec")
    feature_spec = _feature_spec(spec, encoders, cfg, sources, report, total_rows, split_counts, notes)
    feature_spec.save(staging)
    steps.done()
    return PrepareResult(Path(cfg.out), feature_spec, report, notes, steps.seconds)


@contextmanager
def _reading(sources: src.Sources) -> Iterator[None]:
    """A read that fails inside Ray on a file pyarrow cannot parse (a CSV line with too many fields past the
    sampled rows, a corrupt Parquet page) is one line naming the input and pyarrow's reason, not a Ray
    traceback."""
    try:
        yield
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if not isinstance(cause, pa.ArrowException | OSError | UnicodeDecodeError | ValueError):
            raise
        # Ray re-raises pyarrow's CSV errors as a ValueError that names the file but drops pyarrow's reason:
        # read that file again here (an error path) to find it.
        failed = re.search(r"Failed to read CSV file: (.+?)\. Please check", str(cause))
        reason = src.csv_error(sources, failed.group(1)) if failed else None
        if failed and reason:
            raise DataValidationError(f"{failed.group(1)}: cannot read it as CSV: {reason}") from None
        message = " ".join(str(cause).split("\n")[0].split())
        raise DataValidationError(f"{sources.describe()}: cannot read the input: {message}") from None


def _read(sources: src.Sources, schema: pa.Schema) -> ray.data.Dataset:
    columns = [*schema.names, "path"]
    if sources.format == "parquet":
        # One schema for every shard (src.read_schema): shards whose types drift are read alike.
        return ray.data.read_parquet(sources.files, filesystem=sources.filesystem, schema=schema,
                                     include_paths=True).select_columns(columns)
    # Every CSV column is read as bytes and parsed by our own validation, so that a bad value (a word in a
    # number, a byte that is not UTF-8) is reported with its row count instead of failing the read.
    # Only an empty cell is null: "NA" or "null" are text, as they are in Parquet.
    convert = pacsv.ConvertOptions(column_types={c: pa.binary() for c in schema.names}, include_columns=schema.names,
                                   strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=True)
    return ray.data.read_csv(sources.files, filesystem=sources.filesystem, include_paths=True,
                             convert_options=convert)


def _partitions(cfg: PrepareConfig, rows: int) -> int:
    return cfg.num_partitions or int(np.clip(rows // 250_000 + 1, 2, 256))


def _count_splits(batch: pd.DataFrame) -> pd.DataFrame:
    counts = batch["split"].value_counts()
    duplicates = int(batch[DUPLICATE].sum()) if DUPLICATE in batch else 0
    return pd.DataFrame({"split": [*counts.index.astype(str), DUPLICATE],
                         "rows": [*counts.to_numpy(), duplicates]})


def _count_rows(ds: ray.data.Dataset) -> tuple[dict[str, int], int]:
    """Rows per split, and exact duplicate rows (once histories have marked them)."""
    counts: dict[str, int] = {}
    for row in ds.map_batches(_count_splits, batch_format="pandas").take_all():
        counts[row["split"]] = counts.get(row["split"], 0) + int(row["rows"])
    duplicates = counts.pop(DUPLICATE, 0)
    return counts, duplicates


def _rows_of_split(batch: pa.Table, split: str) -> pa.Table:
    return batch.filter(pc.equal(batch["split"], split))


def _latest_per_key(batch: pd.DataFrame, key: str) -> pd.DataFrame:
    return batch.sort_values("timestamp", kind="stable").drop_duplicates(key, keep="last")


def _write_table(events: ray.data.Dataset, key: str, columns: list[str], path: Path) -> None:
    """One row per key with the latest event's values (e.g. items with features and text).
    Blocks are deduplicated in Ray; what reaches the driver is O(keys), like the vocabularies."""
    latest = events.select_columns([key, "timestamp", *columns]).map_batches(
        _latest_per_key, batch_format="pandas", fn_kwargs={"key": key}).to_pandas()
    table = _latest_per_key(latest, key).sort_values(columns[0]).drop(columns=["timestamp"])
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), path)


def _feature_spec(spec: SceneLogSpec, encoders: Encoders, cfg: PrepareConfig, sources: src.Sources,
                  report: BadRowReport, total_rows: int, split_counts: dict[str, int],
                  notes: list[str]) -> FeatureSpec:
    vocabs = encoders.vocabularies
    fields = {
        "user_id": FieldInfo("user", "id", len(vocabs["user_id"])),
        "item_id": FieldInfo("item", "id", len(vocabs["item_id"])),
        "scene_id": FieldInfo("scene", "id", len(vocabs["scenario"])),
    }
    multi = multi_fields(spec)
    for role, group in spec.groups().items():
        for col in group.categorical:
            fields[col] = FieldInfo(role, "categorical", len(vocabs[col]))
        for col in group.numeric:
            fields[col] = FieldInfo(role, "numeric", **encoders.numeric_stats[col])
        for col in group.multi:
            fields[col] = FieldInfo(role, "multi", len(vocabs[col]), sep=multi[col],
                                    max_len=encoders.multi_max_len[col])
        for col in group.text:
            fields[col] = FieldInfo(role, "text")
    return FeatureSpec(
        scenarios=vocabs["scenario"].values[2:],
        fields=fields,
        vocabularies={name: v.values for name, v in vocabs.items()},
        history_length=cfg.history_length,
        row_counts={"input": total_rows, "bad_rows_dropped": report.per_reason(),
                    **{s: int(split_counts.get(s, 0)) for s in SPLITS}},
        source={"inputs": list(cfg.inputs), "files": len(sources.files), "format": sources.format,
                "spec": spec.to_dict(), "min_count": cfg.min_count, "encoding_from": cfg.encoding_from,
                "extend_vocab": cfg.extend_vocab,
                "split": "column" if "split" in spec.columns else {"chronological": list(cfg.split_ratios)},
                "notes": list(notes)},
    )
