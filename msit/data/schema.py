"""The batch contract: what an integer id means, which slot a scene has, and the names of a model batch's tensors.

Data preparation, the history windows, every model family, training and serving import these; no other module
spells them.

Ids. Every vocabulary (users, items, scenes, categorical and multi-valued features) reserves its first indices:
PAD = 0 is padding and a missing value (an embedding row kept at zero), OOV = 1 a value that training did not
keep (unseen, or too rare); real values follow from FIRST_REAL = 2, in the vocabulary's order.

Scenes. A scene has an id (its index in the scene vocabulary: the scene embedding's row, `FeatureSpec.scenarios[i]`
has id i + FIRST_REAL) and, in a model that knows S scenes, a slot: 0..S-1, the row of per-scene tables such as
MSIT's empty interests or a baseline's towers. A scene id that is none of the model's S scenes (padding, OOV, or a
scene added to the data after the model was trained) has the slot S, `scene_slots`' one rule for every family:
the baselines give it a tower of its own (S + 1 slots), MSIT has no interest of its own for it (its S-slot tables
have no row S) and transfers from every scene.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

PAD, OOV = 0, 1
RESERVED = ("<pad>", "<oov>")  # the vocabulary values at PAD and OOV
FIRST_REAL = len(RESERVED)  # the index of a vocabulary's first real value

T = TypeVar("T")


def real_values(values: Sequence[T]) -> Sequence[T]:
    """A vocabulary's values without the reserved ones: value k of the result has index k + FIRST_REAL."""
    return values[FIRST_REAL:]


def real_count(values: Sequence) -> int:
    """How many real values a vocabulary has."""
    return max(len(values) - FIRST_REAL, 0)


def scene_id(slot: int) -> int:
    """The scene id of a known scene's slot (its position in `FeatureSpec.scenarios`)."""
    return slot + FIRST_REAL


def scene_slot(scene: int) -> int:
    """The slot (position in `FeatureSpec.scenarios`) of a known scene's id."""
    return scene - FIRST_REAL


def known_scene_ids(n_scenes: int) -> torch.Tensor:
    """(S,) the scene ids of slots 0..S-1."""
    return torch.arange(n_scenes) + FIRST_REAL


def scene_slots(scene_ids: torch.Tensor, n_scenes: int) -> torch.Tensor:
    """Scene ids -> slots among the model's `n_scenes` known scenes; `n_scenes` (one past the last) for a scene id
    that is none of them (padding, OOV, a scene newer than the model)."""
    slots = scene_ids - FIRST_REAL
    return torch.where((slots >= 0) & (slots < n_scenes), slots, torch.full_like(slots, n_scenes))


# The model batch: a dict of tensors, one row per event or request (B rows), cut with a history window of the
# model's N past events. Besides these, the user and context features, under their column names (FeatureSpec.fields).
Batch = dict[str, torch.Tensor]

USER_ID = "user_id"  # (B,) int64: the user's index
ITEM_ID = "item_id"  # (B,) int64: the target item's index (serving passes candidates beside the batch: (B, C))
SCENE_ID = "scene_id"  # (B,) int64: the target scene's id
LABEL = "label"  # (B,) int64: the target's 0/1 outcome (training and evaluation batches)

# The history window (msit.data.sequences.history_windows): the user's last N events strictly before the row's
# moment, most recent first, padded at the end with zeros.
HISTORY_ITEM_IDS = "history_item_ids"  # (B, N) int64: item index of each past event (PAD = padding)
HISTORY_SCENE_IDS = "history_scene_ids"  # (B, N) int64: scene id of each past event
HISTORY_LABELS = "history_labels"  # (B, N) int64: 0/1 outcome of each past event (0 also in padding)
HISTORY_TIME_GAPS = "history_time_gaps"  # (B, N) int64: seconds from each past event to the row's moment (> 0)
HISTORY_LENGTH = "history_length"  # (B,) int64: how many of the N slots are real events (the rest are padding)

HISTORY_FIELDS = (HISTORY_ITEM_IDS, HISTORY_SCENE_IDS, HISTORY_LABELS, HISTORY_TIME_GAPS)  # the (B, N) tensors
WINDOW_FIELDS = (*HISTORY_FIELDS, HISTORY_LENGTH)  # everything a history window adds to a batch
