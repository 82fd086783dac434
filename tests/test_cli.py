"""The `msit` command line: help everywhere, one-line actionable errors, non-zero exit codes."""

import subprocess
import sys

import pandas as pd
import pytest

from msit.cli import main

COMMANDS = [
    [],
    ["demo"],
    ["train"],
    ["finetune"],
    ["tune"],
    ["serve"],
    ["report"],
    ["evaluate"],
    ["data"],
    ["data", "synth"],
    ["data", "prepare"],
    ["data", "movielens"],
    ["data", "infer-spec"],
    ["data", "embed-text"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "msit")
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: msit" in capsys.readouterr().out


def test_finetune_offers_every_mode():
    from msit.cli import FINETUNE_MODES
    from msit.training.finetune import MODES

    assert FINETUNE_MODES == MODES


def test_installed_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "msit.cli", "data", "--help"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "prepare" in out.stdout


def test_user_errors_exit_1_with_one_line(tmp_path, capsys):
    assert main(["data", "prepare", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o")]) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("msit: error: input not found:") and "missing.parquet" in last_line
    assert main(["data", "movielens", "--raw", str(tmp_path), "--protocol", "age", "--out", "x.csv"]) == 1
    assert "not a MovieLens-100K folder" in capsys.readouterr().err


def test_bad_option_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "x.csv", "--split-ratios", "0.8,0.2"])
    assert e.value.code == 2
    assert "expected three numbers" in capsys.readouterr().err


def test_prepare_has_no_history_length_any_more(capsys):
    """The window length is the model's (model.history_length in the train/tune YAML), cut per batch."""
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "x.csv", "--history-length", "20"])
    assert e.value.code == 2
    assert "unrecognized arguments: --history-length" in capsys.readouterr().err


def test_synth_then_infer_spec(tmp_path, capsys):
    assert (
        main(["data", "synth", "--users", "40", "--items", "60", "--out", str(tmp_path / "s"), "--format", "csv"]) == 0
    )
    assert len(pd.read_csv(tmp_path / "s" / "scene_log.csv")) > 40
    assert (tmp_path / "s" / "spec.yaml").is_file()
    capsys.readouterr()
    assert main(["data", "infer-spec", str(tmp_path / "s")]) == 0
    captured = capsys.readouterr()
    assert "columns:" in captured.out and "title" in captured.out
    assert "hour: left out" in captured.err
