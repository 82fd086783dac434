"""Row validation, one batch at a time (no Ray): every bad-row reason, and type coercion."""

import json

import numpy as np
import pandas as pd
import pytest

from msit.data.spec import FeatureGroup, SceneLogSpec
from msit.data.validate import BAD_EXAMPLE, BAD_REASON, BadRowReport, check_batch, summarize_bad_rows, to_seconds
from msit.errors import DataValidationError

SPEC = SceneLogSpec(columns={"user_id": "user_id", "item_id": "item_id", "scenario": "scenario",
                             "label": "label", "timestamp": "timestamp"},
                    user=FeatureGroup(numeric=["age"]))


def _batch(**overrides):
    row = {"user_id": "u1", "item_id": "i1", "scenario": "feed", "label": "1", "timestamp": "100", "age": "30",
           "path": "logs/part-0.csv"}
    row.update(overrides)
    return pd.DataFrame([row])


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"user_id": None}, "column 'user_id': null or empty"),
    ({"item_id": ""}, "column 'item_id': null or empty"),
    ({"scenario": None}, "column 'scenario': null or empty"),
    ({"timestamp": None}, "column 'timestamp': null"),
    ({"timestamp": "yesterday"}, "column 'timestamp': not a number or ISO-8601 datetime"),
    ({"label": None}, "column 'label': null"),
    ({"label": "yes"}, "column 'label': not a number"),
    ({"label": "2"}, "column 'label': outside {0, 1}"),
    ({"age": "thirty"}, "column 'age': not a number"),
])
def test_each_bad_value_gets_its_reason_and_an_example(overrides, reason):
    out = check_batch(_batch(**overrides), SPEC)
    assert out[BAD_REASON].tolist() == [reason]
    example = json.loads(out[BAD_EXAMPLE].iloc[0])
    assert example["user_id"] == overrides.get("user_id", "u1")


def test_good_rows_are_coerced_to_canonical_types():
    batch = pd.concat([_batch(), _batch(user_id=7.0, item_id=3, label=0.0, timestamp="2024-01-01T00:00:10Z")])
    out = check_batch(batch.reset_index(drop=True), SPEC)
    assert (out[BAD_REASON] == "").all()
    assert out.user_id.tolist() == ["u1", "7"] and out.item_id.tolist() == ["i1", "3"]
    assert out.label.tolist() == [1, 0]
    assert out.timestamp.tolist() == [100, 1704067210]
    assert out.age.tolist() == [30.0, 30.0]


def test_split_column_values_and_aliases():
    spec = SceneLogSpec(columns={**SPEC.columns, "split": "Split"})
    batch = pd.concat([_batch(Split=s) for s in ["train", "Valid", "TEST", "holdout"]]).reset_index(drop=True)
    out = check_batch(batch, spec)
    assert out.split.tolist()[:3] == ["train", "val", "test"]
    assert out[BAD_REASON].tolist()[3] == "column 'Split' (split): not one of train/val/test"


def test_renamed_column_is_named_with_its_role():
    spec = SceneLogSpec(columns={**SPEC.columns, "label": "clicked"})
    out = check_batch(_batch(clicked="5").drop(columns=["label"]), spec)
    assert out[BAD_REASON].tolist() == ["column 'clicked' (label): outside {0, 1}"]


def test_report_counts_per_reason_and_file_and_raises_with_all_of_them():
    batch = pd.concat([_batch(label="2"), _batch(label="2", path="logs/part-1.csv"), _batch(user_id=None),
                       _batch()]).reset_index(drop=True)
    summary = summarize_bad_rows(check_batch(batch, SPEC))
    report = BadRowReport.from_summaries(summary.to_dict("records"), total_rows=4)
    assert report.bad_rows == 3
    assert report.per_reason() == {"column 'label': outside {0, 1}": 2, "column 'user_id': null or empty": 1}
    with pytest.raises(DataValidationError) as e:
        report.raise_if_any()
    msg = str(e.value)
    assert "3 of 4 rows are invalid" in msg
    assert "1 in logs/part-0.csv, 1 in logs/part-1.csv" in msg
    assert "--on-bad-rows drop" in msg and '"label": "2"' in msg


def test_datetime_columns_become_epoch_seconds():
    ts = pd.Series(pd.to_datetime(["1970-01-01 00:01:00", None]))
    seconds, bad = to_seconds(ts)
    assert seconds.iloc[0] == 60 and pd.isna(seconds.iloc[1]) and not bad.any()
    seconds, bad = to_seconds(pd.Series([1.9, np.nan, "x"], dtype=object))
    assert seconds.iloc[0] == 1 and bad.tolist() == [False, False, True]
