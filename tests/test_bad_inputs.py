"""Scene logs with defects, through the real Ray Data path of `msit data prepare`, each written as CSV and as
Parquet: every defect is a one-line error naming file, column, row count and an example (or, with
--on-bad-rows drop, an exact count per reason); the formats the README accepts give the same result in
both; a failed or refused prepare loses no data."""

import functools
import gzip
import json
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msit.cli import main
from msit.data import sources
from msit.data.feature_spec import FeatureSpec
from msit.data.prepare import PrepareConfig, prepare
from msit.data.spec import FeatureGroup, SceneLogSpec
from msit.errors import ConfigError, DataValidationError
from msit.output_dir import locked

SPEC = SceneLogSpec(user=FeatureGroup(numeric=["age"]))
T0 = 1_700_000_000
FORMATS = ["csv", "parquet"]


def _good_rows(n_users: int = 6, events: int = 10) -> list[dict]:
    return [
        {
            "user_id": f"u{u}",
            "item_id": f"i{(u + t) % 5}",
            "scenario": ["feed", "search"][t % 2],
            "label": str((u + t) % 2),
            "timestamp": str(T0 + 60 * t),
            "age": str(20 + u),
            "split": "train" if t < 8 else ("val" if t == 8 else "test"),
        }
        for u in range(n_users)
        for t in range(events)
    ]


def _write(df: pd.DataFrame, path, fmt: str) -> str:
    """The same rows as CSV (as pandas writes it: a missing value is an empty cell) or Parquet."""
    path = path.with_suffix(f".{fmt}")
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path, index=False)
    return str(path)


def _prepare(inputs, out, **kw):
    kw = {"spec": SPEC, **kw}
    return prepare(
        PrepareConfig(inputs=[inputs] if isinstance(inputs, str) else inputs, out=str(out), **kw), log=lambda _: None
    )


def _events(out) -> pd.DataFrame:
    """Every event row with its split and raw user key (from sequences/), in a fixed order."""
    keys = pd.read_parquet(out / "sequences").set_index("sequence_row").user_key
    rows = pd.concat([pd.read_parquet(out / s).assign(split=s) for s in ("train", "val", "test") if (out / s).exists()])
    rows = rows.assign(user_key=keys.reindex(rows.sequence_row).to_numpy()).drop(columns=["sequence_row"])
    rows = rows.sort_values(["user_key", "timestamp", "item_id", "scene_id"]).reset_index(drop=True)
    return rows.map(lambda v: v.tolist() if hasattr(v, "tolist") else v)


# -- bad values: one row per defect, in a text log (CSV, and Parquet with string columns) -----------------------

TS_RANGE = (
    "column 'timestamp': out of range (expected a time from 1900 to 2300, in seconds since the epoch, "
    "milliseconds, microseconds or nanoseconds, or a datetime)"
)
DEFECTS = [  # (column, value, reason)
    ("user_id", None, "column 'user_id': null or empty"),
    ("item_id", "   ", "column 'item_id': null or empty"),
    ("scenario", None, "column 'scenario': null or empty"),
    ("timestamp", None, "column 'timestamp': null"),
    ("timestamp", "yesterday", "column 'timestamp': not a number or ISO-8601 datetime"),
    ("timestamp", "1e20", TS_RANGE),
    ("timestamp", "inf", TS_RANGE),
    ("timestamp", "-9223372036854775808", TS_RANGE),
    ("label", "yes", "column 'label': not a number"),
    ("label", "2", "column 'label': outside {0, 1}"),
    ("label", None, "column 'label': null"),
    ("age", "abc", "column 'age': not a number"),
    ("age", "inf", "column 'age': not a finite number"),
    ("split", None, "column 'split': null (expected train/val/test)"),
    ("split", "holdout", "column 'split': not one of train/val/test"),
]


def _expected_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, reason in DEFECTS:
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _defect_log() -> pd.DataFrame:
    rows = _good_rows()
    # Valid rows in other documented formats, in the same columns: none of them may be dropped.
    rows[1]["timestamp"] = "2023-11-14T22:14:20Z"  # = T0 + 60, ISO-8601
    rows[2]["timestamp"] = "2023-11-14 22:15:20"  # = T0 + 120, no zone: UTC
    rows[3]["label"], rows[4]["label"] = "false", "True"  # booleans as text (u0 at t=3, 4: 1 and 0 otherwise)
    rows[8]["split"] = " Valid"  # u0 at t=8: val
    for i, (column, value, _) in enumerate(DEFECTS):
        row = dict(rows[i % 40], item_id=f"bad{i}")
        row[column] = value
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def defect_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("defects")
    df = _defect_log()
    return {fmt: _write(df, root / "log", fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_bad_value_is_named_with_its_count_file_and_an_example(ray_session, defect_files, tmp_path, fmt):
    with pytest.raises(DataValidationError) as e:
        _prepare(defect_files[fmt], tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{len(DEFECTS)} of {60 + len(DEFECTS)} rows are invalid: ")
    for reason, n in _expected_counts().items():
        assert f"{reason}: {n} row{'s' if n > 1 else ''} ({n} in {defect_files[fmt]}); e.g. {{" in msg, reason
    assert '"age": "abc"' in msg and '"label": "yes"' in msg  # examples hold the raw values
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.fixture(scope="module")
def dropped(ray_session, defect_files, tmp_path_factory):
    out = {}
    for fmt in FORMATS:
        root = tmp_path_factory.mktemp(f"dropped-{fmt}")
        result = _prepare(defect_files[fmt], root / "out", on_bad_rows="drop")
        out[fmt] = result, _events(root / "out")
    return out


def test_drop_counts_every_reason_exactly_and_keeps_every_valid_row(dropped):
    for result, events in dropped.values():
        counts = result.feature_spec.row_counts
        assert counts["bad_rows_dropped"] == _expected_counts()
        assert counts["input"] == 60 + len(DEFECTS) and len(events) == 60
        assert (counts["train"], counts["val"], counts["test"]) == (48, 6, 6)  # " Valid" is val
        u0 = events[events.user_key == "u0"]
        assert u0.timestamp.tolist() == [T0 + 60 * t for t in range(10)]  # ISO and plain datetimes kept
        labels = u0.set_index("timestamp").label
        assert labels.loc[T0 + 180] == 0 and labels.loc[T0 + 240] == 1  # "false" / "True"


def test_csv_and_parquet_of_the_same_rows_prepare_alike(dropped):
    (csv, csv_events), (parquet, parquet_events) = dropped["csv"], dropped["parquet"]
    assert csv.feature_spec.vocabularies == parquet.feature_spec.vocabularies
    assert csv.feature_spec.fields == parquet.feature_spec.fields  # incl. the age mean and std
    assert csv.feature_spec.row_counts == parquet.feature_spec.row_counts
    pd.testing.assert_frame_equal(csv_events, parquet_events)
    age = csv.feature_spec.fields["age"]
    assert age.mean == pytest.approx(22.5) and age.std == pytest.approx(1.7078, abs=1e-4)  # "abc" left no trace


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_byte_that_is_not_utf8_is_a_bad_row(ray_session, tmp_path, fmt):
    df = pd.DataFrame(_good_rows())
    path = tmp_path / f"log.{fmt}"
    if fmt == "csv":
        path.write_bytes(df.to_csv(index=False).replace("u1,", "u\udcff1,").encode("utf-8", "surrogateescape"))
    else:  # a binary id column: decoded as UTF-8
        ids = [u.encode() if u != "u1" else b"u\xff1" for u in df.user_id]
        pq.write_table(pa.Table.from_pandas(df.drop(columns="user_id")).append_column("user_id", pa.array(ids)), path)
    with pytest.raises(DataValidationError, match=r"column 'user_id': not valid UTF-8 text: 10 rows \(10 in ") as e:
        _prepare(str(path), tmp_path / "out")
    assert '"user_id": "u\\\\xff1"' in str(e.value)  # the example shows the byte


# -- accepted formats: typed Parquet and CSV of the same rows ---------------------------------------------------


def _typed_log() -> pd.DataFrame:
    rows = []
    for u in range(6):
        for t in range(10):
            rows.append(
                {
                    "user_id": float(u + 1),
                    "item_id": ["NA", "i1", "null", "i3"][(u + t) % 4],
                    "scenario": ["feed", " feed", "Feed", "search"][t % 4],
                    "label": bool((u + t) % 2),
                    "timestamp": (T0 + 60 * t) * 1000,
                    "age": 20.0 + u,
                }
            )
    rows[9]["scenario"] = "promo"  # user 1.0's newest event: test only
    rows.append(dict(rows[5]))  # an exact duplicate
    rows += [
        {"user_id": 99.0, "item_id": "i1", "scenario": "feed", "label": True, "timestamp": (T0 + t) * 1000, "age": 40.0}
        for t in range(2)
    ]  # a user with 2 events
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def typed(ray_session, tmp_path_factory):
    """The typed log prepared from CSV, then from Parquet into the same directory (--overwrite of its own output)."""
    root = tmp_path_factory.mktemp("typed")
    df, out, results = _typed_log(), root / "out", {}
    for fmt in FORMATS:
        result = _prepare(_write(df, root / "log", fmt), out, overwrite=True)
        results[fmt] = result, _events(out), pq.read_table(out / "users.parquet").to_pandas()
    return results


def test_ids_scenes_booleans_and_text_na_read_alike_in_csv_and_parquet(typed):
    (csv, csv_events, csv_users), (parquet, parquet_events, parquet_users) = typed["csv"], typed["parquet"]
    spec = csv.feature_spec
    assert spec.vocabularies == parquet.feature_spec.vocabularies
    assert spec.row_counts == parquet.feature_spec.row_counts and spec.row_counts["bad_rows_dropped"] == {}
    pd.testing.assert_frame_equal(csv_events, parquet_events)
    pd.testing.assert_frame_equal(csv_users, parquet_users)
    assert sorted(spec.vocabularies["user_id"][2:]) == ["1", "2", "3", "4", "5", "6"]  # 1.0 -> "1", as 1 and "1"
    assert {"NA", "null"} <= set(spec.vocabularies["item_id"])  # text in CSV as in Parquet, not missing values
    assert spec.scenarios == ["Feed", "feed", "search"]  # " feed" is "feed"; "promo" is only in test
    assert set(csv_events.label) == {0, 1}
    assert csv_events.timestamp.min() == T0  # milliseconds converted


def test_prepare_notes_what_it_changed(typed):
    for result, _, _ in typed.values():
        notes = result.notes
        assert result.feature_spec.source["notes"] == notes
        assert (
            "column 'timestamp': 63 rows hold milliseconds since the epoch (numbers of 1e11 or more); "
            "converted to seconds" in notes
        )
        assert (
            "scenes ['Feed', 'feed'] differ only in case; they are kept as 2 scenes (rename them in the log "
            "if they are one)" in notes
        )
        assert any(n.startswith("scene 'promo' appears only in val/test (1 row)") for n in notes)
        few = (
            "1 user has too few events for the chronological split 0.8,0.1,0.1 to leave one in train (2 or fewer "
            "at the default ratios): their 2 events are all val/test"
        )
        assert any(n.startswith(few) for n in notes)
        assert "1 row exactly repeats an earlier row (every column msit reads, the file aside); they are kept" in notes


def test_users_with_two_events_are_only_in_val_and_test(typed):
    _, events, _ = typed["csv"]
    assert sorted(events[events.user_key == "99"].split) == ["test", "val"]


# -- whole files: one line before Ray starts, nothing written ----------------------------------------------------


def _header_and_rows(n: int = 3) -> str:
    return "user_id,item_id,scenario,label,timestamp\n" + "".join(f"u{i},i{i},feed,1,{T0 + i}\n" for i in range(n))


def _file_cases(tmp_path):
    cases = {}
    (tmp_path / "empty.csv").write_bytes(b"")
    cases["empty csv"] = ([tmp_path / "empty.csv"], "empty.csv: the file is empty (0 bytes), so it is not a csv file")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-0.csv").write_text(_header_and_rows())
    (shards / "part-1.csv").write_bytes(b"")
    cases["empty shard"] = ([shards], "part-1.csv: the file is empty (0 bytes)")
    (tmp_path / "renamed.parquet").write_text(_header_and_rows())
    cases["csv named parquet"] = ([tmp_path / "renamed.parquet"], "renamed.parquet: not a readable Parquet file: ")
    (tmp_path / "zipped.csv").write_bytes(gzip.compress(_header_and_rows().encode()))
    cases["gzip named csv"] = (
        [tmp_path / "zipped.csv"],
        "zipped.csv: not CSV text but gzip-compressed data (name it .csv.gz)",
    )
    pd.read_csv(tmp_path / "shards" / "part-0.csv").to_parquet(tmp_path / "p.parquet")
    shutil.copy(tmp_path / "p.parquet", tmp_path / "parquet_named.csv")
    cases["parquet named csv"] = ([tmp_path / "parquet_named.csv"], "not CSV text but a Parquet file")
    table = pq.read_table(tmp_path / "p.parquet")
    pq.write_table(
        pa.Table.from_arrays([*table.columns, table["item_id"]], names=[*table.column_names, "item_id"]),
        tmp_path / "dup.parquet",
    )
    cases["duplicate column"] = (
        [tmp_path / "dup.parquet"],
        "dup.parquet: column name(s) ['item_id'] appear more than once; give every column its own name",
    )
    drift = tmp_path / "drift"
    drift.mkdir()
    pq.write_table(table, drift / "a.parquet")
    pq.write_table(table.set_column(0, "user_id", pa.array([[1], [2], [3]])), drift / "b.parquet")
    cases["unreadable type"] = (
        [drift],
        "b.parquet: column 'user_id' has type list<element: int64>, which msit cannot read",
    )
    pq.write_table(table.set_column(0, "user_id", pa.array([b"u1", b"u2", b"u3"])), tmp_path / "bin.parquet")
    pq.write_table(table.set_column(0, "user_id", pa.array([1, 2, 3])), tmp_path / "c.parquet")
    cases["drift that cannot be read alike"] = (
        [tmp_path / "bin.parquet", tmp_path / "c.parquet"],
        f"column 'user_id' has type binary in {tmp_path / 'bin.parquet'} but int64 in {tmp_path / 'c.parquet'}",
    )
    (tmp_path / "latin1.csv").write_bytes("usér,item_id,scenario,label,timestamp\n".encode("latin-1"))
    cases["header not utf-8"] = ([tmp_path / "latin1.csv"], "latin1.csv: the header line is not valid UTF-8 text")
    return cases


def test_broken_files_are_one_line_errors_naming_the_file(tmp_path):
    for name, (inputs, expected) in _file_cases(tmp_path).items():
        with pytest.raises(DataValidationError) as e:
            _prepare([str(p) for p in inputs], tmp_path / "out", spec=None)
        assert expected in str(e.value) and "\n" not in str(e.value), name
        assert not (tmp_path / "out").exists(), name


def test_a_csv_row_with_too_many_fields_is_one_line(ray_session, tmp_path, monkeypatch):
    path = tmp_path / "ragged.csv"
    path.write_text(_header_and_rows(3) + f"u9,i9,feed,1,{T0},extra\n")
    with pytest.raises(DataValidationError) as e:  # found while sampling the file for the spec
        _prepare(str(path), tmp_path / "out", spec=None)
    assert (
        str(e.value) == f"{path}: cannot read it as CSV: CSV parse error: Expected 5 columns, got 6: "
        f"u9,i9,feed,1,{T0},extra"
    )
    # Beyond the sample (past the first 1 MiB block), the same defect fails the read inside Ray: still one line
    # naming the input.
    path.write_text(_header_and_rows(40_000) + f"u9,i9,feed,1,{T0},extra\n")
    monkeypatch.setattr(sources, "read_sample", functools.partial(sources.read_sample, max_rows=2))
    with pytest.raises(DataValidationError) as e:
        _prepare(str(path), tmp_path / "out", spec=None)
    assert (
        str(e.value) == f"{path}: cannot read it as CSV: CSV parse error: Expected 5 columns, got 6: "
        f"u9,i9,feed,1,{T0},extra"
    )
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "empty.csv").write_bytes(b"")
    assert main(["data", "prepare", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("msit: error: ") and "empty.csv: the file is empty" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_parquet_shards_with_drifting_types_are_read_alike(ray_session, tmp_path):
    df = pd.DataFrame(_good_rows()).drop(columns=["split"])
    a, b = df[df.user_id < "u3"], df[df.user_id >= "u3"]
    a = a.assign(
        user_id=a.user_id.str[1:].astype(int),
        label=a.label.astype(int),
        age=a.age.astype(int),
        timestamp=pd.to_datetime(a.timestamp.astype(int), unit="s"),
        scenario=a.scenario.astype("category"),
    )
    b = b.assign(label=b.label.astype(float), age=b.age.astype(float), item_id=b.item_id.str.encode("utf-8"))
    (tmp_path / "log").mkdir()
    a.to_parquet(tmp_path / "log" / "a.parquet", index=False)
    b.to_parquet(tmp_path / "log" / "b.parquet", index=False)
    result = _prepare(str(tmp_path / "log"), tmp_path / "out")
    spec = result.feature_spec
    assert spec.row_counts["input"] == 60 and spec.row_counts["bad_rows_dropped"] == {}
    assert sorted(spec.vocabularies["user_id"][2:]) == ["0", "1", "2", "u3", "u4", "u5"]
    assert spec.scenarios == ["feed", "search"]
    assert sorted(spec.vocabularies["item_id"][2:]) == ["i0", "i1", "i2", "i3", "i4"]  # binary decoded as UTF-8
    assert _events(tmp_path / "out").timestamp.min() == T0


def test_a_split_without_train_rows_is_named(ray_session, tmp_path):
    df = pd.DataFrame(_good_rows()).assign(split=lambda d: ["val", "test"] * (len(d) // 2))
    with pytest.raises(
        DataValidationError,
        match=r"the training split is empty: the split column 'split' gives 0 "
        r"train rows \(30 val, 30 test\)",
    ):
        _prepare(_write(df, tmp_path / "log", "csv"), tmp_path / "out")


# -- no data loss -------------------------------------------------------------------------------------------------


def test_overwrite_never_deletes_the_inputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "feature_spec.json").write_text("{}")  # looks like msit's own output
    log = _write(pd.DataFrame(_good_rows()), out / "logs", "csv")
    with pytest.raises(ConfigError, match="contains the input"):
        _prepare(log, out, overwrite=True)
    with pytest.raises(ConfigError, match="lies inside the input directory"):
        _prepare(str(out), out / "prepared")
    assert pd.read_csv(log).shape == (60, 7)


def test_a_second_writer_is_refused(tmp_path):
    log = _write(pd.DataFrame(_good_rows()), tmp_path / "log", "csv")
    with locked(tmp_path / "out"), pytest.raises(ConfigError, match="is being written by process"):
        _prepare(log, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_prepare_leaves_the_old_output(ray_session, typed, defect_files, tmp_path):
    _, events, _ = typed["parquet"]
    out = typed["parquet"][0].out
    before = (out / "feature_spec.json").read_text()
    with pytest.raises(DataValidationError, match="rows are invalid"):
        _prepare(defect_files["csv"], out, overwrite=True)
    assert (out / "feature_spec.json").read_text() == before
    assert json.loads(before)["source"]["format"] == "parquet"
    pd.testing.assert_frame_equal(_events(out), events)
    assert FeatureSpec.load(out).row_counts == typed["parquet"][0].feature_spec.row_counts
    assert [p.name for p in out.parent.iterdir() if ".staging-" in p.name or ".old-" in p.name] == []
