"""A small hand-built feature spec, item table and random batches for model tests (no Ray)."""

import numpy as np
import torch

from msit.data.feature_spec import FeatureSpec, FieldInfo
from msit.data.schema import (
    FIRST_REAL,
    HISTORY_ITEM_IDS,
    HISTORY_LABELS,
    HISTORY_LENGTH,
    HISTORY_SCENE_IDS,
    HISTORY_TIME_GAPS,
    ITEM_ID,
    LABEL,
    RESERVED,
    SCENE_ID,
    USER_ID,
)

N_USERS, N_ITEMS, HISTORY = 30, 40, 6  # HISTORY: the window width of random_batch
SCENES = ["feed", "search", "shop"]


def tiny_spec() -> FeatureSpec:
    vocab = lambda prefix, n: [*RESERVED, *[f"{prefix}{i}" for i in range(n - FIRST_REAL)]]  # noqa: E731
    fields = {
        "user_id": FieldInfo("user", "id", N_USERS),
        "item_id": FieldInfo("item", "id", N_ITEMS),
        "scene_id": FieldInfo("scene", "id", len(SCENES) + FIRST_REAL),
        "gender": FieldInfo("user", "categorical", 4),
        "category": FieldInfo("item", "categorical", 6),
        "price": FieldInfo("item", "numeric", mean=0.0, std=1.0),
        "tags": FieldInfo("item", "multi", 7, sep="|", max_len=3),
        "hour": FieldInfo("context", "categorical", 26),
    }
    vocabularies = {
        "user_id": vocab("u", N_USERS),
        "item_id": vocab("i", N_ITEMS),
        "scenario": [*RESERVED, *SCENES],
        "gender": vocab("g", 4),
        "category": vocab("c", 6),
        "tags": vocab("t", 7),
        "hour": vocab("h", 26),
    }
    return FeatureSpec(scenarios=SCENES, fields=fields, vocabularies=vocabularies, row_counts={})


def item_table(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tags = rng.integers(0, 7, (N_ITEMS, 3))
    tags[:2] = 0
    return {
        "category": np.r_[0, 0, rng.integers(2, 6, N_ITEMS - 2)],
        "price": rng.normal(size=N_ITEMS).astype(np.float32),
        "tags": tags,
    }


def random_batch(size: int = 16, seed: int = 0, history_lengths=None, width: int = HISTORY) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = (
        torch.randint(0, width + 1, (size,), generator=g)
        if history_lengths is None
        else torch.as_tensor(history_lengths)
    )
    real = torch.arange(width)[None, :] < lengths[:, None]
    pad = lambda t: torch.where(real, t, torch.zeros_like(t))  # noqa: E731
    return {
        USER_ID: torch.randint(1, N_USERS, (size,), generator=g),
        ITEM_ID: torch.randint(FIRST_REAL, N_ITEMS, (size,), generator=g),
        SCENE_ID: torch.randint(FIRST_REAL, len(SCENES) + FIRST_REAL, (size,), generator=g),
        LABEL: torch.randint(0, 2, (size,), generator=g),
        "gender": torch.randint(0, 4, (size,), generator=g),
        "hour": torch.randint(0, 26, (size,), generator=g),
        HISTORY_ITEM_IDS: pad(torch.randint(1, N_ITEMS, (size, width), generator=g)),
        HISTORY_SCENE_IDS: pad(torch.randint(FIRST_REAL, len(SCENES) + FIRST_REAL, (size, width), generator=g)),
        HISTORY_LABELS: pad(torch.randint(0, 2, (size, width), generator=g)),
        HISTORY_TIME_GAPS: pad(torch.randint(1, 10**7, (size, width), generator=g)),
        HISTORY_LENGTH: lengths,
    }
