"""`msit data prepare`: scene logs in, the prepared layout (msit.data.prepared) and a feature spec out, on Ray.

    read + validate + cut by user (per input piece) -> order, split and count (per group of users)
    -> fit vocabularies (driver) -> encode and write (per group of users)

The log never passes through the driver: Ray tasks read and validate pieces of the input (`_read_block`),
each cutting its good rows into groups of whole users by a hash of the user key; a task per group then
orders and splits its users' events (`_per_group`) and, once the vocabularies are fitted, encodes and writes
them (`_write_group`). Plain Ray tasks rather than Ray Data operators: each step is one task per block or
group with no per-operator scheduling cost, and a group's events stay in the object store between steps.
Only small things come back to the driver: bad-row summaries, value counts (the vocabularies), row counts
and the item and user tables. Everything is written into a staging folder and renamed into place
(msit.output_dir).

Output directory (msit.data.prepared, layout 2):
    train/ val/ test/      Parquet: one row per event (encoded ids, features, sequence_row, position), in a
                           seeded random row order, files of at most FILE_ROWS rows
    sequences/             Parquet: one row per user, the user's whole sequence in event order
    items.parquet          one row per item: index, raw key, side features, text
    users.parquet          one row per user: index, raw key, side features
    feature_spec.json      vocabularies, scenes, field types, row counts, layout
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

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
from msit.data.feature_spec import FEATURE_SPEC_FILE, SEQUENCES_DIR, FeatureSpec, FieldInfo
from msit.data.history import items_are_numbers, run_starts, sorted_event_order, split_codes, user_runs
from msit.data.schema import real_count, real_values
from msit.data.spec import SceneLogSpec, infer_spec, resolve_roles
from msit.data.validate import (
    SPLITS,
    BadRowReport,
    check_batch,
    check_not_empty,
    column_label,
    drop_bad_rows,
    row_hash,
    summarize_bad_rows,
)
from msit.data.vocab import Encoders, count_table, encode_table, encoders_from_feature_spec, multi_fields, split_stats
from msit.errors import ConfigError, DataValidationError
from msit.output_dir import writing
from msit.ray_env import init_ray

FILE_ROWS = 250_000  # event rows per output file at most
GROUP_ROWS = 1_000_000  # about this many events per group of users (fewer groups: less per-task work and fewer
# objects; each group's task holds its events a few times over in memory)
ROW_GROUP_ROWS = 65_536
COMPRESSION = "zstd"
SPLIT_CODE = "_split"  # int8: index into SPLITS
USER_INDEX = "_user"  # int32: the user's index within its group (sequence_row = the group's offset + this)
POSITION = "position"


@dataclass
class PrepareConfig:
    inputs: list[str]
    out: str
    spec: SceneLogSpec | None = None
    min_count: int = 1
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)  # used when the log has no split column
    on_bad_rows: str = "error"  # "error" | "drop"
    multi_max_len: int = 16  # tokens kept per multi-valued feature
    num_partitions: int | None = None  # user groups of the per-user shuffle; default from the row count
    seed: int = 0  # of the event rows' order in the output files
    num_cpus: int | None = None  # of a new local Ray instance, if Ray is not running yet
    encoding_from: str | None = None  # a model or prepared directory: reuse its encoding instead of fitting one
    extend_vocab: bool = False  # with encoding_from: keep its indices, append the new ids and scenes (fine-tuning)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.on_bad_rows not in ("error", "drop"):
            raise ConfigError(f"on_bad_rows must be 'error' or 'drop', got {self.on_bad_rows!r}")
        if self.min_count < 1:
            raise ConfigError(f"min_count must be at least 1, got {self.min_count}")
        ratios = tuple(float(r) for r in self.split_ratios)
        if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6 or ratios[0] <= 0:
            raise ConfigError(
                f"split ratios must be three non-negative numbers train,val,test summing to 1 "
                f"with train > 0, got {self.split_ratios}"
            )
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
        self.total, self.n, self.log = total, 0, log
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._t0 = 0.0

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
    log(
        f"done: {result.feature_spec.row_counts['train']:,} train / {result.feature_spec.row_counts['val']:,} val / "
        f"{result.feature_spec.row_counts['test']:,} test rows in {result.out}"
    )
    return result


def _prepare(cfg: PrepareConfig, sources: src.Sources, staging: Path, log) -> PrepareResult:  # noqa: C901  (to split)
    steps = _Steps(6, log)

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
        cfg = replace(
            cfg, spec=from_dict(SceneLogSpec, reused.source["spec"], where=f"{cfg.encoding_from} feature spec")
        )
    spec, notes = infer_spec(sample, cfg.spec, where=sources.files[0])
    for text in notes:
        log(f"      note: {text}")
    needed = list(dict.fromkeys([*spec.columns.values(), *spec.feature_columns()]))
    for path, schema in schemas.items():
        present = schema.names
        resolve_roles(spec, present, where=path)
        missing = [c for c in spec.feature_columns() if c not in present]
        if missing:
            raise DataValidationError(
                f"{path}: missing feature column(s) {missing} declared in the spec; columns present: {present}"
            )
    if "path" in needed:
        raise DataValidationError("a column named 'path' clashes with msit's record of each row's file; rename it")
    schema = src.read_schema(schemas, needed, lists=list(multi_fields(spec)))

    steps.start(f"reading and validating {sources.describe()}")
    init_ray(num_cpus=cfg.num_cpus)  # only now: input mistakes are reported without waiting for Ray
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pieces = _read_pieces(sources, cpus)
    groups = _partitions(cfg, sum(rows for *_, rows in pieces), cpus)
    # A list of 1 + groups refs each (ray's stubs type any num_returns as one ref).
    blocks = [
        cast(list, _read_block.options(num_returns=1 + groups).remote(sources, piece, schema, spec, groups))
        for piece in pieces
    ]
    results = ray.get([refs[0] for refs in blocks])
    for result in results:
        if result["error"]:
            raise DataValidationError(result["error"])
    total_rows = sum(r["rows"] for r in results)
    check_not_empty(total_rows, ", ".join(cfg.inputs))
    report = BadRowReport.from_summaries(pa.concat_tables([r["summary"] for r in results]).to_pylist(), total_rows)
    if cfg.on_bad_rows == "error":
        report.raise_if_any()
    for line in report.lines():
        log(f"      dropped {line}")
    if report.bad_rows == total_rows:
        raise DataValidationError(f"all {total_rows:,} rows of the input are invalid: {'; '.join(report.lines())}")
    for text in note_on.time_units(column_label(spec, "timestamp"), report.time_units):
        note(text)
    items_numeric = all(r["items_numeric"] for r in results)

    chronological = "split" not in spec.columns
    steps.start(
        f"ordering each user's events{' and splitting them chronologically' if chronological else ''} "
        f"({groups} groups of users)"
    )
    ordered = [
        _per_group.options(num_returns=2).remote(
            spec, cfg.split_ratios if chronological else None, items_numeric, *[refs[1 + g] for refs in blocks]
        )
        for g in range(groups)
    ]
    del blocks
    group_stats = ray.get([refs[1] for refs in ordered])
    split_counts = {s: sum(g["splits"][i] for g in group_stats) for i, s in enumerate(SPLITS)}
    where = (
        f"the chronological split {cfg.split_ratios}"
        if chronological
        else f"the split column {spec.columns['split']!r}"
    )
    if not split_counts["train"]:
        raise DataValidationError(
            f"the training split is empty: {where} gives 0 train rows "
            f"({split_counts['val']:,} val, {split_counts['test']:,} test)"
        )

    if reused is not None and not cfg.extend_vocab:
        steps.start(f"reusing the encoding of {cfg.encoding_from} (ids it has not seen become out-of-vocabulary)")
        encoders = encoders_from_feature_spec(reused)
    else:
        steps.start(
            "fitting vocabularies on the training split"
            if reused is None
            else f"extending the encoding of {cfg.encoding_from} by the new ids and scenes of the training split"
        )
        counts = pd.concat([g["counts"] for g in group_stats], ignore_index=True)
        counts = counts.groupby(["field", "value"], as_index=False, sort=False)["count"].sum()
        if reused is None:
            encoders = Encoders.fit(counts, spec, cfg.min_count, cfg.multi_max_len)
        else:
            encoders = encoders_from_feature_spec(reused).extended(counts, spec, cfg.min_count)
            log(
                "      "
                + ", ".join(
                    f"{name}: +{len(encoders.vocabularies[name]) - len(values):,}"
                    for name, values in reused.vocabularies.items()
                )
            )
        stats = split_stats(counts)
        for text in [
            *note_on.scenes(stats.scenes, real_values(encoders.vocabularies["scenario"].values)),
            *note_on.users_without_train(stats.users_without_train, stats.events_without_train, cfg.split_ratios),
        ]:
            note(text)
    if not real_count(encoders.vocabularies["item_id"].values):
        raise DataValidationError("the training split is empty: no rows have split == 'train'")
    for col, n in encoders.multi_truncated.items():
        if n:
            log(
                f"      note: {n:,} training rows have more than {encoders.multi_max_len[col]} {col!r} values; "
                "the rest are cut (raise --multi-max-len to keep them)"
            )

    steps.start(f"encoding and writing events and sequences to {cfg.out}")
    offsets = np.concatenate([[0], np.cumsum([g["users"] for g in group_stats])])
    encoders_ref = ray.put(encoders)  # once, not once per group: the vocabularies are O(users + items)
    written = ray.get(
        [
            _write_group.remote(refs[0], g, int(offsets[g]), encoders_ref, spec, str(staging), cfg.seed)
            for g, refs in enumerate(ordered)
        ]
    )
    del ordered
    for text in note_on.duplicates(sum(g["duplicates"] for g in group_stats)):
        note(text)
    _write_table(pa.concat_tables([w["items"] for w in written]), "item_key", staging / "items.parquet")
    _write_table(pa.concat_tables([w["users"] for w in written]), "user_key", staging / "users.parquet")

    steps.start("writing the feature spec")
    feature_spec = _feature_spec(spec, encoders, cfg, sources, report, total_rows, split_counts, notes, items_numeric)
    feature_spec.save(staging)
    steps.done()
    return PrepareResult(Path(cfg.out), feature_spec, report, notes, steps.seconds)


def _read_pieces(sources: src.Sources, cpus: int) -> list[tuple[str, list[int] | None, int, int, int]]:
    """The input cut into read tasks: (file, Parquet row groups (about FILE_ROWS rows or one row group) or
    None for a whole CSV file, slice k of n of those rows, rows or an estimate). Only when there are fewer
    such chunks than CPUs is a chunk read by several tasks, each validating a slice of it (each decodes the
    whole chunk), so that one big row group still uses every CPU."""
    chunks: list[tuple[str, list[int] | None, int]] = []
    for path in sources.files:
        if sources.format == "csv":
            chunks.append((path, None, sources.filesystem.get_file_info(path).size // 50))
            continue
        meta = pq.ParquetFile(path, filesystem=sources.filesystem).metadata
        chunk: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            chunk, rows = [*chunk, g], rows + meta.row_group(g).num_rows
            if rows >= FILE_ROWS or g == meta.num_row_groups - 1:
                chunks.append((path, chunk, rows))
                chunk, rows = [], 0
    slices = max(1, -(-cpus // len(chunks)))
    pieces = []
    for path, row_groups, rows in chunks:
        n = 1 if row_groups is None else int(min(slices, max(1, rows // FILE_ROWS)))
        pieces += [(path, row_groups, k, n, rows // n) for k in range(n)]
    return pieces


@ray.remote
def _read_block(sources: src.Sources, piece: tuple, schema: pa.Schema, spec: SceneLogSpec, groups: int) -> tuple:
    """Reads and validates one piece of the input (`_read_pieces`): ({"error": a one-line message or None,
    "rows", "summary": its bad rows, "items_numeric": whether its item keys are all numbers}, then its good rows
    cut into `groups` parts by a hash of the raw user key, so that each user lies in one group)."""
    path, row_groups, part, parts, _ = piece
    try:
        table = _read_piece(sources, path, row_groups, schema)
    except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError) as e:
        kind = "CSV" if sources.format == "csv" else "Parquet"
        return {"error": f"{path}: cannot read it as {kind}: {' '.join(str(e).split())}"}, *([None] * groups)
    start, stop = table.num_rows * part // parts, table.num_rows * (part + 1) // parts
    table = table.slice(start, stop - start)
    checked = check_batch(table.append_column("path", pa.repeat(pa.scalar(path, pa.string()), table.num_rows)), spec)
    summary = summarize_bad_rows(checked)
    good = drop_bad_rows(checked)
    users = pc.dictionary_encode(good["user_id"]).combine_chunks()
    bucket_of_user = pd.util.hash_array(np.asarray(users.dictionary.to_numpy(zero_copy_only=False), dtype=object))
    bucket = (
        (bucket_of_user % np.uint64(groups)).astype(np.int64)[users.indices.to_numpy(zero_copy_only=False)]
        if len(good)
        else np.zeros(0, np.int64)
    )
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(groups + 1))
    good = good.take(pa.array(order))
    parts_by_group = [good.slice(bounds[g], bounds[g + 1] - bounds[g]) for g in range(groups)]
    return {
        "error": None,
        "rows": table.num_rows,
        "summary": summary,
        "items_numeric": items_are_numbers(good["item_id"]),
    }, *parts_by_group


def _read_piece(sources: src.Sources, path: str, row_groups: list[int] | None, schema: pa.Schema) -> pa.Table:
    if sources.format == "parquet":
        # One schema for every shard (src.read_schema): shards whose types drift are read alike.
        table = pq.ParquetFile(path, filesystem=sources.filesystem).read_row_groups(row_groups, columns=schema.names)
        return table.cast(schema)
    # Every CSV column is read as bytes and parsed by our own validation, so that a bad value (a word in a
    # number, a byte that is not UTF-8) is reported with its row count instead of failing the read.
    # Only an empty cell is null: "NA" or "null" are text, as they are in Parquet.
    convert = pacsv.ConvertOptions(
        column_types={c: pa.binary() for c in schema.names},
        include_columns=schema.names,
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=True,
    )
    with sources.filesystem.open_input_stream(path, compression="detect") as stream:
        return pacsv.read_csv(stream, convert_options=convert)


def _partitions(cfg: PrepareConfig, rows: int, cpus: int) -> int:
    """About GROUP_ROWS events per group, a multiple of the CPUs (no last wave that leaves CPUs idle), at least 2."""
    if cfg.num_partitions:
        return cfg.num_partitions
    waves = max(1, round(rows / (GROUP_ROWS * cpus)))
    return int(np.clip(waves * cpus, 2, 256))


@ray.remote
def _per_group(
    spec: SceneLogSpec, ratios: tuple[float, float, float] | None, items_numeric: bool, *parts: pa.Table
) -> tuple[pa.Table, dict]:
    """Whole users: their events in event order with each event's split (chronological when `ratios` are given,
    else the split column), index of its user in the group and position, and the group's counts (vocabularies,
    scenes, rows per split, users, exact duplicates)."""
    table = pa.concat_tables(parts).combine_chunks()
    table = table.take(
        pa.array(sorted_event_order(table["user_id"], table["timestamp"], table["item_id"], items_numeric))
    )
    n = table.num_rows
    user_index, index_in_user, position = user_runs(
        table["user_id"].combine_chunks(), table["timestamp"].combine_chunks()
    )
    duplicates = _exact_duplicates(table)  # before the split column goes: a duplicate repeats it too
    without_train = None
    if ratios is not None:
        sizes = np.bincount(user_index)[user_index]
        codes, no_train = split_codes(index_in_user, sizes, ratios)
        without_train = np.where(no_train, np.where(index_in_user == 0, 2, 1), 0)
    else:
        codes = pc.index_in(table["split"], value_set=pa.array(SPLITS)).to_numpy(zero_copy_only=False)
        codes = codes.astype(np.int8)
        table = table.drop_columns(["split"])
    stats = {
        "counts": count_table(table, spec, train=codes == 0, without_train=without_train),
        "splits": np.bincount(codes, minlength=len(SPLITS)).tolist(),
        "users": int(user_index[-1] + 1) if n else 0,
        "duplicates": duplicates,
    }
    table = table.append_column(SPLIT_CODE, pa.array(codes, pa.int8()))
    table = table.append_column(USER_INDEX, pa.array(user_index, pa.int32()))
    return table.append_column(POSITION, pa.array(position, pa.int32())), stats


def _exact_duplicates(table: pa.Table) -> int:
    """Rows of validated events in event order that exactly repeat an earlier row. Only rows that share
    (user, timestamp, item) with a neighbour can, so only those are hashed (usually very few rows)."""
    run_start = run_starts(table["user_id"], table["timestamp"], table["item_id"])
    shared = np.bincount(run_start, minlength=len(run_start))[run_start] > 1
    if not shared.any():
        return 0
    candidates = table.take(pa.array(np.flatnonzero(shared)))
    hashes = row_hash({c: candidates[c].combine_chunks() for c in candidates.column_names})
    return int(pd.Series(hashes).duplicated().sum())  # the hash covers the user key


@ray.remote
def _write_group(
    table: pa.Table, group: int, first_row: int, encoders: Encoders, spec: SceneLogSpec, staging: str, seed: int
) -> dict[str, pa.Table]:
    """Encodes one group of users and writes its event rows (per split, in a seeded random order) and its
    sequences into `staging`; returns the latest values of each of its items and users, for their tables."""
    staging_dir = Path(staging)
    item_columns = ["item_id", *spec.item.columns()]
    user_columns = ["user_id", *spec.user.columns()]
    event_features = feature_columns_of(spec)
    encoded = encode_table(
        table,
        encoders,
        spec,
        list(dict.fromkeys(["user_id", "item_id", "scene_id", *event_features, *item_columns, *user_columns])),
    )
    sequence_row = pa.array(table[USER_INDEX].to_numpy() + first_row, pa.int32())
    events = pa.table(
        {
            "user_id": encoded["user_id"],
            "item_id": encoded["item_id"],
            "scene_id": encoded["scene_id"],
            "label": table["label"].cast(pa.int8()),
            "timestamp": table["timestamp"].cast(pa.int64()),
            **{c: encoded[c] for c in event_features},
            "sequence_row": sequence_row,
            POSITION: table[POSITION],
        }
    )
    rng = np.random.default_rng([seed, group])
    codes = table[SPLIT_CODE].to_numpy()
    for code, split in enumerate(SPLITS):
        rows = np.flatnonzero(codes == code)
        if not len(rows):
            continue
        rows = rng.permutation(rows)
        (staging_dir / split).mkdir(exist_ok=True)
        for k, start in enumerate(range(0, len(rows), FILE_ROWS)):
            pq.write_table(
                events.take(pa.array(rows[start : start + FILE_ROWS])),
                staging_dir / split / f"part-{group:05d}-{k:03d}.parquet",
                compression=COMPRESSION,
                row_group_size=ROW_GROUP_ROWS,
            )

    user_index = table[USER_INDEX].to_numpy()
    lengths = np.bincount(user_index, minlength=int(user_index[-1]) + 1 if len(user_index) else 0)
    list_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    first = list_offsets.to_numpy()[:-1]
    sequences = pa.table(
        {
            "sequence_row": pa.array(np.arange(len(lengths)) + first_row, pa.int32()),
            "user_key": table["user_id"].take(pa.array(first)),
            "item_ids": pa.ListArray.from_arrays(list_offsets, encoded["item_id"]),
            "scene_ids": pa.ListArray.from_arrays(list_offsets, encoded["scene_id"]),
            "labels": pa.ListArray.from_arrays(list_offsets, table["label"].combine_chunks().cast(pa.int8())),
            "timestamps": pa.ListArray.from_arrays(list_offsets, table["timestamp"].combine_chunks().cast(pa.int64())),
        }
    )
    (staging_dir / SEQUENCES_DIR).mkdir(exist_ok=True)
    pq.write_table(
        sequences,
        staging_dir / SEQUENCES_DIR / f"part-{group:05d}.parquet",
        compression=COMPRESSION,
        row_group_size=ROW_GROUP_ROWS,
    )

    # A user's latest event is the last of its run; an item's, the last of its run sorted by (item, time).
    last_of_user = np.concatenate([first[1:] - 1, [len(user_index) - 1]]) if len(first) else first
    users = pa.table({"user_key": table["user_id"], **{c: encoded[c] for c in user_columns}}).take(
        pa.array(last_of_user)
    )
    items = pa.table(
        {"item_key": table["item_id"], "timestamp": table["timestamp"], **{c: encoded[c] for c in item_columns}}
    )
    return {"items": _latest(items, "item_key"), "users": users}


def feature_columns_of(spec: SceneLogSpec) -> list[str]:
    """The user and context feature columns of the event rows (msit.data.prepared.feature_columns), from the
    scene-log spec."""
    return [c for role in ("user", "context") for c in getattr(spec, role).columns()]


def _latest(table: pa.Table, key: str) -> pa.Table:
    """One row per `key`: the one with the latest timestamp (the last such in the table's order)."""
    if not table.num_rows:
        return table
    # Sorted by the key's dictionary code rather than the key itself: integers sort several times faster than
    # strings. Arrow's sort is stable: rows tied on (key, time) keep the table's order.
    codes = pc.fill_null(pc.dictionary_encode(table[key]).combine_chunks().indices, -1)
    order = pc.sort_indices(
        pa.table({"key": codes, "time": table["timestamp"]}), sort_keys=[("key", "ascending"), ("time", "ascending")]
    ).to_numpy()
    sorted_codes = codes.to_numpy()[order]
    return table.take(pa.array(order[np.append(sorted_codes[1:] != sorted_codes[:-1], True)]))


def _write_table(table: pa.Table, key: str, path: Path) -> None:
    """The item or user table: one row per raw key with its latest values, in index order."""
    if "timestamp" in table.column_names:
        table = _latest(table, key).drop_columns(["timestamp"])
    index = table.column_names[1]
    table = table.take(pc.sort_indices(table, sort_keys=[(index, "ascending"), (key, "ascending")]))
    pq.write_table(table, path, compression=COMPRESSION)


def _feature_spec(
    spec: SceneLogSpec,
    encoders: Encoders,
    cfg: PrepareConfig,
    sources: src.Sources,
    report: BadRowReport,
    total_rows: int,
    split_counts: dict[str, int],
    notes: list[str],
    items_numeric: bool,
) -> FeatureSpec:
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
            stats = encoders.numeric_stats[col]
            fields[col] = FieldInfo(role, "numeric", mean=stats["mean"], std=stats["std"])
        for col in group.multi:
            fields[col] = FieldInfo(
                role, "multi", len(vocabs[col]), sep=multi[col], max_len=encoders.multi_max_len[col]
            )
        for col in group.text:
            fields[col] = FieldInfo(role, "text")
    return FeatureSpec(
        scenarios=list(real_values(vocabs["scenario"].values)),
        fields=fields,
        vocabularies={name: v.values for name, v in vocabs.items()},
        row_counts={
            "input": total_rows,
            "bad_rows_dropped": report.per_reason(),
            **{s: int(split_counts.get(s, 0)) for s in SPLITS},
        },
        source={
            "inputs": list(cfg.inputs),
            "files": len(sources.files),
            "format": sources.format,
            "spec": spec.to_dict(),
            "min_count": cfg.min_count,
            "encoding_from": cfg.encoding_from,
            "extend_vocab": cfg.extend_vocab,
            "split": "column" if "split" in spec.columns else {"chronological": list(cfg.split_ratios)},
            "notes": list(notes),
            "items_numeric": items_numeric,
        },  # how ties break in event order: serving breaks them alike
    )
