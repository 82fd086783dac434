"""Evaluation metrics for click-through prediction across scenes (numpy only).

Labels are binary (0/1 or bool). Every metric returns a plain Python float; NaN means "undefined here"
(e.g. AUC of a single class), never an error, so per-scene reports stay complete.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

UNKNOWN_SCENE = "<unknown>"


def _binary(labels: ArrayLike) -> np.ndarray:
    y = np.asarray(labels).ravel()
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be binary (0/1 or bool)")
    return y.astype(bool)


def _check_lengths(*arrays: np.ndarray) -> None:
    if len({a.shape[0] for a in arrays}) > 1:
        raise ValueError(f"inputs have different lengths: {[a.shape[0] for a in arrays]}")


def _tie_groups(sorted_keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """For rows already sorted by `sorted_keys`: (start, end) positions of each row's run of equal keys."""
    n = sorted_keys[0].shape[0]
    new = np.ones(n, dtype=bool)
    if n > 1:
        new[1:] = np.logical_or.reduce([k[1:] != k[:-1] for k in sorted_keys])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], n)
    group = np.cumsum(new) - 1
    return starts[group], ends[group]


def _auc_from_ranks(pos_rank_sum: np.ndarray, n_pos: np.ndarray | int, n: np.ndarray | int) -> np.ndarray:
    """Mann-Whitney: AUC = (R+ - P(P+1)/2) / (P*N); 1-based average ranks make ties count one half."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC by the rank-sum formula; tied scores get average ranks (same as sklearn's roc_auc_score).

    NaN when only one class (or nothing) is present.
    """
    y, s = _binary(labels), np.asarray(scores, dtype=float).ravel()
    _check_lengths(y, s)
    n_pos, n = int(y.sum()), y.size
    if n_pos in (0, n):
        return float("nan")
    order = np.argsort(s, kind="stable")
    start, end = _tie_groups([s[order]])
    ranks = (start + end + 1) / 2.0  # average 1-based rank of each row's tie group
    return float(_auc_from_ranks(ranks[y[order]].sum(), n_pos, n))


def log_loss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probs clipped to [eps, 1-eps]. NaN for empty input."""
    y, p = _binary(labels), np.clip(np.asarray(probs, dtype=float).ravel(), eps, 1 - eps)
    _check_lengths(y, p)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def gauc(labels: ArrayLike, scores: ArrayLike, user_ids: ArrayLike) -> float:
    """Group AUC: per-user AUC averaged with weights = the user's number of events.

    Ties within a user get average ranks. Users whose events are all one class are skipped; NaN if none is left.
    Vectorised: one sort by (user, score), then per-user sums with bincount.
    """
    y, s = _binary(labels), np.asarray(scores, dtype=float).ravel()
    _, users = np.unique(np.asarray(user_ids).ravel(), return_inverse=True)
    _check_lengths(y, s, users)
    if y.size == 0:
        return float("nan")
    order = np.lexsort((s, users))
    u, s_sorted, y_sorted = users[order], s[order], y[order]
    user_start, _ = _tie_groups([u])
    tie_start, tie_end = _tie_groups([u, s_sorted])
    ranks = (tie_start + tie_end + 1) / 2.0 - user_start  # average 1-based rank within the user
    n = np.bincount(u).astype(float)
    n_pos = np.bincount(u, weights=y_sorted.astype(float))
    pos_rank_sum = np.bincount(u, weights=np.where(y_sorted, ranks, 0.0), minlength=n.size)
    ok = (n_pos > 0) & (n_pos < n)
    if not ok.any():
        return float("nan")
    per_user = _auc_from_ranks(pos_rank_sum[ok], n_pos[ok], n[ok])
    return float(np.average(per_user, weights=n[ok]))


def _summary(y: np.ndarray, p: np.ndarray, users: np.ndarray) -> dict[str, Any]:
    return {
        "rows": int(y.size),
        "positive_rate": float(y.mean()) if y.size else float("nan"),
        "auc": auc(y, p),
        "logloss": log_loss(y, p),
        "gauc": gauc(y, p, users),
    }


def scene_metrics(
    labels: ArrayLike, probs: ArrayLike, scene_ids: ArrayLike, user_ids: ArrayLike, scene_names: Mapping[int, str]
) -> dict[str, Any]:
    """Overall and per-scene rows, positive_rate, auc, logloss and gauc.

    Returns {"overall": {...}, "scenes": {name: {...}}}, scenes ordered by index. Scene indices missing from
    `scene_names` are pooled under "<unknown>"; indices that share a name are pooled too. Only scenes that
    occur in `scene_ids` are reported.
    """
    y, p = _binary(labels), np.asarray(probs, dtype=float).ravel()
    users, raw = np.asarray(user_ids).ravel(), np.asarray(scene_ids).ravel()
    _check_lengths(y, p, users, raw)
    if raw.size and not np.array_equal(raw, np.round(raw)):
        raise ValueError("scene_ids must be integer scene indices")
    ids, inverse = np.unique(raw.astype(np.int64), return_inverse=True)
    names = [scene_names.get(int(i), UNKNOWN_SCENE) for i in ids]
    scenes: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        mask = np.isin(inverse, [j for j, other in enumerate(names) if other == name])
        scenes[name] = _summary(y[mask], p[mask], users[mask])
    return {"overall": _summary(y, p, users), "scenes": scenes}


def ranking_metrics(scores: ArrayLike, relevant: ArrayLike, k: int) -> dict[str, float]:
    """Recall@K and NDCG@K (binary gains, log2 discount) averaged over queries with >= 1 relevant item.

    Recall@K = |top-K ∩ relevant| / |relevant|; the ideal DCG ranks min(K, |relevant|) relevant items first.
    Queries without relevant items are skipped (NaN if none is left). Tied scores are broken arbitrarily.
    """
    s, rel = np.asarray(scores, dtype=float), np.asarray(relevant, dtype=bool)
    if s.ndim != 2 or s.shape != rel.shape:
        raise ValueError(f"scores and relevant must be 2-d arrays of one shape, got {s.shape} and {rel.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_rel = rel.sum(axis=1)
    keep = n_rel > 0
    if not keep.any():
        return {f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan")}
    s, rel, n_rel = s[keep], rel[keep], n_rel[keep]
    kk = min(k, s.shape[1])
    top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, axis=1), axis=1, kind="stable"), axis=1)
    hits = np.take_along_axis(rel, top, axis=1)
    discount = 1.0 / np.log2(np.arange(2, kk + 2))
    ideal = np.cumsum(discount)[np.minimum(n_rel, kk) - 1]
    return {
        f"recall@{k}": float(np.mean(hits.sum(axis=1) / n_rel)),
        f"ndcg@{k}": float(np.mean((hits * discount).sum(axis=1) / ideal)),
    }


def format_table(metrics: Mapping[str, Any]) -> str:
    """Aligned plain-text table of `scene_metrics` output: one line per scene, then `overall`. NaN -> n/a."""

    def num(x: float, digits: int = 4) -> str:
        return "n/a" if x is None or np.isnan(x) else f"{x:.{digits}f}"

    header = ["scene", "rows", "pos%", "AUC", "LogLoss", "GAUC"]
    lines = [
        [name, str(m["rows"]), num(100 * m["positive_rate"], 2), num(m["auc"]), num(m["logloss"]), num(m["gauc"])]
        for name, m in [*metrics["scenes"].items(), ("overall", metrics["overall"])]
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = [str.ljust] + [str.rjust] * (len(header) - 1)
    return "\n".join("  ".join(f(c, w) for f, c, w in zip(fmt, row, widths, strict=True)) for row in [header, *lines])
