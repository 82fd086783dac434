"""Embeddings shared by every scene and every model family.

Items are described by a table indexed by item id (built from the prepared `items.parquet` and
kept as buffers in the model's weights), so that a target item and a past item in a behaviour
history get the same representation, and serving needs nothing but item ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from msit.data.feature_spec import FeatureSpec
from msit.data.schema import FIRST_REAL, SCENE_ID, USER_ID
from msit.model.config import ModelConfig


def fields_of(spec: FeatureSpec, role: str, kind: str) -> list[str]:
    return [name for name, f in spec.fields.items() if f.role == role and f.type == kind]


def load_item_table(prepared_dir: str | Path, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Item features as arrays indexed by item id. Rows PAD and OOV are 0."""
    items = pd.read_parquet(Path(prepared_dir) / "items.parquet")
    items = items[items["item_id"] >= FIRST_REAL]
    n = spec.fields["item_id"].vocab
    table = {}
    for col in fields_of(spec, "item", "categorical") + fields_of(spec, "item", "numeric"):
        values = np.zeros(n, dtype=np.float32 if spec.fields[col].type == "numeric" else np.int64)
        values[items["item_id"].to_numpy()] = items[col].to_numpy()
        table[col] = values
    for col in fields_of(spec, "item", "multi"):
        values = np.zeros((n, spec.fields[col].width), dtype=np.int64)
        values[items["item_id"].to_numpy()] = np.stack(items[col].to_numpy())
        table[col] = values
    return table


class MaskedMean(nn.Module):
    """Mean of the embeddings of a multi-valued feature's non-padding values."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (..., L) -> (..., dim)
        mask = (ids != 0).unsqueeze(-1).float()
        return (self.embedding(ids) * mask).sum(-2) / mask.sum(-2).clamp(min=1.0)


class FeatureEmbedder(nn.Module):
    """User, item, scene and context representations, each of width `embed_dim`."""

    item_text: torch.Tensor  # a buffer, with use_text

    def __init__(
        self,
        cfg: ModelConfig,
        spec: FeatureSpec,
        item_table: dict[str, np.ndarray] | None = None,
        item_text: np.ndarray | None = None,
    ):
        super().__init__()
        d = cfg.embed_dim
        self.user = nn.Embedding(spec.fields["user_id"].vocab, d, padding_idx=0)
        self.item = nn.Embedding(spec.fields["item_id"].vocab, d, padding_idx=0)
        self.scene = nn.Embedding(spec.fields["scene_id"].vocab, d, padding_idx=0)
        self.categorical = nn.ModuleDict(
            {
                c: nn.Embedding(spec.fields[c].vocab, d, padding_idx=0)
                for role in ("user", "item", "context")
                for c in fields_of(spec, role, "categorical")
            }
        )
        self.multi = nn.ModuleDict(
            {
                c: MaskedMean(spec.fields[c].vocab, d)
                for role in ("user", "item", "context")
                for c in fields_of(spec, role, "multi")
            }
        )
        self.numeric = nn.ModuleDict(
            {
                role: nn.Linear(len(fields_of(spec, role, "numeric")), d, bias=False)
                for role in ("user", "item", "context")
                if fields_of(spec, role, "numeric")
            }
        )
        self.fields = {
            role: {kind: fields_of(spec, role, kind) for kind in ("categorical", "multi", "numeric")}
            for role in ("user", "item", "context")
        }
        # Small initial embeddings: at N(0, 1), id embeddings barely move within a few epochs of AdamW.
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.05)
                with torch.no_grad():
                    module.weight[0].zero_()

        # The item table: persistent buffers, so a saved model carries it.
        n_items = spec.fields["item_id"].vocab
        for kind in ("categorical", "multi", "numeric"):
            for col in self.fields["item"][kind]:
                shape = (n_items, spec.fields[col].width) if kind == "multi" else (n_items,)
                dtype = torch.float32 if kind == "numeric" else torch.long
                values = torch.zeros(shape, dtype=dtype) if item_table is None else torch.as_tensor(item_table[col])
                self.register_buffer(f"item_{col}", values.to(dtype))
        self.use_text = cfg.use_text
        if cfg.use_text:
            text = torch.zeros(n_items, cfg.text_dim) if item_text is None else torch.as_tensor(item_text)
            if text.shape != (n_items, cfg.text_dim):
                raise ValueError(
                    f"item text embeddings have shape {tuple(text.shape)}, expected ({n_items}, "
                    f"{cfg.text_dim}); re-run `msit data embed-text` or set text_dim"
                )
            self.register_buffer("item_text", text.float())
            self.text_projection = nn.Linear(cfg.text_dim, d)

    def _side(self, role: str, values: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*like.shape, self.user.embedding_dim, device=like.device)
        for col in self.fields[role]["categorical"]:
            out = out + self.categorical[col](values[col])
        for col in self.fields[role]["multi"]:
            out = out + self.multi[col](values[col])
        if self.fields[role]["numeric"]:
            numbers = torch.stack([values[c].float() for c in self.fields[role]["numeric"]], dim=-1)
            out = out + self.numeric[role](numbers)
        return out

    def item_repr(self, item_ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., d)
        # On the CPU, built once per distinct item and gathered: a batch of histories names the same items
        # many times, and the side features (multi-valued ones especially) are the costly part. On a GPU,
        # per id: `unique` would wait for the device every call, and the GPU has arithmetic to spare.
        if item_ids.device.type == "cpu":
            unique, inverse = torch.unique(item_ids, return_inverse=True)
            return self._items(unique)[inverse]
        return self._items(item_ids)

    def _items(self, item_ids: torch.Tensor) -> torch.Tensor:
        table = {c: getattr(self, f"item_{c}")[item_ids] for kind in self.fields["item"].values() for c in kind}
        out = self.item(item_ids) + self._side("item", table, item_ids)
        if self.use_text:
            out = out + self.text_projection(self.item_text[item_ids])
        return out

    def user_repr(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # (B, d)
        return self.user(batch[USER_ID]) + self._side("user", batch, batch[USER_ID])

    def context_repr(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # (B, d); zeros without context
        return self._side("context", batch, batch[SCENE_ID])
