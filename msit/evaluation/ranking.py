"""Ranking a scene's catalogue: Recall@K and NDCG@K per scene.

A query is a (user, scene) pair with at least one positive event in the evaluated split. Its
candidates are the scene's catalogue (every item seen in that scene in training). Its relevant items
are the user's positives there. It is scored with the user's first event of the split in that scene
as the template: the same history and context, with the item swapped for each candidate.
"""

from __future__ import annotations

import numpy as np
import torch

from msit.data.feature_spec import FeatureSpec
from msit.data.prepared import EventSplit, model_batch
from msit.data.schema import FIRST_REAL, Batch, scene_id
from msit.evaluation.metrics import ranking_metrics
from msit.model.output import Model, score_in_chunks


def scene_catalogues(train: EventSplit | Batch) -> dict[int, np.ndarray]:
    """Scene id -> the known items (not PAD or OOV) seen in that scene in the training split (its event rows)."""
    events = train.events if isinstance(train, EventSplit) else train
    scenes, items = events["scene_id"].numpy(), events["item_id"].numpy()
    return {int(s): np.unique(items[(scenes == s) & (items >= FIRST_REAL)]) for s in np.unique(scenes)}


@torch.no_grad()
def catalogue_ranking(
    model: Model,
    data: EventSplit,
    catalogues: dict[int, np.ndarray],
    spec: FeatureSpec,
    k: int = 10,
    max_queries: int = 200,
    seed: int = 0,
) -> dict[str, dict]:
    """Per scene: recall@k, ndcg@k and the number of queries (at most `max_queries`, sampled with `seed`).
    Each query's user side is encoded once and the whole catalogue scored against it (`score_in_chunks`)."""
    model.eval()
    device = next(model.parameters()).device
    sequences = data.sequences.to(device)
    rng = np.random.default_rng(seed)
    events = data.events
    users, scenes = events["user_id"].numpy(), events["scene_id"].numpy()
    labels, items = events["label"].numpy(), events["item_id"].numpy()
    out = {}
    for slot, name in enumerate(spec.scenarios):
        scene = scene_id(slot)
        catalogue = catalogues.get(scene, np.zeros(0, dtype=np.int64))
        rows = np.flatnonzero((scenes == scene) & (labels == 1))
        query_users = np.unique(users[rows])
        if len(catalogue) == 0 or len(query_users) == 0:
            continue
        query_users = rng.permutation(query_users)[:max_queries]
        templates, relevant = [], []
        for user in query_users:
            in_scene = np.flatnonzero((users == user) & (scenes == scene))
            templates.append(in_scene[0])  # its window: cut from the row
            relevant.append(np.isin(catalogue, items[in_scene][labels[in_scene] == 1]))
        batch = model_batch(
            {key: value[templates].to(device) for key, value in events.items()}, sequences, model.history_length
        )
        candidates = torch.as_tensor(catalogue, device=device)[None].expand(len(templates), -1)
        scores = torch.sigmoid(score_in_chunks(model, model.encode_user(batch), candidates).logits.float())
        metrics = ranking_metrics(scores.cpu().numpy(), np.stack(relevant), k)
        out[name] = {**metrics, "queries": len(query_users), "catalogue": len(catalogue)}
    return out
