"""`msit data movielens`: the raw MovieLens-100K files (u.data, u.user, u.item, u.genre) as a
multi-scenario scene log, following the two protocols of the shared benchmark data exactly.

- `age`: the scene is the user's age band (age_under_25, age_25_34, age_35_plus).
- `genre`: the scene is the movie's genre family (drama, light, thrill): the family holding
  most of the movie's genres; a tie goes to the earlier family in that order.
label = rating >= 4. split: per user, events sorted by (timestamp, item_id); k = max(1, round(0.1 n))
(half to even); the newest k are test, the k before them val, the rest train.
Rows are ordered by (user_id, timestamp, item_id).

MovieLens is for research use only and may not be redistributed: msit converts a copy the user
downloaded, it never ships one.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from msit.errors import DataValidationError

GENRE_SCENES = {
    "drama": ["Drama", "Documentary", "War", "Film-Noir", "unknown"],
    "light": ["Comedy", "Romance", "Children's", "Animation", "Musical", "Fantasy"],
    "thrill": ["Action", "Adventure", "Sci-Fi", "Thriller", "Crime", "Horror", "Mystery", "Western"],
}
PROTOCOLS = ("age", "genre")
COLUMNS = [
    "user_id",
    "item_id",
    "scenario",
    "label",
    "rating",
    "timestamp",
    "split",
    "age",
    "gender",
    "occupation",
    "zip",
    "title",
    "genres",
    "release_year",
]
RAW_FILES = ("u.data", "u.user", "u.item", "u.genre")


def age_scene(age: int) -> str:
    return "age_under_25" if age < 25 else ("age_25_34" if age < 35 else "age_35_plus")


def genre_scene(genres: str) -> str:
    present = set(genres.split("|"))
    order = list(GENRE_SCENES)
    return max(order, key=lambda s: (len(present & set(GENRE_SCENES[s])), -order.index(s)))


def _read_raw(raw: Path) -> pd.DataFrame:
    missing = [f for f in RAW_FILES if not (raw / f).is_file()]
    if missing:
        raise DataValidationError(f"{raw}: not a MovieLens-100K folder, missing {missing}")
    genre_names = [line.split("|")[0] for line in (raw / "u.genre").read_text().splitlines() if line.strip()]
    items = pd.read_csv(raw / "u.item", sep="|", header=None, encoding="latin-1")
    items.columns = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *genre_names]
    flags = items[genre_names].to_numpy() == 1
    items["genres"] = ["|".join(g for g, on in zip(genre_names, row, strict=True) if on) for row in flags]
    year = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    items["release_year"] = year.fillna(0).astype(int)
    users = pd.read_csv(
        raw / "u.user",
        sep="|",
        header=None,
        names=["user_id", "age", "gender", "occupation", "zip"],
        dtype={"zip": str},
    )
    ratings = pd.read_csv(raw / "u.data", sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"])
    return ratings.merge(users, on="user_id").merge(items[["item_id", "title", "genres", "release_year"]], on="item_id")


def _split(df: pd.DataFrame) -> pd.Series:
    """Assumes df is sorted by (user_id, timestamp, item_id)."""
    position = df.groupby("user_id").cumcount()
    n = df.groupby("user_id")["item_id"].transform("size")
    k = (n * 0.1).round().clip(lower=1).astype(int)
    split = pd.Series("train", index=df.index)
    split[position >= n - 2 * k] = "val"
    split[position >= n - k] = "test"
    return split


def convert(raw: str | Path, protocol: str) -> pd.DataFrame:
    if protocol not in PROTOCOLS:
        raise DataValidationError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    df = _read_raw(Path(raw)).sort_values(["user_id", "timestamp", "item_id"], kind="mergesort")
    df = df.reset_index(drop=True)
    df["label"] = (df["rating"] >= 4).astype(int)
    df["split"] = _split(df)
    scene = df["age"].map(age_scene) if protocol == "age" else df["genres"].map(genre_scene)
    return df.assign(scenario=scene)[COLUMNS]


def write(raw: str | Path, protocol: str, out: str | Path) -> int:
    df = convert(raw, protocol)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    else:
        df.to_csv(out, index=False)
    return len(df)
