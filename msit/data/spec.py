"""The scene-log spec: which of the user's columns play which role.

A scene log has five required columns (`user_id, item_id, scenario, label, timestamp`), an
optional `split` column, and optional side features of the user, the item and the scene
context. A small YAML file maps the user's column names onto these roles:

    columns: {user_id: User_ID, scenario: Category}   # only where names differ
    user: {categorical: [gender, occupation], numeric: [age]}
    item: {categorical: [brand], numeric: [price], multi: {genres: "|"}, text: [title]}
    context: {categorical: [hour, device]}

Anything left out is inferred from a sample of the data (`infer_spec`). Context features
are never inferred: a column that varies per event may be an outcome (a rating, a dwell
time) that would leak the label, so it must be declared on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from msit.config import from_dict, load_yaml
from msit.errors import DataValidationError

REQUIRED = ("user_id", "item_id", "scenario", "label", "timestamp")
OPTIONAL = ("split",)

# Column names recognised for each role when the spec does not say (compared case-insensitively).
ALIASES: dict[str, tuple[str, ...]] = {
    "user_id": ("user_id", "userid", "user", "uid", "customer_id"),
    "item_id": ("item_id", "itemid", "item", "iid", "product_id", "movie_id", "video_id"),
    "scenario": ("scenario", "scene", "scenario_id", "scene_id", "domain", "channel"),
    "label": ("label", "click", "clicked", "is_click", "target", "y"),
    "timestamp": ("timestamp", "ts", "time", "event_time", "datetime"),
    "split": ("split",),
}

FEATURE_TYPES = ("categorical", "numeric", "multi", "text")


@dataclass
class FeatureGroup:
    """Side features of one kind of entity (user, item or scene context)."""

    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    multi: dict[str, str] = field(default_factory=dict)  # column -> separator, e.g. {"genres": "|"}
    text: list[str] = field(default_factory=list)

    def columns(self) -> list[str]:
        return [*self.categorical, *self.numeric, *self.multi, *self.text]


@dataclass
class SceneLogSpec:
    columns: dict[str, str] = field(default_factory=dict)  # role -> the user's column name
    user: FeatureGroup = field(default_factory=FeatureGroup)
    item: FeatureGroup = field(default_factory=FeatureGroup)
    context: FeatureGroup = field(default_factory=FeatureGroup)
    scene_descriptions: dict[str, str] = field(default_factory=dict)  # scene -> text, for text features

    def __post_init__(self) -> None:
        if not isinstance(self.columns, dict) or not all(isinstance(v, str) for v in self.columns.values()):
            raise ValueError(f"columns: expected a mapping of role -> column name, got {self.columns!r}")
        unknown = sorted(set(self.columns) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise ValueError(f"columns: unknown role(s) {unknown}; roles are {[*REQUIRED, *OPTIONAL]}")
        for name, group in self.groups().items():
            if not isinstance(group.multi, dict):
                raise ValueError(f"{name}.multi: expected a mapping of column -> separator, e.g. {{genres: '|'}}")
            for kind in FEATURE_TYPES:
                value = getattr(group, kind)
                if not isinstance(value, list | dict) or not all(isinstance(c, str) for c in value):
                    raise ValueError(f"{name}.{kind}: expected a list of column names, got {value!r}")
        if self.user.text or self.context.text:
            raise ValueError("text features belong to items (item.text); scenes use scene_descriptions")
        seen: dict[str, str] = {}
        for name, group in self.groups().items():
            for col in group.columns():
                if col in seen:
                    raise ValueError(f"column {col!r} is declared twice ({seen[col]} and {name})")
                if col in REQUIRED or col in OPTIONAL or col in self.columns.values():
                    raise ValueError(f"column {col!r} is a required role and cannot also be a feature")
                seen[col] = name

    def groups(self) -> dict[str, FeatureGroup]:
        return {"user": self.user, "item": self.item, "context": self.context}

    def feature_columns(self) -> list[str]:
        return [c for g in self.groups().values() for c in g.columns()]

    @classmethod
    def load(cls, path: str) -> SceneLogSpec:
        return from_dict(cls, load_yaml(path), where=str(path))

    def to_dict(self) -> dict:
        out: dict = {"columns": dict(self.columns)}
        for name, group in self.groups().items():
            g = {k: getattr(group, k) for k in FEATURE_TYPES if getattr(group, k)}
            if g:
                out[name] = g
        if self.scene_descriptions:
            out["scene_descriptions"] = dict(self.scene_descriptions)
        return out


def resolve_roles(spec: SceneLogSpec, available: list[str], where: str) -> dict[str, str]:
    """Fill in the role -> column mapping from `available` column names; error on a missing one."""
    lower = {c.lower(): c for c in available}
    roles = {}
    for role in (*REQUIRED, *OPTIONAL):
        if role in spec.columns:
            col = spec.columns[role]
            if col not in available:
                raise DataValidationError(
                    f"{where}: missing column {col!r} (the spec maps {role} -> {col!r}); columns present: {available}"
                )
            roles[role] = col
            continue
        match = next((lower[a] for a in ALIASES[role] if a in lower), None)
        if match is not None:
            roles[role] = match
        elif role in REQUIRED:
            raise DataValidationError(
                f"{where}: missing required column {role!r} (looked for {list(ALIASES[role])}); "
                f"columns present: {available}. Map it in the spec: columns: {{{role}: YOUR_COLUMN}}"
            )
    return roles


def infer_spec(
    sample: pd.DataFrame, spec: SceneLogSpec | None = None, where: str = "input"
) -> tuple[SceneLogSpec, list[str]]:
    """Complete `spec` from a data sample. Returns the spec and notes on what was left out and why.

    Required roles come from the spec or the aliases. Side features are inferred only when the
    spec declares none: a column constant per user is a user feature, constant per item an item
    feature; anything else is left out (see the module docstring).
    """
    spec = spec or SceneLogSpec()
    roles = resolve_roles(spec, list(sample.columns), where)
    columns = dict(roles)
    if spec.feature_columns():
        return SceneLogSpec(
            columns=columns,
            user=spec.user,
            item=spec.item,
            context=spec.context,
            scene_descriptions=spec.scene_descriptions,
        ), []

    user, item, notes = FeatureGroup(), FeatureGroup(), []
    users, items = sample[roles["user_id"]], sample[roles["item_id"]]
    for col in sample.columns:
        if col in roles.values() or col == "path":
            continue
        values = sample[col]
        if (
            values.dtype == object
            and values.map(lambda v: not isinstance(v, str | bytes | int | float | bool) and v is not None).any()
        ):
            notes.append(f"{col}: left out (it holds lists or structs; declare a list column under multi: to use it)")
            continue
        if values.nunique(dropna=True) <= 1:
            notes.append(f"{col}: left out (a single value in the sample)")
            continue
        if _constant_within(values, users):
            group = user
        elif _constant_within(values, items):
            group = item
        else:
            notes.append(
                f"{col}: left out (varies per event; declare it under context: if it is known "
                "before the event and is not an outcome)"
            )
            continue
        kind = _feature_type(values, is_item=group is item)
        if kind == "multi":
            group.multi[col] = "|"
        else:
            getattr(group, kind).append(col)
    return SceneLogSpec(columns=columns, user=user, item=item), notes


def _constant_within(values: pd.Series, keys: pd.Series) -> bool:
    """True if `values` hardly ever changes within a key (>= 99% of keys with 2+ rows)."""
    per_key = values.groupby(keys, sort=False).nunique(dropna=False)
    sizes = keys.value_counts(sort=False)
    multi = per_key[sizes.reindex(per_key.index) >= 2]
    return len(multi) > 0 and float((multi <= 1).mean()) >= 0.99


def _feature_type(values: pd.Series, is_item: bool) -> str:
    non_null = values.dropna()
    if pd.api.types.is_bool_dtype(non_null):
        return "categorical"
    if pd.api.types.is_integer_dtype(non_null):
        return "categorical" if non_null.nunique() <= 50 else "numeric"
    if pd.api.types.is_float_dtype(non_null):
        return "numeric"
    text = non_null.astype(str)
    if text.str.contains("|", regex=False).mean() >= 0.05:
        return "multi"
    words = text.str.count(" ") + 1
    # Free text: long, several words, and far too many distinct values to be a category.
    if is_item and text.str.len().mean() >= 12 and words.mean() >= 2 and text.nunique() > 50:
        return "text"
    return "categorical"
