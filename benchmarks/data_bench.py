"""Benchmark `msit data prepare` against a plain single-process pandas/numpy implementation of the same steps.

Runs, in one process and one run: prepare (Ray, 2 CPUs) and the reference (validate, split, vocabularies,
encode, order per user; one process, no Ray, nothing written) on
  - a 1,000,000-event synthetic log (`msit data synth --users 25000 --items 20000 --events-per-user 40`),
  - a 10,000,000-event one (`--users 250000 --items 100000 --events-per-user 40`),
  - MovieLens-100K genre (../shared/data/ml100k_genre.csv),
and records rows/s of both, bytes on disk per event (prepared vs input), bytes per training row in the Ray
Data stream (the split's `event_columns` as Ray Data reads them) and in memory (`load_split`), and the
steps' times. Synthetic logs are generated once into --cache and reused.

    python benchmarks/data_bench.py [--cache DIR] [--sizes 1000k,10000k] [--skip-ml100k]

Writes benchmarks/results/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import load_average, stamp  # noqa: E402

from msit.data import synth  # noqa: E402
from msit.data.feature_spec import FeatureSpec  # noqa: E402
from msit.data.prepare import PrepareConfig, prepare  # noqa: E402
from msit.data.prepared import event_columns, load_sequences, load_split  # noqa: E402
from msit.data.schema import FIRST_REAL, OOV  # noqa: E402
from msit.data.spec import SceneLogSpec, infer_spec  # noqa: E402
from msit.ray_env import init_ray  # noqa: E402

SYNTH = {
    "1000k": dict(users=25_000, items=20_000, events_per_user=40),
    "10000k": dict(users=250_000, items=100_000, events_per_user=40),
}

MIN_S, MAX_S = -2_208_988_800, 10_413_792_000  # 1900..2300, as msit.data.parse


# -- the single-process reference --------------------------------------------------------------------------------


def reference(files: list[Path], spec: SceneLogSpec, ratios=(0.8, 0.1, 0.1)) -> dict[str, float]:
    """Validate, split, fit vocabularies, encode and order per user, with pandas/numpy in this process, written
    as one would by hand: each column factorised once, its distinct values checked and mapped, rows handled as
    integer codes. Text features are left out (prepare only validates and copies them); nothing is written.
    Returns the time of each step (the read included in validate)."""
    seconds, t0 = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        seconds[name] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()

    cols = spec.columns
    groups = spec.groups().values()
    categorical = [c for g in groups for c in g.categorical]
    numeric_cols = [c for g in groups for c in g.numeric]
    multi_cols = {c: sep for g in groups for c, sep in g.multi.items()}
    needed = (
        [cols[r] for r in ("user_id", "item_id", "scenario", "label", "timestamp")]
        + categorical
        + numeric_cols
        + list(multi_cols)
    )
    df = pd.concat(
        [
            pd.read_parquet(f, columns=needed)
            if f.suffix == ".parquet"
            else pd.read_csv(f, usecols=needed, dtype=str, keep_default_na=False)
            for f in files
        ],
        ignore_index=True,
    )

    def keys(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        """(codes, -1 where null or empty; the distinct trimmed values)."""
        codes, uniques = pd.factorize(column)
        text = pd.Index(uniques).astype(str).str.strip()
        merged, values = pd.factorize(text)  # " 7" and "7" are one key
        merged = np.where(text == "", -1, merged)
        return np.where(codes >= 0, merged[np.maximum(codes, 0)], -1), np.asarray(values, dtype=object)

    # validate: ids and scenes as trimmed text, labels 0/1, timestamps in range, numeric features finite
    ids = {role: keys(df[cols[role]]) for role in ("user_id", "item_id", "scenario")}
    bad = np.zeros(len(df), dtype=bool)
    for codes, _ in ids.values():
        bad |= codes < 0
    label = pd.to_numeric(df[cols["label"]], errors="coerce").to_numpy(np.float64)
    ts = pd.to_numeric(df[cols["timestamp"]], errors="coerce").to_numpy(np.float64)
    bad |= ~np.isin(label, (0.0, 1.0)) | ~((ts >= MIN_S) & (ts < MAX_S))
    numeric = {c: pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64) for c in numeric_cols}
    for x in numeric.values():
        bad |= np.isinf(x)
    keep = ~bad
    ids = {role: (codes[keep], values) for role, (codes, values) in ids.items()}
    cats = {c: keys(df[c]) for c in categorical}
    cats = {c: (codes[keep], values) for c, (codes, values) in cats.items()}
    multi = {c: pd.factorize(df[c].fillna("")) for c in multi_cols}
    multi = {c: (codes[keep], values) for c, (codes, values) in multi.items()}
    ts, label = ts[keep].astype(np.int64), label[keep].astype(np.int8)
    numeric = {c: x[keep] for c, x in numeric.items()}
    del df
    lap("read_validate")

    # split (and the per-user order): by (user, timestamp, item), chronological ratios per user
    user_codes, items = ids["user_id"][0], ids["item_id"]
    as_numbers = pd.to_numeric(pd.Series(items[1]), errors="coerce")  # ties by item: as numbers if all are
    item_rank = np.argsort(
        np.argsort(as_numbers.to_numpy() if not as_numbers.isna().any() else np.asarray(items[1], dtype=str))
    )
    order = np.lexsort((item_rank[items[0]], ts, user_codes))
    sorted_users = user_codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    index_in_user = np.arange(len(order)) - np.repeat(starts, sizes)
    size = np.repeat(sizes, sizes)
    n_test = np.maximum(np.round(size * ratios[2]), 1)
    n_val = np.maximum(np.round(size * ratios[1]), 1)
    split = np.zeros(len(order), dtype=np.int8)
    split[index_in_user >= size - n_test - n_val] = 1
    split[index_in_user >= size - n_test] = 2
    split_of_row = np.empty_like(split)
    split_of_row[order] = split
    lap("split")

    # vocabularies on the training rows: value -> index (0 padding, 1 out-of-vocabulary), most frequent first
    train = split_of_row == 0

    def vocabulary(codes: np.ndarray, values: np.ndarray) -> np.ndarray:
        """For each distinct value, its index."""
        counts = np.bincount(codes[train & (codes >= 0)], minlength=len(values))
        ranked = np.lexsort((values.astype(str), -counts))
        ranked = ranked[counts[ranked] > 0]
        index = np.full(len(values), OOV, dtype=np.int32)
        index[ranked] = np.arange(FIRST_REAL, len(ranked) + FIRST_REAL)
        return index

    index = {name: vocabulary(*pair) for name, pair in {**ids, **cats}.items()}
    tokens = {}
    for c, (codes, values) in multi.items():
        lists = pd.Series(values).str.split(multi_cols[c])  # once per distinct value
        flat = lists.explode()
        token_codes, token_values = pd.factorize(flat[flat != ""])
        weights = np.bincount(codes[train], minlength=len(values))[flat[flat != ""].index.to_numpy()]
        counts = np.bincount(token_codes, weights=weights, minlength=len(token_values))
        ranked = np.lexsort((np.asarray(token_values, dtype=str), -counts))
        ranked = ranked[counts[ranked] > 0]
        token_index = np.full(len(token_values), OOV, dtype=np.int32)
        token_index[ranked] = np.arange(FIRST_REAL, len(ranked) + FIRST_REAL)
        tokens[c] = (lists, token_values, token_index)
    stats = {c: (np.nanmean(x[train]), np.nanstd(x[train])) for c, x in numeric.items()}
    lap("vocabularies")

    # encode
    encoded = {
        name: np.where(codes >= 0, index[name][np.maximum(codes, 0)], 0).astype(np.int32)
        for name, (codes, _) in {**ids, **cats}.items()
    }
    for c, (mean, std) in stats.items():
        encoded[c] = np.nan_to_num((numeric[c] - mean) / (std or 1.0)).astype(np.float32)
    for c, (lists, token_values, token_index) in tokens.items():
        width = max(1, min(16, int(lists.map(len).max())))
        lookup = pd.Index(token_values)
        per_value = np.zeros((len(lists), width), dtype=np.int32)
        for k in range(width):  # k-th token of every distinct value
            kth = lists.str[k]
            found = lookup.get_indexer(kth)
            per_value[:, k] = np.where(kth.isna() | (kth == ""), 0, np.where(found >= 0, token_index[found], 1))
        encoded[c] = per_value[multi[c][0]]
    lap("encode")

    # order per user: each user's sequence in event order, and each event's position (strictly earlier events)
    sorted_ts = ts[order]
    new_time = np.r_[True, (sorted_users[1:] != sorted_users[:-1]) | (sorted_ts[1:] != sorted_ts[:-1])]
    first_at_time = np.maximum.accumulate(np.where(new_time, np.arange(len(order)), 0))
    position = np.empty(len(order), dtype=np.int32)
    position[order] = first_at_time - np.repeat(starts, sizes)
    sequences = {
        "item_ids": encoded["item_id"][order],
        "scene_ids": encoded["scenario"][order].astype(np.int16),
        "labels": label[order],
        "timestamps": sorted_ts,
        "offsets": np.r_[0, np.cumsum(sizes)],
    }
    assert len(sequences["item_ids"]) == len(position)
    lap("order_per_user")
    return seconds


# -- measurements of a prepared directory ------------------------------------------------------------------------


def _bytes(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stream_bytes_per_row(prepared: Path, spec: FeatureSpec) -> float:
    """Bytes per row of the train split's event columns as Ray Data reads them (the training stream)."""
    import ray

    ds = ray.data.read_parquet(str(prepared / "train")).select_columns(event_columns(spec)).materialize()
    return ds.size_bytes() / ds.count()


def memory_bytes(prepared: Path, spec: FeatureSpec) -> dict[str, float]:
    """Bytes in memory of the loaded train split: per event row, and the sequences per event they hold."""
    sequences = load_sequences(prepared)
    train = load_split(prepared, "train", spec, sequences)
    rows = sum(v.nbytes for v in train.events.values()) / len(train)
    return {
        "event_row_bytes": round(rows, 1),
        "sequence_bytes_per_event": round(sequences.nbytes() / len(sequences.timestamps), 1),
        "train_rows": len(train),
    }


def run(name: str, files: list[Path], spec: SceneLogSpec | None, log) -> dict:
    from msit.data import sources as src

    sample = src.read_sample(src.resolve([str(f) for f in files]))
    full_spec, _ = infer_spec(sample, spec)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"{name}: prepare")
        t0 = time.perf_counter()
        result = prepare(
            PrepareConfig(inputs=[str(f) for f in files], out=f"{tmp}/prepared", spec=spec), log=lambda _: None
        )
        prepare_s = time.perf_counter() - t0
        rows = result.feature_spec.row_counts["input"]
        prepared = Path(tmp) / "prepared"
        disk = {p.name: _bytes(p) for p in prepared.iterdir()}
        fspec = FeatureSpec.load(prepared)
        stream = stream_bytes_per_row(prepared, fspec)
        memory = memory_bytes(prepared, fspec)
        input_bytes = sum(f.stat().st_size for f in files)
        parquet_bytes = input_bytes
        if files[0].suffix == ".csv":  # the disk goal is against Parquet: the same rows as one Parquet file
            pd.concat([pd.read_csv(f) for f in files]).to_parquet(f"{tmp}/input.parquet", index=False)
            parquet_bytes = Path(f"{tmp}/input.parquet").stat().st_size
    log(f"{name}: reference")
    t0 = time.perf_counter()
    reference_steps = reference(files, full_spec)
    reference_s = time.perf_counter() - t0
    out = {
        "data": name,
        "rows": rows,
        "prepare_s": round(prepare_s, 2),
        "prepare_rows_per_s": round(rows / prepare_s),
        "reference_s": round(reference_s, 2),
        "reference_rows_per_s": round(rows / reference_s),
        "prepare_vs_reference": round(reference_s / prepare_s, 3),
        "disk_bytes_per_event": round(sum(disk.values()) / rows, 2),
        "input_bytes_per_event": round(input_bytes / rows, 2),
        "input_parquet_bytes_per_event": round(parquet_bytes / rows, 2),
        "disk_vs_input_parquet": round(sum(disk.values()) / parquet_bytes, 3),
        "disk_bytes_by_part": disk,
        "stream_bytes_per_row": round(stream, 1),
        "memory": memory,
        "steps_s": result.seconds,
        "reference_steps_s": reference_steps,
    }
    log(json.dumps(out))
    return out


def _synth(cache: Path, size: str) -> list[Path]:
    path = cache / f"synth_{size}"
    if not (path / "synth.json").is_file():
        synth.write(synth.SynthConfig(**SYNTH[size], seed=0), path, progress=False)
    return sorted(path.glob("*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "msit-bench"),
        help="where the synthetic logs are generated once and reused",
    )
    parser.add_argument("--sizes", default="1000k,10000k", help=f"synthetic logs to run, of {list(SYNTH)}")
    shared = Path(os.environ.get("MSIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
    parser.add_argument("--ml100k", default=str(shared / "ml100k_genre.csv"))
    parser.add_argument("--skip-ml100k", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data.json"))
    args = parser.parse_args()
    provenance = stamp("cpu")
    t0 = time.perf_counter()
    init_ray(num_cpus=2, quiet=True)
    ray_start_s = time.perf_counter() - t0

    runs = []
    if not args.skip_ml100k:
        runs.append(run(Path(args.ml100k).name, [Path(args.ml100k)], None, print))
    for size in [s for s in args.sizes.split(",") if s]:
        files = _synth(Path(args.cache), size)
        runs.append(run(f"synth_{size}", files, SceneLogSpec.load(str(files[0].parent / "spec.yaml")), print))

    report = {
        "runs": runs,
        **provenance,
        "load_average_end": load_average(),
        "num_cpus": 2,
        "ray_start_s": round(ray_start_s, 2),
        "note": "prepare_s: the whole `prepare` call (Ray already started; ray_start_s apart) including writing; "
        "the reference writes nothing. The machine is shared: see load_average.",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
