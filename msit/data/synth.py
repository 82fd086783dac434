"""`msit data synth`: a seeded synthetic scene log of any size, the default data of every command.

The ground truth is built so that interest transfer matters:
- every user has a latent interest vector per scene, `z_us = m_us + shift_s + noise_us`: the scenes' parts
  `m_us` are drawn correlated, corr(m_us, m_ut) = relatedness[s, t] = r^|s - t| for `scene_relatedness` r (a
  chain: neighbouring scenes share a user's interest closely, distant ones barely; r = 1 is one interest shared
  by every scene), plus a per-scene shift of everyone's taste and a little noise of the user's own;
- items belong to one scene and one category; an item's vector is its category's centroid plus
  noise, and its title names the category, so text features carry signal too;
- P(label = 1) = sigmoid(sharpness * <z_us, v_i> / sqrt(d) + item bias + scene bias + context);
- the last scene is deliberately sparse (a small share of events);
- with `scene_focus` a > 0, each user spreads their events over the scenes by weights of their own (the
  scenes' shares times Gamma(a) draws: small a, few scenes per user), so that many users have little or
  nothing in some scene and its prediction must come from the others, as on real products.
A user's behaviour in the other scenes therefore reveals `z_u` long before the sparse scene's own
few events do: a model that reads cross-scene behaviour must beat one that sees only the
target scene (tests/test_synth.py checks this on the generated data itself).

Output: Parquet shards (or one CSV) with `user_id, item_id, scenario, label, timestamp`, user
features `age_band, region`, item features `category, price, tags, title`, context `hour, device`,
and `spec.yaml` declaring those roles for `msit data prepare --spec`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from msit.errors import ConfigError
from msit.output_dir import writing

SYNTH_INFO = "synth.json"  # written last: marks a directory as a complete synthetic log
SCENE_NAMES = ["home_feed", "search", "shop", "video", "live", "music", "news", "games"]
CATEGORY_NAMES = [
    "sports",
    "cooking",
    "travel",
    "music",
    "science",
    "fashion",
    "gaming",
    "finance",
    "comedy",
    "nature",
    "history",
    "art",
    "cars",
    "health",
    "movies",
    "books",
]
ADJECTIVES = ["quiet", "bright", "wild", "golden", "hidden", "rapid", "gentle", "bold", "classic", "urban"]
NOUNS = ["guide", "stories", "journey", "secrets", "moments", "lab", "show", "picks", "challenge", "diary"]

SPEC = {
    "user": {"categorical": ["age_band", "region"]},
    "item": {"categorical": ["category"], "numeric": ["price"], "multi": {"tags": "|"}, "text": ["title"]},
    "context": {"categorical": ["hour", "device"]},
}


@dataclass
class SynthConfig:
    users: int = 2000
    items: int = 1500
    scenes: int = 4
    categories: int = 12
    events_per_user: float = 40.0
    sparse_scene_share: float = 0.04  # share of events in the last scene
    latent_dim: int = 8
    scene_shift: float = 0.6  # size of the per-scene shift of every user's interest
    scene_relatedness: float = 1.0  # r: how closely scenes s and t share a user's interest is r^|s - t|
    scene_focus: float = 0.0  # a: each user's scene weights are Gamma(a) draws (0: every user follows the shares)
    sharpness: float = 2.5  # how strongly interest decides the label
    seed: int = 0
    users_per_shard: int = 50_000
    start_time: int = 1_700_000_000

    def __post_init__(self) -> None:
        if not 2 <= self.scenes <= len(SCENE_NAMES):
            raise ConfigError(f"scenes must be between 2 and {len(SCENE_NAMES)}, got {self.scenes}")
        if not 1 <= self.categories <= len(CATEGORY_NAMES):
            raise ConfigError(f"categories must be between 1 and {len(CATEGORY_NAMES)}, got {self.categories}")
        if self.users < 1 or self.items < self.scenes:
            raise ConfigError(f"need at least 1 user and one item per scene (users={self.users}, items={self.items})")
        if not 0 < self.sparse_scene_share < 1:
            raise ConfigError(f"sparse_scene_share must be in (0, 1), got {self.sparse_scene_share}")
        if not 0 <= self.scene_relatedness <= 1:
            raise ConfigError(f"scene_relatedness must be in [0, 1], got {self.scene_relatedness}")
        if self.scene_focus < 0:
            raise ConfigError(f"scene_focus must be >= 0, got {self.scene_focus}")
        if self.events_per_user < 1:
            raise ConfigError(f"events_per_user must be at least 1, got {self.events_per_user}")


def relatedness(r: float, scenes: int) -> np.ndarray:
    """The ground truth's scene relatedness: (scenes, scenes), r^|s - t| (positive semi-definite for r in [0, 1])."""
    positions = np.arange(scenes)
    return r ** np.abs(positions[:, None] - positions[None, :]).astype(float)


class _World:
    """The latent ground truth shared by every shard: scenes, categories, items."""

    def __init__(self, cfg: SynthConfig):
        rng = np.random.default_rng(cfg.seed)
        d, k = cfg.latent_dim, cfg.scenes
        self.scene_names = SCENE_NAMES[:k]
        self.relatedness = relatedness(cfg.scene_relatedness, k)
        values, vectors = np.linalg.eigh(self.relatedness)
        self.mixing = vectors * np.sqrt(values.clip(min=0)) @ vectors.T  # its square root: mixing @ mixing.T = it
        self.scene_shift = rng.normal(0, cfg.scene_shift, (k, d))
        self.scene_bias = rng.normal(0, 0.3, k)
        centroids = rng.normal(0, 1, (cfg.categories, d))
        # Items: the sparse scene gets a smaller catalogue, like a young tab of a product.
        weights = np.full(k, 1.0)
        weights[-1] = 0.5
        self.item_scene = np.sort(rng.choice(k, cfg.items, p=weights / weights.sum()))
        self.item_scene[:k] = np.arange(k)  # every scene has at least one item
        self.item_scene.sort()
        self.item_category = rng.integers(0, cfg.categories, cfg.items)
        self.item_vec = centroids[self.item_category] + 0.6 * rng.normal(0, 1, (cfg.items, d))
        self.item_bias = rng.normal(0, 0.4, cfg.items)
        self.item_price = np.round(np.exp(rng.normal(3, 0.8, cfg.items)), 2)
        second = rng.integers(0, cfg.categories, cfg.items)
        self.item_tags = [
            f"{CATEGORY_NAMES[a]}|{CATEGORY_NAMES[b]}" if a != b else CATEGORY_NAMES[a]
            for a, b in zip(self.item_category, second, strict=True)
        ]
        self.item_title = [
            f"{ADJECTIVES[a].title()} {CATEGORY_NAMES[c]} {NOUNS[n]} #{i}"
            for i, (a, c, n) in enumerate(
                zip(
                    rng.integers(0, len(ADJECTIVES), cfg.items),
                    self.item_category,
                    rng.integers(0, len(NOUNS), cfg.items),
                    strict=True,
                )
            )
        ]
        self.scene_items = [np.flatnonzero(self.item_scene == s) for s in range(k)]
        share = np.full(k, (1 - cfg.sparse_scene_share) / (k - 1))
        share[-1] = cfg.sparse_scene_share
        self.scene_share = share


def _shard(cfg: SynthConfig, world: _World, first_user: int, n_users: int) -> pd.DataFrame:
    rng = np.random.default_rng([cfg.seed, first_user])
    d, k = cfg.latent_dim, cfg.scenes
    if cfg.scene_relatedness == 1:  # one interest for every scene: drawn as before relatedness existed (same logs)
        shared = rng.normal(0, 1, (n_users, d))[:, None, :]
    else:  # correlated across scenes as world.relatedness says
        shared = np.einsum("st,utd->usd", world.mixing, rng.normal(0, 1, (n_users, k, d)))
    z_scene = shared + world.scene_shift[None] + 0.3 * rng.normal(0, 1, (n_users, k, d))
    age_band = rng.choice(["18-24", "25-34", "35-44", "45+"], n_users, p=[0.3, 0.35, 0.2, 0.15])
    region = rng.choice(["north", "south", "east", "west"], n_users)
    mobile_share = rng.uniform(0.2, 0.9, n_users)

    n_events = 1 + rng.poisson(cfg.events_per_user - 1, n_users)
    user = np.repeat(np.arange(n_users), n_events)
    rows = len(user)
    if cfg.scene_focus == 0:  # the same draws as before scene_focus existed (same logs)
        scene = rng.choice(k, rows, p=world.scene_share)
    else:  # each user's own scene weights, sampled per event by inverting the user's cumulative shares
        weights = world.scene_share * rng.gamma(cfg.scene_focus, 1.0, (n_users, k)) + 1e-12
        cumulative = np.cumsum(weights / weights.sum(1, keepdims=True), axis=1)
        scene = (rng.random(rows)[:, None] > cumulative[user]).sum(1).clip(max=k - 1)
    counts = np.array([len(items) for items in world.scene_items])
    pick = (rng.random(rows) * counts[scene]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    item = np.concatenate(world.scene_items)[offsets[scene] + pick]

    # Time: each user starts somewhere in a 30-day window; gaps are exponential, often within seconds.
    gaps = np.round(rng.exponential(3600.0, rows)).astype(np.int64)
    starts = np.cumsum(n_events) - n_events
    elapsed = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[starts] - gaps[starts], n_events)
    timestamp = cfg.start_time + np.repeat(rng.integers(0, 30 * 86400, n_users), n_events) + elapsed
    hour = (timestamp // 3600) % 24
    device = np.where(rng.random(rows) < mobile_share[user], "mobile", "desktop")

    affinity = np.einsum("rd,rd->r", z_scene[user, scene], world.item_vec[item]) / np.sqrt(d)
    logit = (
        cfg.sharpness * affinity + world.item_bias[item] + world.scene_bias[scene] + 0.2 * (device == "mobile") - 0.3
    )
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)

    return pd.DataFrame(
        {
            "user_id": first_user + user,
            "item_id": item,
            "scenario": np.array(world.scene_names)[scene],
            "label": label,
            "timestamp": timestamp,
            "age_band": age_band[user],
            "region": region[user],
            "category": np.array(CATEGORY_NAMES)[world.item_category[item]],
            "price": world.item_price[item],
            "tags": np.array(world.item_tags, dtype=object)[item],
            "title": np.array(world.item_title, dtype=object)[item],
            "hour": hour,
            "device": device,
        }
    )


def generate(cfg: SynthConfig) -> pd.DataFrame:
    """The whole log in memory (for tests and small sizes)."""
    world = _World(cfg)
    return pd.concat(
        [
            _shard(cfg, world, s, min(cfg.users_per_shard, cfg.users - s))
            for s in range(0, cfg.users, cfg.users_per_shard)
        ],
        ignore_index=True,
    )


def write(cfg: SynthConfig, out: str | Path, fmt: str = "parquet", progress: bool = True) -> dict:
    """Write the log as Parquet shards (or one CSV) plus spec.yaml and synth.json into `out`. An earlier
    synthetic log there is replaced whole (no stale shards of a larger log stay behind); a directory of
    anything else is refused (msit.output_dir)."""
    if fmt not in ("parquet", "csv"):
        raise ConfigError(f"format must be parquet or csv, got {fmt!r}")
    world = _World(cfg)
    firsts = range(0, cfg.users, cfg.users_per_shard)
    rows = 0
    with writing(out, marker=SYNTH_INFO, overwrite=True) as staging:
        for i, first in enumerate(tqdm(firsts, desc="synth shards", unit="shard", disable=not progress)):
            shard = _shard(cfg, world, first, min(cfg.users_per_shard, cfg.users - first))
            rows += len(shard)
            if fmt == "parquet":
                shard.to_parquet(staging / f"part-{i:05d}.parquet", index=False)
            else:
                shard.to_csv(staging / "scene_log.csv", index=False, mode="a" if i else "w", header=not i)
        (staging / "spec.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
        info = {
            "rows": rows,
            "config": asdict(cfg),
            "scenes": world.scene_names,
            "sparse_scene": world.scene_names[-1],
            "scene_relatedness": world.relatedness.round(6).tolist(),  # the ground truth the heat map should show
        }
        (staging / SYNTH_INFO).write_text(json.dumps(info, indent=1))
    return info
