"""`msit data prepare`: scene logs in, processed shards and a feature spec out, on Ray Data.

    read -> validate -> (split) -> fit vocabularies -> encode -> behaviour histories -> write

The log never passes through the driver: every step is a Ray Data operation over blocks.
Only small things come back to the driver: bad-row summaries, value counts (the vocabularies)
and row counts.

Output directory:
    train/ val/ test/      Parquet shards of encoded events with their behaviour histories
    items.parquet          one row per item: index, raw key, side features, text
    users.parquet          one row per user: index, raw key, side features
    feature_spec.json      vocabularies, scenes, field types, history length, row counts
"""

from __future__ import annotations

import shutil
import time
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
from msit.data import sources as src
from msit.data.feature_spec import FeatureSpec, FieldInfo
from msit.data.history import add_histories, assign_split
from msit.data.spec import SceneLogSpec, infer_spec, resolve_roles
from msit.data.validate import (
    SPLITS,
    BadRowReport,
    check_batch,
    check_not_empty,
    drop_bad_rows,
    summarize_bad_rows,
)
from msit.data.vocab import Encoders, count_batch, encode_batch, encoders_from_feature_spec, multi_fields
from msit.errors import ConfigError, DataValidationError
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
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"output directory {out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    steps = _Steps(7, log)

    steps.start("finding inputs and checking columns")
    sources = src.resolve(cfg.inputs)
    sample = src.read_sample(sources)
    check_not_empty(len(sample), sources.describe())  # the sample reads on until it finds rows
    reused = FeatureSpec.load(cfg.encoding_from) if cfg.encoding_from else None
    if reused is not None:  # the same roles and features as the data the encoding was fitted on (the
        # caller's config is left as it was)
        cfg = replace(cfg, history_length=reused.history_length, spec=from_dict(
            SceneLogSpec, reused.source["spec"], where=f"{cfg.encoding_from} feature spec"))
    spec, notes = infer_spec(sample, cfg.spec, where=sources.files[0])
    for note in notes:
        log(f"      note: {note}")
    needed = list(dict.fromkeys([*spec.columns.values(), *spec.feature_columns()]))
    for path in sources.files:
        present = src.column_names(sources, path)
        resolve_roles(spec, present, where=path)
        missing = [c for c in spec.feature_columns() if c not in present]
        if missing:
            raise DataValidationError(f"{path}: missing feature column(s) {missing} declared in the spec; "
                                      f"columns present: {present}")
    if "path" in needed:
        raise DataValidationError("a column named 'path' clashes with msit's record of each row's file; rename it")

    steps.start(f"reading and validating {sources.describe()}")
    init_ray(num_cpus=cfg.num_cpus)  # only now: input mistakes are reported without waiting for Ray
    raw = _read(sources, needed)
    checked = raw.map_batches(check_batch, batch_format="pandas", fn_kwargs={"spec": spec}).materialize()
    total_rows = checked.count()
    check_not_empty(total_rows, ", ".join(cfg.inputs))
    summaries = checked.map_batches(summarize_bad_rows, batch_format="pandas").take_all()
    report = BadRowReport.from_summaries(summaries, total_rows)
    if cfg.on_bad_rows == "error":
        report.raise_if_any()
    for line in report.lines():
        log(f"      dropped {line}")
    good = checked.map_batches(drop_bad_rows, batch_format="pandas")
    if report.bad_rows == total_rows:
        raise DataValidationError(f"all {total_rows:,} rows of the input are invalid: {'; '.join(report.lines())}")

    if "split" not in spec.columns:
        steps.start(f"splitting each user's events chronologically {cfg.split_ratios}")
        # Materialised: the split feeds two passes (vocabularies, encoding) and the shuffle must run once.
        good = good.groupby("user_id", num_partitions=_partitions(cfg, total_rows)).map_groups(
            assign_split, batch_format="numpy", fn_kwargs={"ratios": cfg.split_ratios}).materialize()
    else:
        steps.start(f"using the split column {spec.columns['split']!r}")

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

    steps.start(f"writing shards to {out}")
    text_cols = list(spec.item.text)
    split_counts: dict[str, int] = {}
    for row in events.map_batches(_count_splits, batch_format="pandas").take_all():
        split_counts[row["split"]] = split_counts.get(row["split"], 0) + int(row["rows"])
    for split in SPLITS:
        if split_counts.get(split, 0):
            rows = events.map_batches(_rows_of_split, batch_format="pyarrow", fn_kwargs={"split": split})
            rows.drop_columns(text_cols).write_parquet(str(out / split), min_rows_per_file=50_000)
    _write_table(events, "item_key", ["item_id", *spec.item.columns()], out / "items.parquet")
    _write_table(events, "user_key", ["user_id", *spec.user.columns()], out / "users.parquet")

    steps.start("writing the feature spec")
    feature_spec = _feature_spec(spec, encoders, cfg, sources, report, total_rows, split_counts)
    feature_spec.save(out)
    steps.done()
    log(f"done: {split_counts.get('train', 0):,} train / {split_counts.get('val', 0):,} val / "
        f"{split_counts.get('test', 0):,} test rows in {out}")
    return PrepareResult(out, feature_spec, report, notes, steps.seconds)


def _read(sources: src.Sources, columns: list[str]) -> ray.data.Dataset:
    if sources.format == "parquet":
        return ray.data.read_parquet(sources.files, filesystem=sources.filesystem, columns=columns,
                                     include_paths=True)
    # Every CSV column is read as text and typed by our own validation, so that a bad value is
    # reported with its row count instead of failing the read or changing a column's type.
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, include_columns=columns,
                                   strings_can_be_null=True)
    return ray.data.read_csv(sources.files, filesystem=sources.filesystem, include_paths=True,
                             convert_options=convert)


def _partitions(cfg: PrepareConfig, rows: int) -> int:
    return cfg.num_partitions or int(np.clip(rows // 250_000 + 1, 2, 256))


def _count_splits(batch: pd.DataFrame) -> pd.DataFrame:
    counts = batch["split"].value_counts()
    return pd.DataFrame({"split": counts.index.astype(str), "rows": counts.to_numpy()})


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
                  report: BadRowReport, total_rows: int, split_counts: dict[str, int]) -> FeatureSpec:
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
                "split": "column" if "split" in spec.columns else {"chronological": list(cfg.split_ratios)}},
    )
