"""A damaged model directory is one line naming the file and what is wrong, wherever it is read; exporting
never deletes files msit did not write. No Ray here but the `msit evaluate` cases, which read prepared data."""

import json
import re
import shutil

import pyarrow.parquet as pq
import pytest

from msit.cli import main
from msit.errors import ConfigError, MsitError
from msit.model import ModelConfig, build_for_data, build_model
from msit.model.model_dir import load_model_config, load_model_dir, save_model_dir
from tests.model_helpers import item_table, tiny_spec

CONFIG = ModelConfig(embed_dim=16, mlp_dims=(16,))


@pytest.fixture
def model_dir(tmp_path):
    spec = tiny_spec()
    return save_model_dir(tmp_path / "model", build_model(CONFIG, spec, item_table()), CONFIG, spec)


def _edit_meta(model_dir, edit):
    meta = json.loads((model_dir / "model.json").read_text())
    edit(meta)
    (model_dir / "model.json").write_text(json.dumps(meta))


def _fails_everywhere(model_dir, message, capsys, config_too=True):
    """load_model_dir, load_model_config (if the damage is in model.json) and `msit evaluate` all say `message`."""
    with pytest.raises(MsitError, match=message):
        load_model_dir(model_dir)
    if config_too:
        with pytest.raises(MsitError, match=message):
            load_model_config(model_dir)
    assert main(["evaluate", "--model", str(model_dir), "--data", str(model_dir.parent)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("msit: error: ")
    assert re.search(message, err)


def test_a_truncated_weights_file_is_one_line(model_dir, capsys):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _fails_everywhere(
        model_dir, r"model\.safetensors is not a readable safetensors file .*truncated", capsys, config_too=False
    )


def test_a_weights_file_of_random_bytes_is_one_line(model_dir, capsys):
    (model_dir / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    _fails_everywhere(model_dir, r"model\.safetensors is not a readable safetensors file", capsys, config_too=False)


def test_model_json_that_does_not_parse_is_one_line(model_dir, capsys):
    (model_dir / "model.json").write_text('{"format_version": 1, "model": {')
    _fails_everywhere(model_dir, r"model\.json is not valid JSON", capsys)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("model"), r"model\.json: missing key 'model'"),
        (lambda m: m.update(model=[16]), r"model\.json: 'model' must be a JSON object, got list"),
        (lambda m: m.update(format_version=7), r"model\.json: model format 7 is not supported"),
        (lambda m: m["model"].update(embed_dim="16"), r"model\.json: model\.embed_dim: expected int, got '16'"),
        (lambda m: m["model"].update(mlp_dims="wide"), r"model\.json: model\.mlp_dims: expected tuple\[int, \.\.\.\]"),
        (lambda m: m["model"].update(dropout=None), r"model\.json: model\.dropout: expected float, got None"),
        (
            lambda m: m["model"].update(history_length=None),
            r"model\.json: model\.history_length: expected int, got None",
        ),
        (lambda m: m["model"].update(width=3), r"model\.json: model: unknown key\(s\) \['width'\]"),
    ],
)
def test_a_bad_model_json_names_the_file_and_the_key(model_dir, capsys, edit, message):
    _edit_meta(model_dir, edit)
    _fails_everywhere(model_dir, message, capsys)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"feature_spec\.json is not a valid feature spec \(Expecting property name"),
        (
            '{"format_version": 1, "layout": 2, "fields": {}}',
            r"feature_spec\.json is not a valid feature spec .*missing",
        ),
        (
            '{"format_version": 1, "layout": 2, "fields": {"user_id": {"rol": "user"}}}',
            r"feature_spec\.json is not a valid feature spec .*unexpected keyword argument 'rol'",
        ),
        (
            '{"format_version": 1, "fields": {}, "history_length": 50}',  # a model trained before issue 14
            r"feature_spec\.json: written by an older msit \(data layout 1.*train again for a model directory",
        ),
    ],
)
def test_a_feature_spec_that_does_not_parse_is_one_line(model_dir, capsys, text, message):
    (model_dir / "feature_spec.json").write_text(text)
    _fails_everywhere(model_dir, message, capsys, config_too=False)


def test_weights_of_other_shapes_than_the_config_name_the_tensors(model_dir, capsys):
    _edit_meta(model_dir, lambda m: m["model"].update(embed_dim=8))  # a valid config, but not these weights'
    _fails_everywhere(
        model_dir,
        r"model\.safetensors does not match the model config beside it \(model\.json\): "
        r"shape of \S+ \(\d+, 16\) \(the config builds \(\d+, 8\)\)",
        capsys,
        config_too=False,
    )
    _edit_meta(model_dir, lambda m: m["model"].update(embed_dim=16, family="mmoe"))
    _fails_everywhere(
        model_dir, r"does not match the model config beside it \(model\.json\): missing \[", capsys, config_too=False
    )


def test_export_never_deletes_files_it_did_not_write(tmp_path):
    spec = tiny_spec()
    model = build_model(CONFIG, spec, item_table())
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match=r"notes is not empty and was not written by msit \(no model\.json"):
        save_model_dir(mine, model, CONFIG, spec)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        save_model_dir(tmp_path / "file", model, CONFIG, spec)
    assert (tmp_path / "file").read_text() == "x"

    (tmp_path / "empty").mkdir()  # an empty directory and an existing model directory are replaced
    for target in (tmp_path / "empty", tmp_path / "empty"):
        save_model_dir(target, model, CONFIG, spec)
        assert sorted(p.name for p in target.iterdir()) == ["feature_spec.json", "model.json", "model.safetensors"]
    # Nothing is left beside it but the lock file: no staging or old copies.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".empty.lock",
        ".file.lock",
        ".notes.lock",
        "empty",
        "file",
        "notes",
    ]


@pytest.fixture
def prepared_copy(small_prepared, tmp_path):
    _, prepared = small_prepared
    return shutil.copytree(prepared, tmp_path / "prepared")


def _rewrite_split(prepared, split, edit):
    path = prepared / split
    table = pq.read_table(path)
    shutil.rmtree(path)
    path.mkdir()
    pq.write_table(edit(table), path / "part-0.parquet")


def test_evaluate_on_data_of_other_shapes_names_the_mismatch(small_model, prepared_copy, capsys):
    model, _ = small_model
    evaluate = ["evaluate", "--model", str(model), "--data", str(prepared_copy), "--split", "val"]

    _rewrite_split(prepared_copy, "val", lambda t: t.drop_columns(["position"]))  # the feature spec copied over
    assert main(evaluate) == 1
    err = capsys.readouterr().err
    assert "lacks column(s) ['position'] that the model's feature spec needs" in err and err.count("\n") == 1

    (prepared_copy / "val" / "part-0.parquet").write_bytes(b"PAR1 not parquet")
    assert main(evaluate) == 1
    assert "the split's Parquet shards cannot be read" in capsys.readouterr().err


def test_evaluate_without_the_sequences_says_so(small_model, prepared_copy, capsys):
    model, _ = small_model
    shutil.rmtree(prepared_copy / "sequences")
    assert main(["evaluate", "--model", str(model), "--data", str(prepared_copy)]) == 1
    err = capsys.readouterr().err
    assert "no sequences/ at" in err and err.count("\n") == 1


def test_a_model_of_another_history_length_evaluates_the_same_prepared_data(small_model, tmp_path, capsys):
    """The history length is the model's: no prepare again, and no encoding mismatch (the fingerprint has none)."""
    model_dir, prepared = small_model
    spec = load_model_dir(model_dir).spec
    config = ModelConfig(embed_dim=8, mlp_dims=(8,), history_length=25)
    longer = save_model_dir(tmp_path / "longer", build_for_data(config, prepared, spec), config, spec)
    assert load_model_config(longer).history_length == 25 != load_model_config(model_dir).history_length
    for directory in (model_dir, longer):
        out = tmp_path / f"{directory.name}.json"
        assert main(["evaluate", "--model", str(directory), "--data", str(prepared), "--json", str(out)]) == 0, (
            capsys.readouterr().err
        )
        assert json.loads(out.read_text())["overall"]["rows"] == spec.row_counts["test"]
