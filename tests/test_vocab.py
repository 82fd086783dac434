"""Vocabularies: reserved indices, min-count, out-of-vocabulary, numeric and multi-valued encoding."""

import numpy as np
import pandas as pd

from msit.data.spec import FeatureGroup, SceneLogSpec
from msit.data.vocab import OOV, PAD, Encoders, Vocabulary, count_batch, encode_batch

SPEC = SceneLogSpec(columns={}, user=FeatureGroup(numeric=["age"]), item=FeatureGroup(multi={"genres": "|"}))


def _rows():
    return pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "c", "z"],
            "item_id": ["1", "1", "2", "3", "9"],
            "scenario": ["s2", "s1", "s1", "s1", "s3"],
            "label": [1, 0, 1, 0, 1],
            "timestamp": [1, 2, 3, 4, 5],
            "split": ["train", "train", "train", "train", "test"],
            "age": [20.0, 20.0, 40.0, None, 99.0],
            "genres": ["x|y", "x|y", "y", None, "w|x|y|q"],
        }
    )


def test_vocabulary_reserves_padding_and_oov_and_applies_min_count():
    vocab = Vocabulary.from_counts({"a": 3, "b": 1, "c": 2}, min_count=2)
    assert vocab.values == ["<pad>", "<oov>", "a", "c"]
    codes = vocab.encode(pd.Series(["c", "b", None, "new", "a"], dtype=object))
    assert codes.tolist() == [3, OOV, PAD, OOV, 2]


def test_fit_on_train_only_and_unseen_test_values_map_to_oov():
    rows = _rows()
    encoders = Encoders.fit(count_batch(rows, SPEC), SPEC, min_count=1, multi_cap=2)
    out = encode_batch(rows, encoders, SPEC)
    assert encoders.vocabularies["user_id"].values == ["<pad>", "<oov>", "a", "b", "c"]
    assert out["user_id"].tolist() == [2, 2, 3, 4, OOV]  # "z" only appears in test
    assert out["item_id"][-1] == OOV
    assert encoders.vocabularies["scenario"].values[2:] == ["s1", "s2"]  # scenes by name
    assert out["scene_id"].tolist() == [3, 2, 2, 2, OOV]
    # Numeric: standardised with training mean/std; null -> 0.
    mean, std = np.mean([20, 20, 40]), np.std([20, 20, 40])
    assert np.allclose(out["age"][:4], [(20 - mean) / std, (20 - mean) / std, (40 - mean) / std, 0.0])
    # Multi-valued: capped at 2 tokens, padded with 0, unseen tokens -> OOV.
    x, y = (encoders.vocabularies["genres"].values.index(t) for t in ("x", "y"))
    assert out["genres"].tolist() == [[x, y], [x, y], [y, PAD], [PAD, PAD], [OOV, x]]
    assert encoders.multi_truncated == {"genres": 0}
