"""The scene-log spec: YAML loading, role mapping and inference."""

import pandas as pd
import pytest

from msit.data import synth
from msit.data.spec import SceneLogSpec, infer_spec, resolve_roles
from msit.errors import ConfigError, DataValidationError


@pytest.fixture(scope="module")
def synth_sample():
    return synth.generate(synth.SynthConfig(users=200, items=300, seed=1))


def test_inference_finds_roles_user_and_item_features_and_leaves_context_out(synth_sample):
    spec, notes = infer_spec(synth_sample)
    assert spec.columns == {r: r for r in ("user_id", "item_id", "scenario", "label", "timestamp")}
    assert spec.user.categorical == ["age_band", "region"]
    assert spec.item.categorical == ["category"]
    assert spec.item.numeric == ["price"]
    assert spec.item.multi == {"tags": "|"}
    assert spec.item.text == ["title"]
    assert spec.context.columns() == []
    assert any(n.startswith("hour:") and "context" in n for n in notes)
    assert any(n.startswith("device:") for n in notes)


def test_inference_leaves_a_per_event_outcome_out(shared_data):
    sample = pd.read_csv(shared_data / "ml100k_genre.csv", nrows=20_000)
    spec, _ = infer_spec(sample)
    assert "rating" not in spec.feature_columns()  # varies per event: it would leak the label
    assert spec.columns["split"] == "split"
    assert set(spec.user.columns()) == {"age", "gender", "occupation", "zip"}
    assert spec.item.text == ["title"] and spec.item.multi == {"genres": "|"}


def test_spec_maps_renamed_columns_and_aliases(tmp_path):
    (tmp_path / "spec.yaml").write_text(
        "columns: {user_id: User_ID, scenario: Category}\ncontext: {categorical: [Hour]}\n"
    )
    spec = SceneLogSpec.load(tmp_path / "spec.yaml")
    roles = resolve_roles(spec, ["User_ID", "ItemID", "Category", "Click", "ts", "Hour"], where="f.csv")
    assert roles == {
        "user_id": "User_ID",
        "item_id": "ItemID",
        "scenario": "Category",
        "label": "Click",
        "timestamp": "ts",
    }


def test_missing_required_column_names_file_role_and_columns():
    with pytest.raises(DataValidationError) as e:
        resolve_roles(SceneLogSpec(), ["user_id", "item_id", "scenario", "timestamp"], where="logs/a.csv")
    msg = str(e.value)
    assert "logs/a.csv" in msg and "'label'" in msg and "columns present" in msg


def test_spec_column_mapped_but_absent():
    spec = SceneLogSpec(columns={"user_id": "uid_x"})
    with pytest.raises(DataValidationError, match=r"missing column 'uid_x' \(the spec maps user_id"):
        resolve_roles(spec, ["user_id", "item_id", "scenario", "label", "timestamp"], where="f.parquet")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colums: {}\n", r"unknown key\(s\) \['colums'\]"),
        ("columns: {usr: a}\n", r"unknown role\(s\) \['usr'\]"),
        ("user: {categorical: [a]}\nitem: {numeric: [a]}\n", "declared twice"),
        ("item: {multi: [genres]}\n", "multi: expected a mapping"),
        ("user: {text: [bio]}\n", "text features belong to items"),
        ("user: {categorical: [label]}\n", "required role"),
    ],
)
def test_invalid_spec_files_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        SceneLogSpec.load(path)
    assert str(path) in str(e.value)


def test_list_columns_are_left_out_of_inference_with_a_note():
    import numpy as np

    sample = pd.DataFrame(
        {
            "user_id": ["a", "a", "b"],
            "item_id": ["1", "2", "3"],
            "scenario": "s",
            "label": 1,
            "timestamp": [1, 2, 3],
            "tags": [np.array(["x"]), np.array(["y"]), None],
        }
    )
    spec, notes = infer_spec(sample)
    assert "tags" not in spec.feature_columns()
    assert any(n.startswith("tags: left out (it holds lists or structs") for n in notes)
