"""The synthetic generator: seeded, sized as asked, and with cross-scene signal as its ground truth."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from msit.data import synth
from msit.errors import ConfigError
from tests.reference_histories import add_histories


@pytest.fixture(scope="module")
def log():
    return synth.generate(synth.SynthConfig(users=1500, items=800, seed=3))


def test_same_seed_same_log_and_another_seed_differs():
    cfg = synth.SynthConfig(users=50, items=100, seed=7)
    pd.testing.assert_frame_equal(synth.generate(cfg), synth.generate(cfg))
    assert not synth.generate(synth.SynthConfig(users=50, items=100, seed=8)).equals(synth.generate(cfg))


def test_shape_scenes_and_the_sparse_scene(log):
    assert log.user_id.nunique() == 1500
    assert set(log.scenario) == {"home_feed", "search", "shop", "video"}
    share = (log.scenario == "video").mean()
    assert 0.02 < share < 0.06  # the sparse scene
    assert set(log.label.unique()) == {0, 1}
    assert log.groupby("user_id").timestamp.apply(lambda t: t.is_monotonic_increasing).all()
    assert (log.groupby("item_id").scenario.nunique() == 1).all()


def test_sharding_gives_the_same_log_as_one_shard():
    one = synth.generate(synth.SynthConfig(users=30, items=50, seed=2, users_per_shard=30))
    assert len(one) > 0 and one.user_id.max() == 29


def _auc(scores, labels):
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


def _ground_truth_scorer(log: pd.DataFrame, cfg: synth.SynthConfig):
    """Score each event of the sparse scene by how the user responded to items like it before, from the history
    positions a `weights(history_scenes)` function weighs (the generator's own item vectors: its ground truth)."""
    world = synth._World(cfg)
    df = log.assign(
        user_key=log.user_id.astype(str),
        item_key=log.item_id.astype(str),
        scene_id=log.scenario.map({s: i for i, s in enumerate(world.scene_names)}),
    )
    events = add_histories(
        {c: df[c].to_numpy() for c in ["user_key", "item_key", "item_id", "scene_id", "label", "timestamp"]},
        history_length=50,
    )
    vec = world.item_vec
    sparse = len(world.scene_names) - 1
    target = events["scene_id"] == sparse
    hist_items, hist_scenes = events["history_item_ids"][target], events["history_scene_ids"][target]
    signs = np.where(events["history_labels"][target] == 1, 1.0, -1.0) * (
        np.arange(50) < events["history_length"][target][:, None]
    )
    target_vec, labels = vec[events["item_id"][target]], events["label"][target]

    def auc_of(weights) -> float:
        interest = np.einsum("rn,rnd->rd", signs * weights(hist_scenes), vec[hist_items])
        return _auc(np.einsum("rd,rd->r", interest, target_vec), labels)

    return auc_of, sparse


def test_cross_scene_behaviour_predicts_the_sparse_scene_better_than_its_own(log):
    """Using the history from every scene must beat using the sparse scene's own history."""
    auc_of, sparse = _ground_truth_scorer(log, synth.SynthConfig(users=1500, items=800, seed=3))
    auc_all = auc_of(np.ones_like)
    auc_own = auc_of(lambda scenes: (scenes == sparse).astype(float))
    assert auc_all > auc_own + 0.05, (auc_all, auc_own)
    assert auc_all > 0.6


def test_scene_relatedness_decides_what_another_scene_says():
    """With scene_relatedness r = 0.5 the sparse (last) scene's interest follows its neighbour's (correlation 0.5)
    and barely the first scene's (0.125): the neighbour's history alone predicts it, the first scene's is near
    chance. With r = 1 (one interest for every scene) the first scene's history predicts it too."""
    aucs = {}
    for r in (0.5, 1.0):
        cfg = synth.SynthConfig(users=1500, items=800, seed=3, scene_relatedness=r)
        auc_of, sparse = _ground_truth_scorer(synth.generate(cfg), cfg)
        near_scene = lambda scenes, neighbour=sparse - 1: (scenes == neighbour).astype(float)  # noqa: E731
        aucs[r] = auc_of(near_scene), auc_of(lambda scenes: (scenes == 0).astype(float))
    (near, far), (_, far_when_shared) = aucs[0.5], aucs[1.0]
    assert near > far + 0.05 and far < 0.55, aucs
    assert far_when_shared > far + 0.08, aucs
    world = synth._World(synth.SynthConfig(scene_relatedness=0.5))
    assert np.allclose(world.relatedness[-1], [0.125, 0.25, 0.5, 1.0])
    assert np.allclose(world.mixing @ world.mixing.T, world.relatedness)  # what the draws follow


def test_scene_focus_concentrates_each_user_on_a_few_scenes_and_keeps_the_shares():
    """With scene_focus a = 0.3 most users put most of their events in one or two scenes (the share of a user's
    events in their busiest scene rises), while the scenes' overall shares stay near the configured ones; a = 0
    leaves the log exactly as before the option existed."""
    base = synth.SynthConfig(users=1500, items=800, seed=2)
    plain, focused = synth.generate(base), synth.generate(dataclasses.replace(base, scene_focus=0.3))
    assert plain.equals(synth.generate(dataclasses.replace(base, scene_focus=0.0)))
    top_share = lambda log: log.groupby("user_id")["scenario"].agg(lambda s: s.value_counts(normalize=True).iloc[0])  # noqa: E731
    assert top_share(focused).mean() > top_share(plain).mean() + 0.2, (
        top_share(focused).mean(),
        top_share(plain).mean(),
    )
    shares = focused["scenario"].value_counts(normalize=True)
    expected = synth._World(base).scene_share
    for name, share in zip(synth.SCENE_NAMES, expected, strict=False):
        assert abs(shares[name] - share) < 0.1, (name, shares[name], share)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scene_focus": -1.0}, "scene_focus"),
        ({"scenes": 1}, "scenes must be between"),
        ({"sparse_scene_share": 1.5}, "sparse_scene_share"),
        ({"items": 2, "scenes": 4}, "one item per scene"),
        ({"scene_relatedness": 1.5}, "scene_relatedness"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        synth.SynthConfig(**kwargs)


def test_writing_again_replaces_the_log_whole_and_refuses_a_foreign_directory(tmp_path):
    out = tmp_path / "s"
    synth.write(synth.SynthConfig(users=120, items=50, users_per_shard=50), out, progress=False)
    assert len(list(out.glob("part-*.parquet"))) == 3
    synth.write(synth.SynthConfig(users=40, items=50, users_per_shard=50), out, progress=False)
    assert len(list(out.glob("part-*.parquet"))) == 1  # no stale shards of the larger log
    assert pd.read_parquet(out / "part-00000.parquet").user_id.nunique() == 40
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not written by msit"):
        synth.write(synth.SynthConfig(users=40, items=50), tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
