"""Output directories: staged, locked, and never deleting what msit did not write."""

import multiprocessing as mp
from pathlib import Path

import pytest

from msit.errors import ConfigError
from msit.output_dir import locked, writing


def _write(out: Path, text: str, marker: str = "done.json") -> None:
    with writing(out, marker=marker, overwrite=True) as staging:
        (staging / marker).write_text(text)


def test_written_output_appears_whole(tmp_path):
    out = tmp_path / "out"
    _write(out, "1")
    assert (out / "done.json").read_text() == "1"
    _write(out, "2")
    assert sorted(p.name for p in out.iterdir()) == ["done.json"]
    assert (out / "done.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name != ".out.lock"] == []


def test_failed_write_leaves_old_output(tmp_path):
    out = tmp_path / "out"
    _write(out, "old")
    with pytest.raises(ValueError), writing(out, marker="done.json", overwrite=True) as staging:
        (staging / "done.json").write_text("half")
        raise ValueError("boom")
    assert (out / "done.json").read_text() == "old"


def test_overwrite_refuses_foreign_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="not written by msit"), writing(out, marker="done.json", overwrite=True):
        pass
    with pytest.raises(ConfigError, match="pass --overwrite"), writing(out, marker="done.json"):
        pass
    assert (out / "precious.csv").exists()


def test_inputs_inside_output_refused(tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    log = out / "logs" / "a.csv"
    log.write_text("x\n")
    with pytest.raises(ConfigError, match="contains the input"), writing(out, marker="m", inputs=[str(log)]):
        pass
    with (
        pytest.raises(ConfigError, match="inside the input directory"),
        writing(tmp_path / "logs2" / "out", marker="m", inputs=[str(tmp_path)]),
    ):
        pass
    assert log.exists()


def _hold_lock(out: str, ready, release) -> None:
    with locked(Path(out)):
        ready.set()
        release.wait(10)


def test_second_writer_refused(tmp_path):
    out = tmp_path / "out"
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out), ready, release))
    holder.start()
    try:
        assert ready.wait(20)
        with pytest.raises(ConfigError, match="is being written by process"), locked(out):
            pass
    finally:
        release.set()
        holder.join(10)
    with locked(out):  # free again once the first writer is done
        pass
