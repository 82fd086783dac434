"""Frozen text features: item-text and scene-description embeddings from a local sentence encoder
(all-MiniLM-L6-v2 by default, offline)."""

from msit.text.embeddings import (
    EMBEDDINGS_FILE,
    EMBEDDINGS_META_FILE,
    embed_item_text,
    embed_scene_descriptions,
    item_text_columns,
    item_texts,
    load_item_text_embeddings,
)
from msit.text.encoder import TextEncoder, default_encoder_path, encoder_fingerprint

__all__ = [
    "EMBEDDINGS_FILE",
    "EMBEDDINGS_META_FILE",
    "TextEncoder",
    "default_encoder_path",
    "embed_item_text",
    "embed_scene_descriptions",
    "encoder_fingerprint",
    "item_text_columns",
    "item_texts",
    "load_item_text_embeddings",
]
