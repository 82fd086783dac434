"""The one config system: small dataclasses filled from YAML (or dicts) with strict keys.

Every config in msit is a dataclass. `from_dict` fills one from plain data, recursing into
nested dataclass fields, and refuses unknown keys with a message that names the file and key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from msit.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _dataclass_type(tp: Any) -> type[DataclassInstance] | None:
    """The dataclass inside `tp` (also `X | None`), or None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                return arg
    return None


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass `cls` from `data`; `where` prefixes error messages (a file and key path)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {names}")
    kwargs = {}
    for name, value in data.items():
        nested = _dataclass_type(hints[name])
        kwargs[name] = from_dict(nested, value, f"{where}.{name}") if nested and value is not None else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def absolute_path(path: str) -> str:
    """Local paths made absolute (Ray workers and replicas run in another working directory); URIs unchanged."""
    return path if "://" in path else str(Path(path).resolve())
