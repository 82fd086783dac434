"""Scene logs with one defect each, through the real Ray Data path of `msit data prepare`, as CSV and as Parquet."""

import pandas as pd
import pytest

from msit.data.prepare import PrepareConfig, prepare
from msit.data.spec import FeatureGroup, SceneLogSpec
from msit.errors import DataValidationError

SPEC = SceneLogSpec(user=FeatureGroup(numeric=["age"]))


def _log(n_users: int = 6, events: int = 8) -> pd.DataFrame:
    rows = [{"user_id": u, "item_id": f"i{(u + t) % 5}", "scenario": ["feed", "search"][t % 2], "label": (u + t) % 2,
             "timestamp": 1_700_000_000 + 60 * t, "age": 20.0 + u} for u in range(n_users) for t in range(events)]
    return pd.DataFrame(rows)


def _write(df: pd.DataFrame, path, fmt: str) -> str:
    path = path.with_suffix(f".{fmt}")
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path, index=False)
    return str(path)


def _prepare(inputs, out, **kw):
    return prepare(PrepareConfig(inputs=[inputs] if isinstance(inputs, str) else inputs, out=str(out),
                                 history_length=4, **{"spec": SPEC, **kw}), log=lambda _: None)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_iso_8601_timestamps_are_accepted(ray_session, tmp_path, fmt):
    df = _log()
    iso = pd.to_datetime(df.timestamp, unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    result = _prepare(_write(df.assign(timestamp=iso), tmp_path / "log", fmt), tmp_path / "out")
    assert result.feature_spec.row_counts["bad_rows_dropped"] == {}
    events = pd.read_parquet(tmp_path / "out" / "train")
    assert set(events.timestamp) <= set(df.timestamp) and len(events) > 0


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_word_in_a_numeric_feature_is_an_error(ray_session, tmp_path, fmt):
    df = _log().astype({"age": object})
    df.loc[3, "age"] = "abc"
    with pytest.raises(DataValidationError) as e:
        _prepare(_write(df.astype({"age": str}), tmp_path / "log", fmt), tmp_path / "out")
    assert "column 'age': not a number: 1 row" in str(e.value)
