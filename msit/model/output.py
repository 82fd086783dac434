"""The two halves of every model's forward pass, and what they return.

`encode_user(batch) -> UserSide`: what depends on the user, the target scene and the moment (a request
of serving, a row of training): the history window's encoding, the user and target-scene
representations. `score(user_side, item_ids) -> ModelOutput`: what depends on the candidate, for
(R, C) candidates, C per user-side row. `forward(batch)` is both with one candidate per row, the
batch's own `item_id`, so that training, evaluation and serving compute the same thing; serving and
catalogue ranking encode each user once and score all of its candidates against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msit.model.parameters import Part, ScenePart

# Per-row tensors of the user side, first dimension R; which ones is each family's own business.
UserSide = dict[str, torch.Tensor]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (R, C) engagement logit of each candidate in the target scene; (B,) from forward
    transfer_attention: torch.Tensor | None = None  # (R, C, S) weight of each source scene; rows sum to 1
    behaviour_attention: torch.Tensor | None = None  # (R, C, S, N) per scene, weight of each past event
    regularization: torch.Tensor | None = None  # scalar added to the loss (already weighted)

    def one_candidate_each(self) -> ModelOutput:
        """(R, 1, ...) -> (R, ...): `forward`'s shapes, one candidate per row."""

        def first(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[:, 0]

        return ModelOutput(
            self.logits[:, 0], first(self.transfer_attention), first(self.behaviour_attention), self.regularization
        )


class Model(nn.Module):
    """What every family is to the code that trains, ranks and serves it (the two halves above)."""

    history_length: int  # N: the window width its batches are cut at

    def encode_user(self, batch: dict[str, torch.Tensor]) -> UserSide:
        raise NotImplementedError

    def score(self, user: UserSide, item_ids: torch.Tensor, explain: bool = False) -> ModelOutput:
        raise NotImplementedError

    def head_parts(self) -> dict[str, Part]:  # what fine-tuning's head mode trains whole
        raise NotImplementedError

    def scene_parts(self) -> dict[str, ScenePart]:  # the per-scene parts fine-tuning's scene mode trains
        raise NotImplementedError


def per_candidate(values: torch.Tensor, candidates: int) -> torch.Tensor:
    """(R, ...) -> (R * C, ...): a user-side tensor repeated for each of its C candidates, rows flattened
    in the order of `item_ids.flatten()`."""
    if candidates == 1:
        return values
    return values[:, None].expand(-1, candidates, *values.shape[1:]).flatten(0, 1)


def score_in_chunks(
    model: Model, user: UserSide, item_ids: torch.Tensor, explain: bool = False, max_rows: int = 65_536
) -> ModelOutput:
    """`model.score` over (R, C) candidates, at most `max_rows` candidate rows per pass (a whole catalogue
    against one user), the user side computed once."""
    R, C = item_ids.shape
    step = max(1, max_rows // max(R, 1))
    if C <= step:
        return model.score(user, item_ids, explain)
    parts = [model.score(user, item_ids[:, start : start + step], explain) for start in range(0, C, step)]

    def join(name: str) -> torch.Tensor | None:
        return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts], dim=1)

    return ModelOutput(
        torch.cat([p.logits for p in parts], dim=1), join("transfer_attention"), join("behaviour_attention")
    )
