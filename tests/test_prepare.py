"""`msit data prepare` end to end on Ray Data: round trips, the split column, and bad input."""

import json

import pandas as pd
import pytest
import ray
import torch

from msit.data import synth
from msit.data.feature_spec import FeatureSpec
from msit.data.prepare import PrepareConfig, _exact_duplicates, prepare
from msit.data.prepared import event_columns, load_split
from msit.data.spec import SceneLogSpec
from msit.errors import ConfigError, DataValidationError

HISTORY = 8


@pytest.fixture(scope="module")
def synth_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    cfg = synth.SynthConfig(users=120, items=200, events_per_user=15, seed=5, users_per_shard=50)
    synth.write(cfg, root / "log", progress=False)
    result = prepare(
        PrepareConfig(
            inputs=[str(root / "log")], out=str(root / "prepared"), spec=SceneLogSpec.load(root / "log" / "spec.yaml")
        ),
        log=lambda _: None,
    )
    return synth.generate(cfg), result


def _read(path):
    return pd.read_parquet(path)


def _events(out) -> pd.DataFrame:
    """Every split's event rows with their split and raw user key (from sequences/)."""
    keys = _read(out / "sequences")[["sequence_row", "user_key"]].set_index("sequence_row").user_key
    rows = pd.concat(
        [_read(out / s).assign(split=s) for s in ("train", "val", "test") if (out / s).exists()], ignore_index=True
    )
    return rows.assign(user_key=keys.reindex(rows.sequence_row).to_numpy())


def test_round_trip_keeps_every_row_and_writes_the_feature_spec(synth_run):
    log, result = synth_run
    spec = FeatureSpec.load(result.out)
    counts = spec.row_counts
    assert counts["input"] == len(log) == counts["train"] + counts["val"] + counts["test"]
    assert counts["bad_rows_dropped"] == {}
    assert spec.scenarios == sorted(log.scenario.unique())
    assert spec.layout == 2
    assert {k: v.type for k, v in spec.fields.items()} == {
        "user_id": "id",
        "item_id": "id",
        "scene_id": "id",
        "age_band": "categorical",
        "region": "categorical",
        "category": "categorical",
        "price": "numeric",
        "tags": "multi",
        "title": "text",
        "hour": "categorical",
        "device": "categorical",
    }
    for split in ("train", "val", "test"):
        assert len(_read(result.out / split)) == counts[split]
    json.loads((result.out / "feature_spec.json").read_text())  # plain JSON


def test_windows_of_the_event_rows_match_the_raw_log(synth_run):
    log, result = synth_run
    spec = FeatureSpec.load(result.out)
    items = spec.vocabularies["item_id"]
    log = log.assign(user_key=log.user_id.astype(str), item_key=log.item_id.astype(str))
    users = _read(result.out / "sequences").set_index("sequence_row").user_key
    for split in ("train", "val", "test"):
        events = load_split(result.out, split, spec)
        batch = next(events.select(torch.arange(0, len(events), 7)).batches(10_000, HISTORY))
        rows = events.events["sequence_row"][::7].numpy()
        for r in range(0, len(rows), 3):
            user = log[log.user_key == users[rows[r]]]
            earlier = user[user.timestamp < int(events.events["timestamp"][::7][r])]
            expected = earlier.sort_values(["timestamp", "item_id"], ascending=False).item_key.head(HISTORY).tolist()
            n = int(batch["history_length"][r])
            assert n == len(expected)
            got = [items[i] if i > 1 else None for i in batch["history_item_ids"][r, :n].tolist()]
            # Items first seen outside training are out-of-vocabulary (index 1) in histories too.
            assert got == [k if k in items[2:] else None for k in expected]
            assert (batch["history_item_ids"][r, n:] == 0).all()
            assert (batch["history_time_gaps"][r, :n] > 0).all()


def test_chronological_split_per_user(synth_run):
    _, result = synth_run
    rows = _events(result.out)
    order = {"train": 0, "val": 1, "test": 2}
    for _, user in rows.groupby("user_key"):
        user = user.sort_values("timestamp")
        assert user.split.map(order).is_monotonic_increasing
        assert (user.split == "test").sum() >= 1


def test_event_rows_feed_torch_batches_with_fixed_shapes(synth_run):
    _, result = synth_run
    spec = FeatureSpec.load(result.out)
    shards = ray.data.read_parquet(str(result.out / "train"), columns=event_columns(spec))
    batch = next(iter(shards.iter_torch_batches(batch_size=16)))
    assert set(batch) == set(event_columns(spec)) and "tags" not in batch  # item features: the item table
    assert tuple(batch["region"].shape) == (16,) and batch["item_id"].dtype == torch.int32
    assert (
        spec.fields["tags"].role == "item"
        and len(_read(result.out / "items.parquet").tags[0]) == spec.fields["tags"].max_len
    )


def test_item_and_user_tables_have_one_row_per_key(synth_run):
    log, result = synth_run
    items, users = _read(result.out / "items.parquet"), _read(result.out / "users.parquet")
    assert items.item_key.is_unique and len(items) == log.item_id.nunique()
    assert users.user_key.is_unique and len(users) == log.user_id.nunique()
    title = log.drop_duplicates("item_id").set_index(log.drop_duplicates("item_id").item_id.astype(str)).title
    assert (items.set_index("item_key").title == title.reindex(items.item_key).to_numpy()).all()


def _write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)


def _log_rows(n_users=6, split=True):
    rows = []
    for u in range(n_users):
        for t in range(10):
            row = {
                "User_ID": f"u{u}",
                "Item": f"i{(u + t) % 7}",
                "Category": ["a", "b"][t % 2],
                "clicked": (u + t) % 2,
                "ts": 1000 + 10 * t,
            }
            if split:
                row["split"] = "train" if t < 8 else ("val" if t == 8 else "test")
            rows.append(row)
    return rows


def test_renamed_columns_split_column_glob_input_and_oov(ray_session, tmp_path):
    rows = _log_rows()
    rows[-1]["Item"] = "never_in_train"  # the last test event
    _write_csv(tmp_path / "part-0.csv", rows[:30])
    _write_csv(tmp_path / "part-1.csv", rows[30:])
    spec = SceneLogSpec(columns={"user_id": "User_ID", "scenario": "Category", "label": "clicked"})
    result = prepare(
        PrepareConfig(inputs=[str(tmp_path / "part-*.csv")], out=str(tmp_path / "out"), spec=spec), log=lambda _: None
    )
    counts = result.feature_spec.row_counts
    assert (counts["train"], counts["val"], counts["test"]) == (48, 6, 6)  # the split column, as given
    items = _read(tmp_path / "out" / "items.parquet")
    assert items.set_index("item_key").loc["never_in_train", "item_id"] == 1  # OOV
    assert (_read(tmp_path / "out" / "test").item_id == 1).sum() == 1
    assert result.feature_spec.source["split"] == "column"


def test_bad_rows_stop_the_run_with_counts_file_and_example(ray_session, tmp_path):
    rows = _log_rows(split=False)
    rows[3]["clicked"] = 2
    rows[4]["clicked"] = 3
    rows[5]["ts"] = None
    rows[6]["User_ID"] = None
    _write_csv(tmp_path / "log.csv", rows)
    spec = SceneLogSpec(columns={"user_id": "User_ID", "scenario": "Category", "label": "clicked"})
    cfg = dict(inputs=[str(tmp_path / "log.csv")], spec=spec)
    with pytest.raises(DataValidationError) as e:
        prepare(PrepareConfig(out=str(tmp_path / "out"), **cfg), log=lambda _: None)
    msg = str(e.value)
    assert "4 of 60 rows are invalid" in msg
    assert f"column 'clicked' (label): outside {{0, 1}}: 2 rows (2 in {tmp_path / 'log.csv'})" in msg
    assert "column 'ts' (timestamp): null: 1 row" in msg
    assert "column 'User_ID' (user_id): null or empty: 1 row" in msg
    assert '"clicked": "2"' in msg

    result = prepare(PrepareConfig(out=str(tmp_path / "dropped"), on_bad_rows="drop", **cfg), log=lambda _: None)
    counts = result.feature_spec.row_counts
    assert counts["bad_rows_dropped"] == {
        "column 'clicked' (label): outside {0, 1}": 2,
        "column 'ts' (timestamp): null": 1,
        "column 'User_ID' (user_id): null or empty": 1,
    }
    assert counts["input"] == 60 and counts["train"] + counts["val"] + counts["test"] == 56


def test_empty_input_and_missing_inputs_and_missing_columns(ray_session, tmp_path):
    (tmp_path / "empty.csv").write_text("user_id,item_id,scenario,label,timestamp\n")
    with pytest.raises(DataValidationError, match="has no rows"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "empty.csv")], out=str(tmp_path / "o1")), log=lambda _: None)
    with pytest.raises(DataValidationError, match="input not found"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "nope")], out=str(tmp_path / "o2")), log=lambda _: None)
    with pytest.raises(DataValidationError, match=r"no \.parquet or \.csv files found"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "*.parquet")], out=str(tmp_path / "o3")), log=lambda _: None)
    _write_csv(tmp_path / "a.csv", [{"user_id": 1, "item_id": 2, "scenario": "s", "label": 1, "timestamp": 5}])
    _write_csv(tmp_path / "b.csv", [{"user_id": 1, "item_id": 2, "scenario": "s", "timestamp": 5}])
    with pytest.raises(DataValidationError) as e:
        prepare(
            PrepareConfig(inputs=[str(tmp_path / "a.csv"), str(tmp_path / "b.csv")], out=str(tmp_path / "o4")),
            log=lambda _: None,
        )
    assert str(tmp_path / "b.csv") in str(e.value) and "'label'" in str(e.value)


def test_refuses_to_overwrite_and_bad_options(tmp_path):
    _write_csv(tmp_path / "x.csv", _log_rows())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "x.csv")], out=str(tmp_path / "out")), log=lambda _: None)
    with pytest.raises(ConfigError, match="not written by msit"):  # --overwrite only replaces msit's own output
        prepare(
            PrepareConfig(inputs=[str(tmp_path / "x.csv")], out=str(tmp_path / "out"), overwrite=True),
            log=lambda _: None,
        )
    assert (tmp_path / "out" / "x").read_text() == "keep me"
    with pytest.raises(ConfigError, match="split ratios"):
        PrepareConfig(inputs=["x"], out="y", split_ratios=(0.5, 0.1, 0.1))
    with pytest.raises(ConfigError, match="on_bad_rows"):
        PrepareConfig(inputs=["x"], out="y", on_bad_rows="ignore")


def test_filesystem_uris_take_the_pyarrow_filesystem_path(ray_session, tmp_path):
    """file:// goes through pyarrow's filesystem resolution, the same code path as s3:// and gs://."""
    _write_csv(tmp_path / "part-0.csv", _log_rows())
    result = prepare(
        PrepareConfig(
            inputs=[f"file://{tmp_path}/part-*.csv"],
            out=str(tmp_path / "out"),
            spec=SceneLogSpec(columns={"user_id": "User_ID", "scenario": "Category", "label": "clicked"}),
        ),
        log=lambda _: None,
    )
    assert result.feature_spec.row_counts["input"] == 60
    assert result.feature_spec.source["files"] == 1


def test_exact_duplicates_are_found_among_rows_sharing_user_time_and_item_even_when_not_adjacent():
    import pyarrow as pa

    # Rows in event order. u1's three rows at time 5 on item a: the third repeats the first (the second differs in
    # its label); u2's row equals u1's first but for the user; u1's two rows on item b differ in time.
    table = pa.table(
        {
            "user_id": ["u1", "u1", "u1", "u1", "u1", "u2"],
            "timestamp": [5, 5, 5, 6, 7, 5],
            "item_id": ["a", "a", "a", "b", "b", "a"],
            "label": pa.array([0, 1, 0, 1, 1, 0], pa.int8()),
            "price": [1.0, 1.0, 1.0, None, None, 1.0],
        }
    )
    assert _exact_duplicates(table) == 1
    assert _exact_duplicates(table.slice(3)) == 0
