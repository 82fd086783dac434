"""The MovieLens-100K converter reproduces the shared protocol files row for row."""

import pandas as pd
import pytest

from msit.data import movielens
from msit.errors import DataValidationError


@pytest.mark.parametrize("protocol", ["age", "genre"])
def test_conversion_equals_the_shared_csv(shared_data, tmp_path, protocol):
    out = tmp_path / f"ml100k_{protocol}.csv"
    rows = movielens.write(shared_data / "ml-100k", protocol, out)
    expected = pd.read_csv(shared_data / f"ml100k_{protocol}.csv", dtype=str, keep_default_na=False)
    got = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert rows == len(expected) == 100_000
    pd.testing.assert_frame_equal(got, expected)


def test_genre_scene_rule_majority_then_order():
    assert movielens.genre_scene("Comedy|Drama") == "drama"  # tie -> earlier scene
    assert movielens.genre_scene("Comedy|Romance|Drama") == "light"
    assert movielens.genre_scene("Action|Sci-Fi|War") == "thrill"


def test_missing_raw_files_are_named(tmp_path):
    with pytest.raises(DataValidationError, match=r"missing \['u.data', 'u.user', 'u.item', 'u.genre'\]"):
        movielens.convert(tmp_path, "age")
