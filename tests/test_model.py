"""MSIT and the baselines as plain PyTorch modules: shapes, masking, explanations, configs, save/load."""

import dataclasses

import pytest
import torch

from msit.data.schema import OOV, PAD, scene_id, scene_slots
from msit.errors import ConfigError, MsitError
from msit.model import FAMILIES, FUSIONS, ModelConfig, build_model
from msit.model.model_dir import load_model_dir, save_model_dir
from tests.model_helpers import HISTORY, SCENES, item_table, random_batch, tiny_spec

SPEC = tiny_spec()


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{"embed_dim": 16, "history_length": HISTORY, **kwargs}), SPEC, item_table())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_one_finite_logit_per_row_and_trains(family):
    model = _model(family=family)
    batch = random_batch(12)
    out = model(batch)
    assert out.logits.shape == (12,) and torch.isfinite(out.logits).all()
    nn_loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch["label"].float())
    nn_loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_every_fusion_and_head_count_runs_forward_and_backward(fusion, heads):
    model = _model(fusion=fusion, interest_heads=heads, transfer_heads=heads)
    out = model(random_batch(8), explain=True)
    out.logits.sum().backward()
    assert out.transfer_attention.shape == (8, len(SCENES))
    assert out.behaviour_attention.shape == (8, len(SCENES), HISTORY)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_explanations_are_distributions():
    model = _model().eval()
    batch = random_batch(32)
    out = model(batch, explain=True)
    assert model(batch).behaviour_attention is None  # computed only when asked for
    assert (out.transfer_attention >= 0).all()
    assert torch.allclose(out.transfer_attention.sum(-1), torch.ones(32), atol=1e-5)
    behaviour = out.behaviour_attention  # per scene: sums to 1 where that scene has history, else 0
    in_scene = (batch["history_scene_ids"][:, None, :] == torch.arange(2, 5)[None, :, None]) & (
        batch["history_item_ids"][:, None, :] != 0
    )
    sums = behaviour.sum(-1)
    assert (behaviour >= 0).all()
    assert torch.allclose(sums[in_scene.any(-1)], torch.ones(int(in_scene.any(-1).sum())), atol=1e-5)
    assert (sums[~in_scene.any(-1)] == 0).all()
    assert (behaviour[~in_scene] == 0).all()  # padding and other scenes' events are never attended


@pytest.mark.parametrize("scene_evidence", [False, True])
def test_padding_never_changes_the_score(scene_evidence):
    model = _model(scene_evidence=scene_evidence).eval()
    batch = random_batch(16, history_lengths=[3] * 16)
    noisy = dict(batch)
    for key in ("history_labels", "history_time_gaps"):
        noisy[key] = batch[key].clone()
        noisy[key][:, 3:] = 1  # garbage in the padded slots
    assert torch.equal(model(batch).logits, model(noisy).logits)


def test_no_history_or_history_in_one_scene_gives_finite_scores():
    model = _model().eval()
    empty = random_batch(4, history_lengths=[0, 0, 0, 0])
    assert torch.isfinite(model(empty).logits).all()
    one_scene = random_batch(4, history_lengths=[6, 6, 6, 6])
    one_scene["history_scene_ids"][:] = 2
    out = model(one_scene, explain=True)
    assert torch.isfinite(out.logits).all()
    assert (out.behaviour_attention[:, 1:].sum(-1) == 0).all()


def _candidates_as_rows(batch: dict, item_ids: torch.Tensor) -> dict:
    """Each (row, candidate) pair as a row of its own: the row repeated, its item swapped for the candidate."""
    C = item_ids.shape[1]
    rows = {k: v.repeat_interleave(C, dim=0) for k, v in batch.items()}
    rows["item_id"] = item_ids.flatten()
    return rows


@pytest.mark.parametrize(
    ("family", "fusion", "scene_evidence"),
    [
        *((f, "attention", False) for f in FAMILIES if f != "msit"),
        *(("msit", f, False) for f in FUSIONS),
        ("msit", "attention", True),
        ("msit_no_transfer", "attention", True),
    ],
)
def test_the_user_side_once_scores_every_candidate_as_the_whole_forward_does(family, fusion, scene_evidence):
    """encode_user once per row, then score C candidates against it == forward on each (row, candidate) as a row."""
    model = _model(
        family=family, fusion=fusion, interest_heads=2, transfer_heads=2, scene_evidence=scene_evidence
    ).eval()
    batch = random_batch(6, seed=2)
    item_ids = torch.randint(1, 40, (6, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        split = model.score(model.encode_user(batch), item_ids, explain=True)
        whole = model(_candidates_as_rows(batch, item_ids), explain=True)
    assert split.logits.shape == (6, 5)
    torch.testing.assert_close(split.logits.flatten(), whole.logits, atol=1e-5, rtol=1e-5)
    if whole.transfer_attention is not None:
        torch.testing.assert_close(
            split.transfer_attention.flatten(0, 1), whole.transfer_attention, atol=1e-6, rtol=1e-5
        )
    if whole.behaviour_attention is not None:
        torch.testing.assert_close(
            split.behaviour_attention.flatten(0, 1), whole.behaviour_attention, atol=1e-6, rtol=1e-5
        )
    # and forward itself is the split with one candidate, the row's own item
    torch.testing.assert_close(
        model(batch).logits, model.score(model.encode_user(batch), batch["item_id"][:, None]).logits[:, 0]
    )


def test_scoring_a_catalogue_in_chunks_equals_one_pass():
    from msit.model.output import score_in_chunks

    model = _model().eval()
    batch = random_batch(3, seed=4)
    catalogue = torch.arange(2, 40)[None].expand(3, -1)
    with torch.no_grad():
        user = model.encode_user(batch)
        whole = model.score(user, catalogue, explain=True)
        chunked = score_in_chunks(model, user, catalogue, explain=True, max_rows=21)  # 7 candidates a pass
    torch.testing.assert_close(chunked.logits, whole.logits)
    torch.testing.assert_close(chunked.behaviour_attention, whole.behaviour_attention)


def test_unknown_scene_and_unknown_ids_still_score():
    batch = random_batch(4)
    batch["scene_id"][:] = 1
    batch["user_id"][:] = 1
    batch["item_id"][:] = 1
    for family in FAMILIES:
        assert torch.isfinite(_model(family=family).eval()(batch).logits).all()


def test_one_slot_rule_for_unknown_scenes():
    """Padding, OOV and a scene id past the model's scenes take slot S, one past the known ones (every family)."""
    ids = torch.tensor([PAD, OOV, *(scene_id(s) for s in range(len(SCENES))), scene_id(len(SCENES))])
    assert scene_slots(ids, len(SCENES)).tolist() == [3, 3, 0, 1, 2, 3]


def test_same_seed_same_model_and_scores():
    batch = random_batch(8)
    a, b = _model(seed=3).eval(), _model(seed=3).eval()
    assert torch.equal(a(batch).logits, b(batch).logits)
    assert not torch.equal(a(batch).logits, _model(seed=4).eval()(batch).logits)


def test_a_model_reads_windows_of_its_history_length_cut_from_the_sequences():
    """Windows are cut per batch (model_batch) at the model's history_length: events older than the last two
    never change a score of a history_length=2 model; the last two do."""
    from msit.data.prepared import model_batch
    from msit.data.sequences import Sequences

    model = _model(history_length=2).eval()
    assert model.history_length == 2
    users, events = 8, 6
    g = torch.Generator().manual_seed(1)

    scenes = torch.randint(2, 5, (users * events,), generator=g)

    def sequences(items: torch.Tensor) -> Sequences:  # each user: 6 events at t = 10, 20, ..., 60
        return Sequences.from_arrays(
            torch.full((users,), events).numpy(),
            items.flatten().numpy(),
            scenes.numpy(),
            torch.ones(users * events).numpy(),
            torch.arange(10, 70, 10).repeat(users).numpy(),
        )

    items = torch.randint(2, 40, (users, events), generator=g)
    older, recent = items.clone(), items.clone()
    older[:, :4] = 5  # the four oldest events
    recent[:, 4:] = 5  # the two most recent
    rows = {k: v for k, v in random_batch(users).items() if not k.startswith("history_")}
    rows |= {
        "sequence_row": torch.arange(users),
        "timestamp": torch.full((users,), 100),
        "position": torch.full((users,), events),
    }
    scores = [model(model_batch(rows, sequences(s), model.history_length)).logits for s in (items, older, recent)]
    assert model_batch(rows, sequences(items), 2)["history_item_ids"].tolist() == items[:, [5, 4]].tolist()
    assert torch.equal(scores[0], scores[1])
    assert not torch.equal(scores[0], scores[2])


@pytest.mark.parametrize("scene_evidence", [False, True])
def test_msit_no_transfer_ignores_other_scenes_history_and_msit_reads_it(scene_evidence):
    """Change only the real history events of scenes other than each row's target scene (their items, labels,
    time gaps, and which of the other scenes they are in): the ablation's scores stay, MSIT's move on exactly
    the rows that have such events. The target scene's own events and the padding are left as they were."""
    batch = random_batch(48, seed=5)
    real = batch["history_item_ids"] != 0  # padding: item 0 and scene 0, never changed
    other = real & (batch["history_scene_ids"] != batch["scene_id"][:, None])  # (B, N)
    rows_with_other = other.any(1)
    assert 8 <= int(rows_with_other.sum()) < 48  # some rows have other scenes' history, some do not

    g = torch.Generator().manual_seed(6)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["history_item_ids"][other] = torch.randint(2, 40, (int(other.sum()),), generator=g)
    changed["history_labels"][other] = 1 - batch["history_labels"][other]
    changed["history_time_gaps"][other] = batch["history_time_gaps"][other] // 7 + 3
    # The scene ids are 2, 3, 4: an event in scene s != target t moves to the third scene, 9 - s - t.
    target = batch["scene_id"][:, None].expand_as(other)
    changed["history_scene_ids"][other] = 9 - batch["history_scene_ids"][other] - target[other]
    assert (changed["history_scene_ids"][other] != target[other]).all()
    assert (changed["history_item_ids"][other] != batch["history_item_ids"][other]).any()

    own = {k: v.clone() for k, v in batch.items()}  # the control: change the target scene's own events instead
    own["history_item_ids"][real & ~other] = torch.randint(2, 40, (int((real & ~other).sum()),), generator=g)

    with torch.no_grad():
        ablation = _model(family="msit_no_transfer", scene_evidence=scene_evidence).eval()
        msit = _model(family="msit", scene_evidence=scene_evidence).eval()
        before, after, own_changed = (ablation(b).logits for b in (batch, changed, own))
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
        assert (own_changed - before).abs().max() > 1e-3  # it does read the target scene's own history

        moved = (msit(changed).logits - msit(batch).logits).abs()
    assert (moved[rows_with_other] > 1e-5).all()  # (the smallest move here is about 3e-4)
    assert (moved[~rows_with_other] < 1e-6).all()


def test_scene_evidence_reads_how_many_events_and_positives_each_scene_has():
    """Each row has one event, in its target scene: flipping its label changes that scene's evidence (its count
    of positives) and no other scene's (they have no events, before and after)."""
    batch = random_batch(16, seed=4, history_lengths=[1] * 16)
    batch["history_scene_ids"][:, 0] = batch["scene_id"]
    flipped = {k: v.clone() for k, v in batch.items()}
    flipped["history_labels"][:, 0] = 1 - batch["history_labels"][:, 0]
    with torch.no_grad():
        counting = _model(scene_evidence=True).eval()
        evidence = counting.interest.encode(counting.embed, batch)["history_evidence"]
        assert evidence.shape == (16, len(SCENES), 16)
        other = counting.interest.encode(counting.embed, flipped)["history_evidence"]
    target = batch["scene_id"] - 2  # the target scene's slot
    rows = torch.arange(16)
    assert ((evidence - other)[rows, target].abs().amax(-1) > 1e-4).all()  # its counts of positives differ
    untouched = torch.ones(16, len(SCENES), dtype=torch.bool)
    untouched[rows, target] = False
    assert torch.equal(evidence[untouched], other[untouched])


def test_transfer_pair_bias_starts_at_zero_and_steers_the_transfer_attention():
    """At initialisation the pair bias changes nothing (same weights otherwise, same logits); a large bias on
    (target scene 0, source scene 2) puts nearly all of scene 0's attention on scene 2 and none of scene 1's."""
    spec, table, batch = tiny_spec(), item_table(), random_batch(64, seed=5)
    torch.manual_seed(0)
    plain = build_model(ModelConfig(transfer_layers=1), spec, table).eval()
    with_bias = build_model(ModelConfig(transfer_layers=1, transfer_pair_bias=True), spec, table).eval()
    missing, unexpected = with_bias.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["transfer.pair_bias.table"] and not unexpected
    with torch.no_grad():
        assert torch.equal(plain(batch).logits, with_bias(batch).logits)
        with_bias.transfer.pair_bias.table[0, :, :, 2] = 30.0
        attention = with_bias(batch).transfer_attention
    slots = scene_slots(batch["scene_id"], len(SCENES))
    assert (slots == 0).any() and (slots == 1).any()
    assert (attention[slots == 0, 2] > 0.99).all()
    assert (attention[slots == 1, 2] < 0.99).all()


def test_transfer_kl_regulariser_only_when_weighted():
    assert _model()(random_batch(4)).regularization is None
    model = _model(transfer_kl_weight=0.5, dropout=0.5).train()  # weights stay distributions in training too
    out = model(random_batch(16))
    assert torch.allclose(out.transfer_attention.sum(-1), torch.ones(16), atol=1e-5)
    p = out.transfer_attention.clamp(min=1e-8)
    expected = 0.5 * (p * (p / (1 / len(SCENES))).log()).sum(-1).mean()
    assert out.regularization.item() == pytest.approx(expected.item(), rel=1e-5) and out.regularization.item() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embed_dim": 30, "interest_heads": 4}, "embed_dim 30 is not divisible by interest_heads 4"),
        ({"transfer_heads": 3}, "embed_dim 32 is not divisible by transfer_heads 3"),
        ({"fusion": "max"}, r"fusion must be one of \['attention', 'concat', 'gate', 'sum'\], got 'max'"),
        ({"family": "din"}, "family must be one of"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"transfer_layers": 0}, "transfer_layers must be at least 1"),
    ],
)
def test_invalid_configs_are_refused_with_a_message(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_gives_identical_scores(tmp_path, family):
    model = _model(family=family).eval()
    batch = random_batch(16)
    cfg = ModelConfig(embed_dim=16, family=family, history_length=HISTORY)
    save_model_dir(tmp_path / "m", model, cfg, SPEC, {"note": "test"})
    loaded = load_model_dir(tmp_path / "m")
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(cfg)
    assert loaded.config.history_length == loaded.model.history_length == HISTORY  # the window width travels
    assert loaded.info == {"note": "test"}
    assert torch.equal(loaded.model(batch).logits, model(batch).logits)
    save_model_dir(tmp_path / "m", model, cfg, SPEC)  # replacing an existing directory works
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "feature_spec.json",
        "model.json",
        "model.safetensors",
    ]


def test_loading_a_non_model_directory_says_what_is_missing(tmp_path):
    with pytest.raises(MsitError, match=r"missing \['model.safetensors', 'model.json', 'feature_spec.json'\]"):
        load_model_dir(tmp_path)
