"""The feature spec: what `msit data prepare` fitted, written beside the processed shards as
`feature_spec.json`. Training, evaluation and serving read it to size embeddings and to encode
new requests exactly as the training data was encoded."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from msit.data.schema import scene_id
from msit.data.vocab import Vocabulary
from msit.errors import MsitError

FEATURE_SPEC_FILE = "feature_spec.json"
FORMAT_VERSION = 1
SEQUENCES_DIR = "sequences"  # of a prepared directory: one row per user, the sequence as lists
LAYOUT_VERSION = 2  # of the prepared directory (msit.data.prepared); 1 copied a history onto every row


@dataclass
class FieldInfo:
    role: str  # "user" | "item" | "scene" | "context"
    type: str  # "id" | "categorical" | "numeric" | "multi" | "text"
    vocab_size: int | None = None
    mean: float | None = None  # numeric: training mean and std used to standardise
    std: float | None = None
    sep: str | None = None  # multi: separator in the raw data
    max_len: int | None = None  # multi: tokens kept per row

    @property
    def vocab(self) -> int:
        """`vocab_size` of a field that has one (id, categorical, multi)."""
        if self.vocab_size is None:
            raise ValueError(f"a {self.type} field has no vocabulary")
        return self.vocab_size

    @property
    def width(self) -> int:
        """`max_len` of a multi-valued field."""
        if self.max_len is None:
            raise ValueError(f"a {self.type} field has no max_len")
        return self.max_len


@dataclass
class FeatureSpec:
    scenarios: list[str]  # scene names, by slot: scene id `schema.scene_id(position)`
    fields: dict[str, FieldInfo]  # processed column -> what it holds
    vocabularies: dict[str, list[str]]  # vocab name -> values in index order (incl. <pad>, <oov>)
    row_counts: dict[str, Any]  # input, bad rows dropped per reason, train / val / test
    source: dict[str, Any] = field(default_factory=dict)  # inputs, the completed scene-log spec, options
    format_version: int = FORMAT_VERSION
    layout: int = LAYOUT_VERSION

    def vocabulary(self, name: str) -> Vocabulary:
        return Vocabulary(self.vocabularies[name])

    def scene_names(self) -> dict[int, str]:
        """Scene id -> scene name, for every known scene."""
        return {scene_id(slot): name for slot, name in enumerate(self.scenarios)}

    def scene_ids(self, names: list[str]) -> list[int]:
        """The scene ids of scene names; an unknown name is an error that lists the known ones."""
        unknown = [n for n in names if n not in self.scenarios]
        if unknown:
            raise MsitError(f"unknown scene(s) {unknown}; the data has {self.scenarios}")
        return [scene_id(self.scenarios.index(n)) for n in names]

    def fingerprint(self) -> str:
        """Identifies the encoding: two specs with one fingerprint map every raw value to the same index."""
        encoding = {"vocabularies": self.vocabularies, "fields": {k: asdict(v) for k, v in self.fields.items()}}
        return hashlib.sha256(json.dumps(encoding, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FEATURE_SPEC_FILE
        write_json_atomic(path, asdict(self))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> FeatureSpec:
        path = Path(directory)
        path = path / FEATURE_SPEC_FILE if path.is_dir() else path
        if not path.is_file():
            raise MsitError(f"no {FEATURE_SPEC_FILE} at {directory}: run `msit data prepare` first")
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise MsitError(
                f"{path}: feature spec format {data.get('format_version')} is not supported "
                f"(expected {FORMAT_VERSION}); re-run `msit data prepare`"
            )
        if data.get("layout", 1) != LAYOUT_VERSION:
            raise MsitError(
                f"{path}: written by an older msit (data layout {data.get('layout', 1)}, which copied a "
                f"history onto every row; this msit reads layout {LAYOUT_VERSION}): run `msit data "
                "prepare` on the logs again (and train again for a model directory)"
            )
        data["fields"] = {k: FieldInfo(**v) for k, v in data["fields"].items()}
        return cls(**data)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
