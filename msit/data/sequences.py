"""Behaviour sequences: each user's events stored once; history windows cut when a batch is built.

A user's sequence is all of their events (every split, every scene) in event order: by timestamp,
ties by item (`history.event_order`). `Sequences` holds every user's sequence as flat arrays with
offsets (TorchRec's jagged layout): user row u owns `[offsets[u], offsets[u + 1])`.

The history window of an event with cutoff time t is the user's last N events *strictly before t*,
most recent first, padded with 0 at the end: the model's history contract (`msit.data.schema.WINDOW_FIELDS`).

`history_windows` is the one function that cuts them, for training, evaluation, reports,
fine-tuning and serving alike, vectorised on whatever device the sequences live on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from msit.data.schema import (
    HISTORY_FIELDS,
    HISTORY_ITEM_IDS,
    HISTORY_LABELS,
    HISTORY_LENGTH,
    HISTORY_SCENE_IDS,
    HISTORY_TIME_GAPS,
)

SEQUENCE_FIELDS = ("item_ids", "scene_ids", "labels", "timestamps")  # list columns of sequences/, in this order
SEQUENCE_DTYPES = {"item_ids": torch.int32, "scene_ids": torch.int16, "labels": torch.int8, "timestamps": torch.int64}


@dataclass
class Sequences:
    """Every user's chronological events as flat tensors on one device."""

    offsets: torch.Tensor  # (U + 1,) int64: user row u's events are [offsets[u], offsets[u + 1])
    item_ids: torch.Tensor  # (E,) int32
    scene_ids: torch.Tensor  # (E,) int16
    labels: torch.Tensor  # (E,) int8
    timestamps: torch.Tensor  # (E,) int64 seconds, non-decreasing within each user

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    def to(self, device: str | torch.device) -> Sequences:
        return Sequences(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def lengths(self) -> torch.Tensor:  # (U,)
        return self.offsets[1:] - self.offsets[:-1]

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    @classmethod
    def from_arrays(
        cls,
        lengths: np.ndarray,
        item_ids: np.ndarray,
        scene_ids: np.ndarray,
        labels: np.ndarray,
        timestamps: np.ndarray,
    ) -> Sequences:
        """From per-user lengths and the concatenated events (each user's in event order)."""
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = {"item_ids": item_ids, "scene_ids": scene_ids, "labels": labels, "timestamps": timestamps}
        for name, array in values.items():
            if len(array) != offsets[-1]:
                raise ValueError(f"sequences: {name} holds {len(array)} events, the lengths sum to {offsets[-1]}")

        def tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            array = np.ascontiguousarray(array)  # Arrow hands read-only buffers: copy those for torch
            return torch.from_numpy(array if array.flags.writeable else array.copy()).to(dtype)

        return cls(
            torch.from_numpy(offsets), **{name: tensor(array, SEQUENCE_DTYPES[name]) for name, array in values.items()}
        )

    @classmethod
    def single(cls, item_ids, scene_ids, labels, timestamps) -> Sequences:
        """One user's sequence (e.g. a serving request's history), already in event order."""
        return cls.from_arrays(
            np.array([len(item_ids)]),
            np.asarray(item_ids),
            np.asarray(scene_ids),
            np.asarray(labels),
            np.asarray(timestamps),
        )


def window_ends(sequences: Sequences, rows: torch.Tensor, cutoffs: torch.Tensor) -> torch.Tensor:
    """(B,) for each (user row, cutoff time): the index one past the user's last event strictly before the
    cutoff, as an absolute index into the flat arrays. A vectorised binary search within each user."""
    low, high = sequences.offsets[rows], sequences.offsets[rows + 1]  # search [low, high)
    cutoffs = cutoffs.to(sequences.timestamps.dtype)
    last = len(sequences.timestamps) - 1
    steps = int(sequences.lengths().max().item()).bit_length() if last >= 0 else 0
    for _ in range(steps):
        middle = (low + high) // 2
        earlier = (middle < high) & (sequences.timestamps[middle.clamp(max=last)] < cutoffs)
        low = torch.where(earlier, middle + 1, low)
        high = torch.where(earlier, high, middle)
    return low


def history_windows(
    sequences: Sequences, rows: torch.Tensor, cutoffs: torch.Tensor, length: int, positions: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The (B, length) history tensors (module docstring) of a batch of (user row, cutoff time).

    `positions`, where known (prepared event rows carry it), is how many of the user's events lie strictly
    before the cutoff; without it, it is found by binary search, so both give the same windows."""
    rows = rows.to(sequences.device, torch.int64)
    cutoffs = cutoffs.to(sequences.device, torch.int64)
    start = sequences.offsets[rows]  # (B,)
    end = (
        start + positions.to(sequences.device, torch.int64)
        if positions is not None
        else window_ends(sequences, rows, cutoffs)
    )
    past = end[:, None] - 1 - torch.arange(length, device=sequences.device)[None, :]  # (B, N), most recent first
    real = past >= start[:, None]
    past = torch.where(real, past, torch.zeros_like(past))

    if len(sequences.timestamps) == 0:  # no user has an event (a serving request without history)
        zeros = torch.zeros_like(past)
        return {**dict.fromkeys(HISTORY_FIELDS, zeros), HISTORY_LENGTH: zeros.sum(dim=1)}

    def gather(values: torch.Tensor) -> torch.Tensor:
        return torch.where(real, values[past].to(torch.int64), 0)

    return {
        HISTORY_ITEM_IDS: gather(sequences.item_ids),
        HISTORY_SCENE_IDS: gather(sequences.scene_ids),
        HISTORY_LABELS: gather(sequences.labels),
        HISTORY_TIME_GAPS: torch.where(real, cutoffs[:, None] - sequences.timestamps[past], 0),
        HISTORY_LENGTH: real.sum(dim=1),
    }
