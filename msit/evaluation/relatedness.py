"""Does the transfer attention rank scenes as they are related? The rank correlation (Spearman) between a mean
attention matrix (rows: target scene, columns: source scene) and a relatedness matrix of the same shape, over
the off-diagonal cells both define: pooled over all of them, and per target scene (the mean of each row's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from msit.errors import MsitError


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """NaN where either side is constant (a rank correlation is undefined there)."""
    return float(pd.Series(a).corr(pd.Series(b), method="spearman"))


def rank_agreement(attention: np.ndarray, relatedness: np.ndarray, min_row_pairs: int = 2) -> dict:
    """{"pooled", "per_target_mean", "per_target" (one value or None per target scene), "pairs"}; a target scene
    with fewer than `min_row_pairs` defined off-diagonal cells has no per-target value."""
    n = len(attention)
    if attention.shape != (n, n) or relatedness.shape != (n, n):
        raise ValueError(f"need two square matrices of one shape, got {attention.shape} and {relatedness.shape}")
    cells = ~np.eye(n, dtype=bool) & np.isfinite(attention) & np.isfinite(relatedness)
    per_target = [
        spearman(attention[t, cells[t]], relatedness[t, cells[t]]) if cells[t].sum() >= min_row_pairs else None
        for t in range(n)
    ]
    defined = [v for v in per_target if v is not None and not np.isnan(v)]
    return {
        "pooled": spearman(attention[cells], relatedness[cells]),
        "per_target_mean": float(np.mean(defined)) if defined else float("nan"),
        "per_target": [None if v is None or np.isnan(v) else v for v in per_target],
        "pairs": int(cells.sum()),
    }


def load_relatedness(path: str | Path, scenes: list[str]) -> np.ndarray:
    """A known scene relatedness from a JSON with `scenes` (names) and `scene_relatedness` (a matrix in that
    order), as `msit data synth` writes in synth.json, reordered to `scenes` (a model's slot order)."""
    info = json.loads(Path(path).read_text())
    if "scenes" not in info or "scene_relatedness" not in info:
        raise MsitError(f"{path}: needs `scenes` and `scene_relatedness` (the synth.json of `msit data synth`)")
    names, matrix = list(info["scenes"]), np.asarray(info["scene_relatedness"], dtype=float)
    if matrix.shape != (len(names), len(names)):
        raise MsitError(f"{path}: scene_relatedness is {matrix.shape}, for {len(names)} scenes")
    missing = [s for s in scenes if s not in names]
    if missing:
        raise MsitError(f"{path}: no relatedness for scene(s) {missing} (it has {names})")
    order = [names.index(s) for s in scenes]
    return matrix[np.ix_(order, order)]
