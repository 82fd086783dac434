"""Text features for the model: item-text embeddings computed once per prepared directory (batch inference on
Ray Data, kept as a cache beside the data), and scene-description embeddings (a handful, computed in-process)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from msit.data.feature_spec import FeatureSpec, write_json_atomic
from msit.data.schema import FIRST_REAL, real_values  # PAD and OOV have no text of their own
from msit.errors import MsitError
from msit.text.encoder import (
    RECIPE,
    TextEncoder,
    encoder_dim,
    encoder_fingerprint,
    encoder_label,
    is_empty_text,
    resolve_encoder_path,
)

ITEMS_FILE = "items.parquet"
EMBEDDINGS_FILE = "text_embeddings.parquet"
EMBEDDINGS_META_FILE = "text_embeddings.json"
FORMAT_VERSION = 1
JOINER = ". "
ROWS_PER_BLOCK = 4096  # Ray Data block size: enough blocks to spread over an actor pool, few enough to be cheap
_FINGERPRINT_KEY = b"msit.fingerprint"


def item_text_columns(spec: FeatureSpec) -> list[str]:
    """In the spec's order, which is part of the cache key: reordering the columns changes the joined text."""
    return [name for name, info in spec.fields.items() if info.type == "text" and info.role == "item"]


def item_texts(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """One string per item: its non-empty text columns joined with ". ", so that a title and a description read
    as two sentences. No text at all gives "" (which encodes to a zero vector)."""
    values = [frame[c].tolist() for c in columns]
    return [JOINER.join(str(v).strip() for v in row if not is_empty_text(v)) for row in zip(*values, strict=True)]


def _texts_fingerprint(encoder_fp: str, columns: Sequence[str], ids: np.ndarray, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{encoder_fp}\n{json.dumps(list(columns))}\n{JOINER!r}\n".encode())
    for i in np.argsort(ids, kind="stable"):
        digest.update(f"{int(ids[i])}\t{texts[i]}\n".encode())
    return digest.hexdigest()


def _to_table(ids: np.ndarray, vectors: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.table(
        {
            "item_id": pa.array(ids, type=pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        }
    )


class _EmbedBatch:
    """A Ray Data actor: the model is loaded once per actor, not once per batch."""

    def __init__(self, path: str, max_length: int, batch_size: int) -> None:
        self.encoder = TextEncoder(path, max_length=max_length, batch_size=batch_size)

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        vectors = self.encoder.encode(batch["text"].tolist())
        return _to_table(batch["item_id"].to_numpy(dtype=np.int64), vectors)


def _fresh_cache(out: Path, meta_path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The metadata is written last and the parquet file carries the fingerprint too, so an interrupted run or a
    file copied from elsewhere is never mistaken for a valid cache."""
    if not (out.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        parquet = pq.read_metadata(out)
    except (OSError, ValueError, pa.ArrowException):
        return None
    if (
        meta.get("fingerprint") != fingerprint
        or parquet.num_rows != meta.get("rows")
        or (parquet.metadata or {}).get(_FINGERPRINT_KEY) != fingerprint.encode()
    ):
        return None
    return meta


def embed_item_text(
    prepared_dir: str | Path,
    encoder_path: str | Path | None = None,
    batch_size: int = 64,
    force: bool = False,
    *,
    max_length: int = 64,
    concurrency: int = 1,
    log: Callable[[str], None] = print,
) -> Path:
    """Embed every item's text with the frozen encoder and write `text_embeddings.parquet` (item_id, embedding)
    plus `text_embeddings.json` into the prepared directory. The result is a cache keyed by a fingerprint of the
    encoder and the texts: it is recomputed only when either changed, or with `force`."""
    import ray

    from msit.ray_env import init_ray

    prepared = Path(prepared_dir)
    spec = FeatureSpec.load(prepared)
    columns = item_text_columns(spec)
    if not columns:
        raise MsitError(
            f"{prepared}: the items have no text columns; declare them in the spec "
            f"(item: {{text: [title]}}) and re-run `msit data prepare`"
        )
    items_path = prepared / ITEMS_FILE
    if not items_path.is_file():
        raise MsitError(f"no {ITEMS_FILE} in {prepared}: run `msit data prepare` first")
    encoder = resolve_encoder_path(encoder_path)

    # The texts come to the driver anyway (they are hashed for the cache key); the table is O(items), small.
    items = pq.read_table(items_path, columns=["item_id", *columns]).to_pandas()
    items = items[items["item_id"].to_numpy(dtype=np.int64) >= FIRST_REAL]
    ids = items["item_id"].to_numpy(dtype=np.int64)
    texts = item_texts(items, columns)
    encoder_fp = encoder_fingerprint(encoder, max_length)
    fingerprint = _texts_fingerprint(encoder_fp, columns, ids, texts)
    out, meta_path = prepared / EMBEDDINGS_FILE, prepared / EMBEDDINGS_META_FILE
    if not force and _fresh_cache(out, meta_path, fingerprint):
        log(
            f"text embeddings in {out} are up to date ({encoder_label(encoder)}, {len(ids):,} items); "
            f"force to recompute"
        )
        return out

    dim = encoder_dim(encoder)
    log(
        f"embedding the text of {len(ids):,} items ({', '.join(columns)}) with {encoder_label(encoder)} "
        f"(dim {dim}) on Ray Data ..."
    )
    t0 = time.perf_counter()
    batches: Iterable[pa.Table] = []
    if len(ids):
        init_ray()
        frame = pd.DataFrame({"item_id": ids, "text": texts})
        blocks = [frame.iloc[i : i + ROWS_PER_BLOCK] for i in range(0, len(frame), ROWS_PER_BLOCK)]
        # from_pandas rather than read_parquet: the prepared directory need only exist on the driver's machine.
        batches = (
            ray.data.from_pandas(blocks)
            .map_batches(
                _EmbedBatch,
                fn_constructor_kwargs={"path": str(encoder), "max_length": max_length, "batch_size": batch_size},
                batch_size=batch_size,
                batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=concurrency),
                num_cpus=1,
            )
            .iter_batches(batch_format="pyarrow", batch_size=None)
        )
    schema = pa.schema(
        [("item_id", pa.int64()), ("embedding", pa.list_(pa.float32(), dim))],
        metadata={_FINGERPRINT_KEY: fingerprint.encode()},
    )

    meta_path.unlink(missing_ok=True)  # from here on, the old cache is invalid whatever happens
    tmp = prepared / f".{EMBEDDINGS_FILE}.{uuid.uuid4().hex}"  # not mkstemp: that would make the file owner-only
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                if batch.num_rows:
                    writer.write_table(batch.select(schema.names).cast(schema))
                    rows += batch.num_rows
        if rows != len(ids):
            raise MsitError(f"text embedding produced {rows:,} rows for {len(ids):,} items; nothing was written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = round(time.perf_counter() - t0, 3)
    write_json_atomic(
        meta_path,
        {
            "format_version": FORMAT_VERSION,
            "encoder": encoder.name,
            "encoder_path": str(encoder),
            "encoder_fingerprint": encoder_fp,
            "recipe": RECIPE,
            "max_length": max_length,
            "dim": dim,
            "text_columns": columns,
            "joiner": JOINER,
            "rows": rows,
            "item_vocab_size": spec.fields["item_id"].vocab_size,
            "fingerprint": fingerprint,
            "seconds": seconds,
        },
    )
    log(f"wrote {out} ({rows:,} items x {dim}) in {seconds:.1f}s ({rows / max(seconds, 1e-9):,.0f} items/s)")
    return out


def load_item_text_embeddings(prepared_dir: str | Path, n_items: int) -> np.ndarray:
    """A (n_items, dim) table indexed by item_id, ready to initialise a frozen embedding layer. Rows 0 (padding)
    and 1 (out-of-vocabulary) are zeros: OOV items share one index, so no single text can speak for them."""
    prepared = Path(prepared_dir)
    out, meta_path = prepared / EMBEDDINGS_FILE, prepared / EMBEDDINGS_META_FILE
    if not (out.is_file() and meta_path.is_file()):
        raise MsitError(f"no item text embeddings in {prepared}: run `msit data embed-text {prepared}`")
    try:
        meta = json.loads(meta_path.read_text())
        table = pq.read_table(out)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise MsitError(
            f"the item text embeddings in {prepared} are unreadable ({e}): run "
            f"`msit data embed-text {prepared} --force`"
        ) from e
    ids = table.column("item_id").to_numpy().astype(np.int64)
    dim = int(meta["dim"])
    if meta.get("item_vocab_size") != n_items or (len(ids) and (ids.max() >= n_items or ids.min() < FIRST_REAL)):
        raise MsitError(
            f"the item text embeddings in {prepared} were made for {meta.get('item_vocab_size')} item "
            f"indices, not {n_items}: run `msit data embed-text {prepared} --force`"
        )
    column = table.column("embedding")
    values = column.combine_chunks().flatten() if column.num_chunks else pa.array([], pa.float32())
    matrix = np.zeros((n_items, dim), dtype=np.float32)
    matrix[ids] = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    matrix[:FIRST_REAL] = 0.0
    return matrix


def embed_scene_descriptions(
    prepared_dir: str | Path,
    encoder_path: str | Path | None = None,
    *,
    max_length: int = 64,
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """A (len(scenario vocabulary), dim) table indexed by scene_id. A scene without a description gets a zero
    row, so the model can tell "no description" from any described scene. A few strings: no Ray needed, and
    no model is loaded at all when no scene has a description."""
    spec = FeatureSpec.load(prepared_dir)
    scenes = spec.vocabularies["scenario"]
    descriptions: dict[str, str] = (spec.source.get("spec") or {}).get("scene_descriptions") or {}
    unknown = sorted(set(descriptions) - set(real_values(scenes)))
    if unknown:
        log(f"note: scene_descriptions names scenes that are not in the data, ignored: {', '.join(unknown)}")
    texts = [None] * FIRST_REAL + [descriptions.get(scene) for scene in real_values(scenes)]
    if all(is_empty_text(t) for t in texts):
        return np.zeros((len(scenes), encoder_dim(encoder_path)), dtype=np.float32)
    return TextEncoder(encoder_path, max_length=max_length).encode(texts)
