"""The notes `msit data prepare` prints about what it changed or what the model will not know: time units
converted, near-duplicate scene names, scenes seen only outside training, users without a training event,
exact duplicate rows. Each is also kept in `feature_spec.json` (source.notes)."""

from __future__ import annotations

from collections.abc import Sequence

UNIT_NAMES = {"ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
UNIT_FROM = {"ms": "1e11", "us": "1e14", "ns": "1e17"}


def _rows(n: int) -> str:
    return f"{n:,} row{'s' if n != 1 else ''}"


def time_units(column: str, converted: dict[str, int]) -> list[str]:
    return [
        f"{column}: {_rows(n)} hold {UNIT_NAMES[unit]} since the epoch (numbers of {UNIT_FROM[unit]} or more); "
        "converted to seconds"
        for unit, n in sorted(converted.items())
    ]


def scenes(all_counts: dict[str, float], train_scenes: Sequence[str]) -> list[str]:
    """Scenes whose names differ only in case (kept apart), and scenes never seen in training."""
    notes = []
    by_folded: dict[str, list[str]] = {}
    for name in sorted(all_counts):
        by_folded.setdefault(name.casefold(), []).append(name)
    for names in by_folded.values():
        if len(names) > 1:
            notes.append(
                f"scenes {names} differ only in case; they are kept as {len(names)} scenes "
                "(rename them in the log if they are one)"
            )
    known = set(train_scenes)
    for name, n in sorted(all_counts.items()):
        if name not in known:
            notes.append(
                f"scene {name!r} appears only in val/test ({_rows(int(n))}): the model has not trained "
                "on it and scores it as an unknown scene"
            )
    return notes


def users_without_train(users: int, events: int, ratios: tuple[float, float, float]) -> list[str]:
    if not users:
        return []
    return [
        f"{users:,} user{'s have' if users != 1 else ' has'} too few events for the chronological split "
        f"{','.join(f'{r:g}' for r in ratios)} to leave one in train (2 or fewer at the default ratios): their "
        f"{events:,} events are all val/test, and the model sees these users as new (out-of-vocabulary)"
    ]


def duplicates(n: int) -> list[str]:
    if not n:
        return []
    return [
        f"{_rows(n)} exactly repeat{'s' if n == 1 else ''} an earlier row (every column msit reads, the file "
        "aside); they are kept"
    ]
