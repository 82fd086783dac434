"""Writing an output directory without losing data: a lock against a second writer, a staging folder
renamed into place, and an `--overwrite` that only ever replaces what msit itself wrote.

    with writing(out, marker=FEATURE_SPEC_FILE, overwrite=cfg.overwrite, inputs=files) as staging:
        ...write everything under `staging`...
    # here `out` holds exactly what was written; on an error `out` is as it was before

Readers therefore see either the old directory or the new one, never half of one (PostgreSQL's
write-then-rename); the lock file beside `out` plays the part of `postmaster.pid`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from msit.errors import ConfigError


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_outside_inputs(out: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output directory that holds one of the inputs (replacing it would delete them) or lies
    inside an input directory (the next read of that directory would take the outputs for inputs)."""
    for item in inputs:
        text = str(item)
        if "://" in text:  # object storage: never under a local output directory
            continue
        path = Path(text)
        if _is_within(path, out):
            raise ConfigError(f"the output directory {out} contains the input {path}; write the output somewhere else")
        if path.is_dir() and _is_within(out, path):
            raise ConfigError(
                f"the output directory {out} lies inside the input directory {path}; write the output somewhere else"
            )


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """An exclusive lock on `out` (a lock file beside it) for as long as the block runs.
    A second writer gets a clear error at once instead of interleaving its files with ours."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.with_name(f".{out.name}.lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(
                f"{out} is being written by {holder}; wait for it to finish, or choose another output directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_replaceable(out: Path, marker: str, overwrite: bool) -> None:
    """An existing non-empty `out` is replaced only with `overwrite`, and only if msit wrote it
    (it holds `marker`): `--overwrite` never deletes a directory of someone else's files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    entries = [p.name for p in out.iterdir()]
    if not entries:
        return
    if not overwrite:
        raise ConfigError(f"output directory {out} is not empty; pass --overwrite to replace it")
    if marker not in entries:
        raise ConfigError(
            f"output directory {out} is not empty and was not written by msit (no {marker} in it); "
            f"--overwrite only replaces msit's own outputs: empty it yourself or choose another one"
        )


@contextmanager
def writing(out: str | Path, marker: str, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Lock `out`, yield a fresh staging folder beside it, and on success swap it into place.

    `marker` is a file every complete output holds (`feature_spec.json`, `model.json`); it is how an
    existing directory is recognised as msit's own."""
    out = Path(out)
    check_outside_inputs(out, inputs)
    with locked(out):
        check_replaceable(out, marker, overwrite)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
        try:
            yield staging
            if not (staging / marker).exists():
                raise RuntimeError(f"internal error: the output written to {staging} lacks {marker}")
            replace_dir(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def replace_dir(staging: Path, out: Path) -> None:
    """Move `staging` to `out`; an existing `out` is moved aside first and removed only after the swap."""
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
