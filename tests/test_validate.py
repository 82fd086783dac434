"""Row validation, one batch at a time (no Ray): every bad-row reason, and type coercion.
tests/test_bad_inputs.py runs the same cases through Ray Data, from CSV and Parquet files."""

import json

import pandas as pd
import pyarrow as pa
import pytest

from msit.data import parse
from msit.data.spec import FeatureGroup, SceneLogSpec
from msit.data.validate import BAD_EXAMPLE, BAD_REASON, BadRowReport, check_batch, summarize_bad_rows
from msit.errors import DataValidationError

SPEC = SceneLogSpec(
    columns={
        "user_id": "user_id",
        "item_id": "item_id",
        "scenario": "scenario",
        "label": "label",
        "timestamp": "timestamp",
    },
    user=FeatureGroup(numeric=["age"]),
)


def _batch(**overrides):
    """One row as a CSV read hands it over: every value as bytes (the file path as a string)."""
    row = {"user_id": "u1", "item_id": "i1", "scenario": "feed", "label": "1", "timestamp": "100", "age": "30"}
    row.update(overrides)
    data = {k: pa.array([v.encode() if isinstance(v, str) else v], pa.binary()) for k, v in row.items()}
    return pa.table({**data, "path": pa.array([overrides.get("path", "logs/part-0.csv")])})


def _concat(*batches):
    return pa.concat_tables(batches)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"user_id": None}, "column 'user_id': null or empty"),
        ({"item_id": ""}, "column 'item_id': null or empty"),
        ({"scenario": None}, "column 'scenario': null or empty"),
        ({"timestamp": None}, "column 'timestamp': null"),
        ({"timestamp": "yesterday"}, "column 'timestamp': not a number or ISO-8601 datetime"),
        ({"label": None}, "column 'label': null"),
        ({"label": "yes"}, "column 'label': not a number"),
        ({"label": "2"}, "column 'label': outside {0, 1}"),
        ({"age": "thirty"}, "column 'age': not a number"),
    ],
)
def test_each_bad_value_gets_its_reason_and_an_example(overrides, reason):
    out = check_batch(_batch(**overrides), SPEC).to_pandas()
    assert out[BAD_REASON].tolist() == [reason]
    example = json.loads(out[BAD_EXAMPLE].iloc[0])
    assert example["user_id"] == overrides.get("user_id", "u1")


def test_good_rows_are_coerced_to_canonical_types():
    batch = _concat(_batch(), _batch(user_id="7.0", item_id=" 3 ", label="FALSE", timestamp="2024-01-01T00:00:10Z"))
    out = check_batch(batch, SPEC).to_pandas()
    assert (out[BAD_REASON] == "").all()
    assert out.user_id.tolist() == ["u1", "7"] and out.item_id.tolist() == ["i1", "3"]
    assert out.label.tolist() == [1, 0]
    assert out.timestamp.tolist() == [100, 1704067210]
    assert out.age.tolist() == [30.0, 30.0]


def test_split_column_values_and_aliases():
    spec = SceneLogSpec(columns={**SPEC.columns, "split": "Split"})
    batch = _concat(*[_batch(Split=s) for s in ["train", "Valid", "TEST", "holdout"]])
    out = check_batch(batch, spec).to_pandas()
    assert out.split.tolist()[:3] == ["train", "val", "test"]
    assert out[BAD_REASON].tolist()[3] == "column 'Split' (split): not one of train/val/test"


def test_renamed_column_is_named_with_its_role():
    spec = SceneLogSpec(columns={**SPEC.columns, "label": "clicked"})
    out = check_batch(_batch(clicked="5").drop_columns(["label"]), spec).to_pandas()
    assert out[BAD_REASON].tolist() == ["column 'clicked' (label): outside {0, 1}"]


def test_report_counts_per_reason_and_file_and_raises_with_all_of_them():
    batch = _concat(_batch(label="2"), _batch(label="2", path="logs/part-1.csv"), _batch(user_id=None), _batch())
    summary = summarize_bad_rows(check_batch(batch, SPEC))
    report = BadRowReport.from_summaries(summary.to_pylist(), total_rows=4)
    assert report.bad_rows == 3
    assert report.per_reason() == {"column 'label': outside {0, 1}": 2, "column 'user_id': null or empty": 1}
    with pytest.raises(DataValidationError) as e:
        report.raise_if_any()
    msg = str(e.value)
    assert "3 of 4 rows are invalid" in msg
    assert "1 in logs/part-0.csv, 1 in logs/part-1.csv" in msg
    assert "--on-bad-rows drop" in msg and '"label": "2"' in msg


def test_datetime_columns_become_epoch_seconds():
    ts = pa.array(pd.to_datetime(["1970-01-01 00:01:00.5", None, "1969-12-31 23:59:59.5"]))
    seconds = parse.seconds(ts)
    assert seconds.values.tolist() == [60, 0, -1]  # floored, also before 1970
    assert seconds.missing.tolist() == [False, True, False] and not seconds.unparsable.any()
    seconds = parse.seconds(pa.array([1.9, float("nan"), None]))
    assert seconds.values[0] == 1 and seconds.missing.tolist() == [False, True, True]  # NaN is missing, like null


def test_timestamp_units_and_range():
    seconds = parse.seconds(
        pa.array(
            [
                "1700000000",
                "1700000000000",
                "1700000000000000",
                "1700000000000000000",
                "1e20",
                "inf",
                "-9e18",
                "2024-13-01",
                " 2024-01-01T00:00:00+01:00 ",
            ]
        )
    )
    assert seconds.values[:4].tolist() == [1_700_000_000] * 4
    assert seconds.unit[:4].tolist() == ["", "ms", "us", "ns"]
    assert seconds.out_of_range.tolist() == [False] * 4 + [True, True, True, False, False]
    assert seconds.unparsable.tolist() == [False] * 7 + [True, False]
    assert seconds.values[8] == 1_704_063_600


@pytest.mark.parametrize("values", [[7, 7.0, "7", " 7 ", "7.0", b"7"], ["u1", b"u1", " u1"], [True, 1, "1"]])
def test_one_spelling_per_key_in_every_format(values):
    assert {parse.normalize_key(v) for v in values} == {parse.normalize_keys(values)[0]}
    assert len(set(parse.normalize_keys(values))) == 1


def test_scalar_and_vectorised_keys_agree():
    values = [0.1, 7.5, 1e20, 1e-7, -3.25, 2**40, -0.0, "", None, "NA", float("nan"), "x\ty "]
    assert [parse.normalize_key(v) for v in values] == [parse.keys(pa.array([v]))[0].to_pylist()[0] for v in values]
    assert parse.normalize_key("") is None and parse.normalize_key(float("nan")) is None
    assert parse.normalize_key("NA") == "NA"  # text, not a missing value


def test_keys_no_file_can_hold_still_normalise():
    assert parse.normalize_key(2**70) == str(2**70)
    assert parse.normalize_key("\ud800") == "\ud800"  # a lone surrogate: no error, and it matches no id
    assert parse.normalize_keys([1, "a", 2.0, None]) == ["1", "a", "2", None]
