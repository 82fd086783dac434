"""On MovieLens-100K (genre): the windows cut at batch time from the prepared layout equal, row for row, the
per-row histories today's reference builder writes from the raw CSV (same strictly-earlier rule, same tie
order), and the prepared files hold the contract's columns and types."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from msit.data.feature_spec import FeatureSpec
from msit.data.prepare import PrepareConfig, prepare
from msit.data.prepared import event_columns, load_sequences, load_split
from msit.data.schema import HISTORY_FIELDS, WINDOW_FIELDS
from tests.reference_histories import add_histories

N = 50
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def ml100k(ray_session, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml100k") / "prepared"
    prepare(PrepareConfig(inputs=[str(shared_data / "ml100k_genre.csv")], out=str(out)), log=lambda _: None)
    return pd.read_csv(shared_data / "ml100k_genre.csv"), out


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in one order on both sides: a window depends only on (user, timestamp), so rows that tie on the
    sort keys hold the same window."""
    return frame.sort_values(["user_key", "timestamp", "item_id", "scene_id", "label"]).reset_index(drop=True)


def _windows(out, spec) -> pd.DataFrame:
    sequences = load_sequences(out)
    keys = pq.read_table(out / "sequences", columns=["sequence_row", "user_key"]).to_pandas()
    user_key = keys.set_index("sequence_row").user_key.sort_index().to_numpy()
    frames = []
    for split in SPLITS:
        events = load_split(out, split, spec, sequences)
        batches = list(events.batches(batch_size=4096, history_length=N))
        columns = {
            name: torch.cat([b[name] for b in batches]).numpy()
            for name in ("item_id", "scene_id", "label", *WINDOW_FIELDS)
        }
        frame = pd.DataFrame({k: list(v) if v.ndim == 2 else v for k, v in columns.items()})
        frame["user_key"] = user_key[events.events["sequence_row"].numpy()]
        frame["timestamp"] = events.events["timestamp"].numpy()
        frame["split"] = split
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _reference(raw: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """The histories built from the raw CSV by the old per-row builder, ids encoded with the prepared
    vocabularies."""
    items, scenes = spec.vocabulary("item_id"), spec.vocabulary("scenario")
    events = {
        "user_key": raw.user_id.astype(str).to_numpy(dtype=object),
        "item_key": raw.item_id.astype(str).to_numpy(dtype=object),
        "item_id": items.encode(raw.item_id.astype(str)),
        "scene_id": scenes.encode(raw.scenario),
        "label": raw.label.to_numpy(np.int64),
        "timestamp": raw.timestamp.to_numpy(np.int64),
        "split": raw.split.to_numpy(dtype=object),
    }
    out = add_histories(events, history_length=N)
    return pd.DataFrame({k: list(v) if v.ndim == 2 else v for k, v in out.items()}).drop(columns=["item_key"])


def test_windows_cut_at_batch_time_equal_the_reference_histories(ml100k):
    raw, out = ml100k
    spec = FeatureSpec.load(out)
    got, expected = _sorted(_windows(out, spec)), _sorted(_reference(raw, spec))
    assert len(got) == len(expected) == len(raw) == 100_000
    assert (expected.history_length == N).any() and (expected.history_length == 0).any()
    for name in ("user_key", "timestamp", "item_id", "scene_id", "label", "split", "history_length"):
        assert (got[name].to_numpy() == expected[name].to_numpy()).all(), name
    for name in HISTORY_FIELDS:
        assert np.array_equal(np.stack(got[name]), np.stack(expected[name])), name


def test_prepared_layout_holds_each_event_once_in_compact_types(ml100k):
    raw, out = ml100k
    spec = FeatureSpec.load(out)
    assert spec.layout == 2 and not hasattr(spec, "history_length")
    sequences = load_sequences(out)
    assert len(sequences) == raw.user_id.nunique() and int(sequences.lengths().sum()) == len(raw)
    assert all(spec.row_counts[s] == (raw.split == s).sum() for s in SPLITS)
    types = {
        "user_id": "int32",
        "item_id": "int32",
        "scene_id": "int16",
        "label": "int8",
        "timestamp": "int64",
        "sequence_row": "int32",
        "position": "int32",
    }
    for split in SPLITS:
        schema = pq.read_schema(next((out / split).glob("*.parquet")))
        assert set(schema.names) == set(event_columns(spec))
        assert {name: str(schema.field(name).type) for name in types} == types
        rows = pq.read_table(out / split, columns=["sequence_row"]).column(0).to_numpy()
        assert (np.diff(rows) == 0).mean() < 0.1  # not grouped by user (grouped, 99% of neighbours would match)
    schema = pq.read_schema(next((out / "sequences").glob("*.parquet")))
    assert {n: str(schema.field(n).type) for n in schema.names} == {
        "sequence_row": "int32",
        "user_key": "string",
        "item_ids": "list<element: int32>",
        "scene_ids": "list<element: int16>",
        "labels": "list<element: int8>",
        "timestamps": "list<element: int64>",
    }
