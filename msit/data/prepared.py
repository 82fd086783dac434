"""A prepared directory (what `msit data prepare` writes), read the one way every consumer reads it.

Layout 2 (`FeatureSpec.layout`): each event is stored once, and so is each user's sequence.

    train/ val/ test/   Parquet, one row per event, compact types:
                        user_id int32, item_id int32, scene_id int16, label int8, timestamp int64,
                        user and context features (categorical int32, numeric float32, multi
                        fixed-size list<int32>), sequence_row int32 (the user's row in sequences/),
                        position int32 (how many of the user's events lie strictly before this one:
                        where its history window ends)
    sequences/          Parquet, one row per user: sequence_row int32, user_key string, and the
                        user's whole sequence in event order as lists: item_ids int32, scene_ids
                        int16, labels int8, timestamps int64
    items.parquet       one row per item: index, raw key, side features, text
    users.parquet       one row per user: index, raw key, side features
    feature_spec.json   vocabularies, scenes, fields, row counts, layout (FeatureSpec.load refuses others)

History windows are cut per batch (`msit.data.sequences.history_windows`), so the history length is
a model option, not part of the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from msit.data.feature_spec import SEQUENCES_DIR, FeatureSpec
from msit.data.schema import Batch
from msit.data.sequences import SEQUENCE_FIELDS, Sequences, history_windows
from msit.errors import MsitError

WINDOW_COLUMNS = ("timestamp", "sequence_row", "position")  # what the event rows carry to cut their windows


def feature_columns(spec: FeatureSpec) -> list[str]:
    """User and context feature columns of the event rows (item features come from the item table)."""
    return [name for name, f in spec.fields.items() if f.role in ("user", "context") and f.type not in ("id", "text")]


def event_columns(spec: FeatureSpec) -> list[str]:
    """The event-row columns training, evaluation and the reports read: small, fixed-size per row."""
    return ["user_id", "item_id", "scene_id", "label", *feature_columns(spec), *WINDOW_COLUMNS]


def model_batch(events: Batch, sequences: Sequences, history_length: int) -> Batch:
    """Event rows (on the sequences' device) -> the model's batch: integer columns as int64, and each
    row's history window of `history_length` events."""
    batch = {
        name: values.long() if not values.is_floating_point() else values
        for name, values in events.items()
        if name not in WINDOW_COLUMNS
    }
    return batch | history_windows(
        sequences, events["sequence_row"], events["timestamp"], history_length, positions=events["position"]
    )


@dataclass
class EventSplit:
    """One split in memory: its event rows (CPU tensors, compact types) and every user's sequence."""

    events: Batch  # column -> (R,) or (R, L)
    sequences: Sequences

    def __len__(self) -> int:
        return len(self.events["label"])

    def select(self, keep: torch.Tensor) -> EventSplit:
        """The rows where `keep` (a bool mask or indices) holds; sequences are shared, never cut."""
        return EventSplit({k: v[keep] for k, v in self.events.items()}, self.sequences)

    def batches(
        self,
        batch_size: int,
        history_length: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[Batch]:
        """Model batches in row order (or a fresh permutation), windows cut on `device`."""
        sequences = self.sequences if device is None else self.sequences.to(device)
        order = torch.randperm(len(self), generator=generator) if shuffle else None
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
            rows = {k: v[index].to(sequences.device, non_blocking=True) for k, v in self.events.items()}
            yield model_batch(rows, sequences, history_length)


def load_sequences(prepared_dir: str | Path) -> Sequences:
    """Every user's sequence from `sequences/`, ordered by sequence_row."""
    path = Path(prepared_dir) / SEQUENCES_DIR
    if not path.is_dir():
        raise MsitError(f"no {SEQUENCES_DIR}/ at {prepared_dir}: is it a directory made by `msit data prepare`?")
    try:
        table = pq.ParquetDataset(path).read(columns=["sequence_row", *SEQUENCE_FIELDS])
    except (pa.ArrowException, OSError) as e:
        raise MsitError(
            f"{path}: the sequences cannot be read ({' '.join(str(e).split())[:200]}); prepare the data again"
        ) from None
    rows = table["sequence_row"].to_numpy()
    if not np.array_equal(np.sort(rows), np.arange(len(rows))):
        raise MsitError(f"{path}: sequence_row is not 0..{len(rows) - 1} once each; prepare the data again")
    order = np.argsort(rows, kind="stable")
    if (order != np.arange(len(order))).any():  # prepare writes them in order; a take over many chunks is slow
        table = table.combine_chunks().take(pa.array(order))
    lists = {name: pc.list_flatten(table[name]).to_numpy() for name in SEQUENCE_FIELDS}
    lengths = pc.list_value_length(table["item_ids"]).to_numpy(zero_copy_only=False)
    return Sequences.from_arrays(lengths, **lists)


def load_events(prepared_dir: str | Path, split: str, spec: FeatureSpec) -> Batch:
    """The event rows of one split as CPU tensors (`event_columns`)."""
    path = Path(prepared_dir) / split
    if not path.is_dir():
        raise MsitError(f"no {split!r} split at {path}: is {prepared_dir} a directory made by `msit data prepare`?")
    columns = event_columns(spec)
    try:
        dataset = pq.ParquetDataset(path)
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise MsitError(
                f"{path} lacks column(s) {missing} that the model's feature spec needs: the data was "
                "prepared with other fields; prepare it with `--encoding-from MODEL`"
            )
        table = dataset.read(columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise MsitError(
            f"{path}: the split's Parquet shards cannot be read ({' '.join(str(e).split())[:200]}); "
            "prepare the data again"
        ) from None
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type):  # multi-valued features
            width = spec.fields[name].width
            values = pc.list_flatten(column).to_numpy()
            if len(values) != width * len(column):
                raise MsitError(f"{path}: column {name!r} does not hold {width} values per row; prepare again")
            values = values.reshape(len(column), width)
        else:
            values = column.to_numpy()
        out[name] = torch.from_numpy(values if values.flags.writeable else values.copy())
    return out


def load_split(
    prepared_dir: str | Path, split: str, spec: FeatureSpec, sequences: Sequences | None = None
) -> EventSplit:
    """One split in memory; pass `sequences` to share one loaded copy between splits."""
    events = load_events(prepared_dir, split, spec)
    return EventSplit(events, sequences if sequences is not None else load_sequences(prepared_dir))
