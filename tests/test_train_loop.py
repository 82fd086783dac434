"""The one epoch loop (msit.training.train_loop), without Ray: early stopping, resume, the start point, ranks that
follow rank 0, and over two real torch.distributed ranks: gathered validation and the global batch."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msit.data.prepared import EventSplit
from msit.data.sequences import Sequences
from msit.evaluation.metrics import scene_metrics
from msit.model import ModelConfig, build_model
from msit.ray_env import free_ports
from msit.training.train_loop import EpochLoop, LoopState, TorchWorld, World, predictions, validation_metrics
from msit.training.trainer import TrainConfig, evaluate, fit, make_optimizer, seed_everything, train_step
from tests.model_helpers import N_ITEMS, N_USERS, item_table, tiny_spec


def tiny_split(users: int = N_USERS - 2, events_per_user: int = 12, seed: int = 0) -> EventSplit:
    """Every user's sequence and one event row per event, hand-made: items of even index are liked more."""
    rng = np.random.default_rng(seed)
    n = users * events_per_user
    items = rng.integers(2, N_ITEMS, n)
    labels = (rng.random(n) < np.where(items % 2 == 0, 0.8, 0.2)).astype(np.int8)
    scenes = rng.integers(2, 5, n)
    stamps = np.tile(np.arange(events_per_user) * 100, users) + 1_000
    sequences = Sequences.from_arrays(
        np.full(users, events_per_user),
        items.astype(np.int32),
        scenes.astype(np.int16),
        labels,
        stamps.astype(np.int64),
    )
    rows = np.repeat(np.arange(users), events_per_user)
    events = {
        "user_id": torch.from_numpy(rows + 2).int(),
        "item_id": torch.from_numpy(items).int(),
        "scene_id": torch.from_numpy(scenes).short(),
        "label": torch.from_numpy(labels),
        "gender": torch.from_numpy(rng.integers(2, 4, n)).int(),
        "hour": torch.from_numpy(rng.integers(2, 26, n)).int(),
        "timestamp": torch.from_numpy(stamps),
        "sequence_row": torch.from_numpy(rows).int(),
        "position": torch.from_numpy(np.tile(np.arange(events_per_user), users)).int(),
    }
    return EventSplit(events, sequences)


def tiny_model(family: str = "msit", dropout: float = 0.1):
    seed_everything(0)
    return build_model(
        ModelConfig(family=family, embed_dim=8, mlp_dims=(8,), history_length=6, dropout=dropout),
        tiny_spec(),
        item_table(),
    )


def scripted_loop(aucs: list[float], cfg: TrainConfig, world: World | None = None, **hooks) -> tuple[EpochLoop, list]:
    """A loop whose steps do nothing and whose validation returns these AUCs in turn; records every hook call."""
    calls, scores = [], iter(aucs)

    def validate():
        if world is not None and world.rank != 0:
            return None
        auc = next(scores)
        return {"overall": {"auc": auc, "logloss": 1 - auc}, "scenes": {"feed": {"auc": auc}}}

    loop = EpochLoop(
        cfg,
        step=lambda batch: 0.5,
        train_batches=lambda epoch: [{"label": torch.zeros(4)}] * 3,
        validate=validate,
        on_epoch=lambda end: calls.append(("epoch", end.epoch, end.improved)),
        world=world or World(),
        after_batch=lambda epoch, n: calls.append(("batch", epoch, n)),
        after_epoch=lambda epoch: calls.append(("after", epoch)),
        log=lambda _: None,
        **hooks,
    )
    return loop, calls


def test_the_loop_stops_after_patience_epochs_without_a_better_val_auc():
    loop, calls = scripted_loop([0.6, 0.7, 0.65, 0.69, 0.9], TrainConfig(epochs=5, patience=2))
    state = loop.run()
    assert (state.best_epoch, state.best_auc) == (2, 0.7)
    assert [h["epoch"] for h in state.history] == [1, 2, 3, 4]  # epoch 5 never ran
    assert [c for c in calls if c[0] == "epoch"] == [
        ("epoch", 1, True),
        ("epoch", 2, True),
        ("epoch", 3, False),
        ("epoch", 4, False),
    ]
    assert [c[1] for c in calls if c[0] == "after"] == [1, 2, 3]  # the run went on after these
    assert [c for c in calls if c[0] == "batch"][:4] == [
        ("batch", 0, 1),
        ("batch", 0, 2),
        ("batch", 0, 3),
        ("batch", 1, 1),
    ]
    record = state.history[0]
    assert record["train_samples"] == 12 and record["train_loss"] == 0.5 and record["val_auc/feed"] == 0.6
    assert record["first_epoch_of_attempt"] == 1


def test_a_resumed_loop_continues_the_epoch_counter_and_the_best_so_far():
    before = [{"epoch": 1, "val_auc": 0.6}, {"epoch": 2, "val_auc": 0.7}]
    loop, _ = scripted_loop([0.68, 0.66], TrainConfig(epochs=6, patience=2))
    state = loop.run(LoopState(first_epoch=3, best_auc=0.7, best_epoch=2, history=list(before)))
    assert [h["epoch"] for h in state.history] == [1, 2, 3, 4]  # stopped at 4: two epochs after the best (2)
    assert state.best_epoch == 2 and [h["first_epoch_of_attempt"] for h in state.history[2:]] == [3, 3]


def test_the_start_point_is_epoch_0_and_the_best_to_beat():
    loop, calls = scripted_loop([0.8, 0.7, 0.75], TrainConfig(epochs=5, patience=2))
    state = loop.run(start_point=True)
    assert [h["epoch"] for h in state.history] == [0, 1, 2] and state.best_epoch == 0
    assert calls[0] == ("epoch", 0, True)
    # A resumed run does not score its start again.
    loop, calls = scripted_loop([0.6], TrainConfig(epochs=3, patience=2))
    assert [h["epoch"] for h in loop.run(LoopState(first_epoch=3), start_point=True).history] == [3]


class FollowerWorld(World):
    """Rank 1 of two: it holds no metrics and takes rank 0's stop decisions (here: stop after epoch 2)."""

    rank, size = 1, 2

    def __init__(self):
        self.asked = []

    def decide(self, flag: bool) -> bool:
        self.asked.append(flag)
        return len(self.asked) == 2


def test_other_ranks_follow_rank_0s_decision_and_keep_no_history():
    world = FollowerWorld()
    loop, calls = scripted_loop([], TrainConfig(epochs=5, patience=9), world=world)
    state = loop.run()
    assert world.asked == [False, False]  # its own view would go on (patience 9); rank 0 decides to stop
    assert [c for c in calls if c[0] == "epoch"] == [("epoch", 1, False), ("epoch", 2, False)]
    assert state.history == [] and state.best_epoch == 0


def test_fit_trains_reproducibly_and_ends_with_the_best_epochs_weights():
    spec, train, val = tiny_spec(), tiny_split(seed=0), tiny_split(seed=1)
    runs = []
    for _ in range(2):
        model = tiny_model()
        result = fit(
            model, train, val, spec, TrainConfig(epochs=4, batch_size=32, lr=1e-2, patience=4), log=lambda _: None
        )
        runs.append(result)
    assert [h["train_loss"] for h in runs[0].history] == [h["train_loss"] for h in runs[1].history]
    result = runs[1]
    assert result.history[result.best_epoch - 1]["val_auc"] == max(h["val_auc"] for h in result.history)
    assert result.history[0]["train_samples"] == len(train)
    assert set(result.history[0]) >= {"train_loss", "val_auc", "val_logloss", "val_auc/feed", "train_samples_per_s"}
    assert evaluate(model, val, spec, batch_size=50)["overall"]["auc"] == pytest.approx(
        result.best_val["overall"]["auc"], abs=1e-12
    )
    assert result.best_val["overall"]["auc"] > 0.6  # the planted signal (chance is 0.5)


def test_validation_metrics_in_one_process_are_scene_metrics_of_every_row():
    spec, val = tiny_spec(), tiny_split(seed=1)
    model = tiny_model()
    local = predictions(model, val.batches(37, model.history_length))
    ours = validation_metrics(World(), local, spec.scene_names())
    events = val.events
    assert ours == scene_metrics(
        events["label"].numpy(),
        local["prob"].numpy(),
        events["scene_id"].numpy(),
        events["user_id"].numpy(),
        spec.scene_names(),
    )
    assert ours["overall"]["auc"] == pytest.approx(evaluate(model, val, spec)["overall"]["auc"], abs=1e-12)


def _two_ranks(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    world = TorchWorld(rank, 2, torch.device("cpu"))
    spec, val = tiny_spec(), tiny_split(seed=1)
    # Validation: the ranks hold unequal shares of val (rank 0 the first 100 rows, rank 1 the rest).
    model = tiny_model(dropout=0.0)
    share = val.select(torch.arange(100) if rank == 0 else torch.arange(100, len(val)))
    gathered = validation_metrics(world, predictions(model, share.batches(64, 6)), spec.scene_names())
    assert world.sum([1.0, float(len(share))]) == [2.0, float(len(val))]
    assert world.decide(rank == 0) is True
    # One DDP step over 2 x 16 rows: the same gradient as one step over those 32 rows in one process (compared
    # as gradients: Adam's first step divides by |gradient|, which turns float noise in a gradient that is zero
    # in exact arithmetic, such as attention's key bias, into a full step).
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2))
    batch = next(tiny_split(seed=2).batches(32, 6))
    train_step(ddp, {k: v[rank * 16 : (rank + 1) * 16] for k, v in batch.items()}, optimizer)
    if rank == 0:
        out["gathered"] = gathered
        out["grads"] = {k: p.grad.numpy().copy() for k, p in model.named_parameters() if p.grad is not None}
    dist.destroy_process_group()


def _run_rank(rank: int, port: int, queue) -> None:
    out: dict = {}
    _two_ranks(rank, port, out)
    queue.put(out if rank == 0 else None)


def test_two_ranks_gather_every_val_row_and_a_global_batch_steps_like_one_process():
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = free_ports(1)[0]
    ranks = [context.Process(target=_run_rank, args=(rank, port, queue)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    results = [queue.get() for _ in ranks]
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    out = next(r for r in results if r is not None)

    spec, val = tiny_spec(), tiny_split(seed=1)
    model = tiny_model(dropout=0.0)
    whole = evaluate(model, val, spec, batch_size=64)  # every row, once
    assert out["gathered"]["overall"]["rows"] == len(val)
    # A row scored in another batch can differ in its last float bits (batch-size-dependent kernels, seen on AMD
    # EPYC), which moves a metric by ~1e-9, far less than a lost or doubled row would (rows are counted too).
    for part in ("auc", "logloss", "gauc"):
        assert out["gathered"]["overall"][part] == pytest.approx(whole["overall"][part], abs=1e-6)
        assert {s: m[part] for s, m in out["gathered"]["scenes"].items()} == pytest.approx(
            {s: m[part] for s, m in whole["scenes"].items()}, abs=1e-6
        )
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2))
    train_step(model, next(tiny_split(seed=2).batches(32, 6)), optimizer)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(out["grads"]) and grads
    for name, grad in grads.items():  # numpy by value through the queue
        torch.testing.assert_close(torch.from_numpy(out["grads"][name]), grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_global_batch_is_split_over_the_workers():
    from msit.errors import ConfigError
    from msit.training.ray_train import local_batch_size

    assert [local_batch_size(1024, w) for w in (1, 2, 3)] == [1024, 512, 341]
    with pytest.raises(ConfigError, match=r"train\.batch_size 1 is the global batch, split over 2 workers"):
        local_batch_size(1, 2)


def test_the_next_epochs_reading_starts_when_an_epochs_batches_end_and_its_errors_reach_the_loop():
    import threading

    from msit.training.ray_train import EpochsAhead

    started, second_started = [], threading.Event()

    def read_epoch(epoch):
        started.append(epoch)
        if epoch == 2:
            second_started.set()
        if epoch == 3:
            raise OSError("shard lost")
        yield from ([epoch, epoch] if epoch == 1 else [epoch])

    ahead = EpochsAhead(read_epoch, last_epoch=3)
    assert list(ahead.epoch(1)) == [1, 1]
    assert second_started.wait(10)  # started before anyone asked for epoch 2 (validation runs meanwhile)
    assert list(ahead.epoch(2)) == [2]
    with pytest.raises(OSError, match="shard lost"):
        list(ahead.epoch(3))
    assert started == [1, 2, 3]


def test_a_kept_shard_streams_its_first_epoch_then_reshuffles_the_same_rows_in_memory():
    from msit.training.ray_train import KeptShard

    streamed = []

    def stream(epoch):  # what Ray Data hands the rank in its first epoch: 10 rows in batches of 4
        streamed.append(epoch)
        rows = torch.arange(10)
        yield from ({"item_id": rows[i : i + 4], "label": rows[i : i + 4] % 2} for i in range(0, 10, 4))

    shard = KeptShard(stream, batch_size=4, epoch_seed=lambda epoch: 100 + epoch)
    first = list(shard.epoch(1))
    assert [b["item_id"].tolist() for b in first] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    second, third = list(shard.epoch(2)), list(shard.epoch(3))
    assert streamed == [1]  # read through Ray Data once
    for epoch in (second, third):
        assert [len(b["item_id"]) for b in epoch] == [4, 4, 2]  # the same steps as streaming: DDP ranks agree
        items = torch.cat([b["item_id"] for b in epoch])
        assert sorted(items.tolist()) == list(range(10))  # every row once
        assert torch.equal(torch.cat([b["label"] for b in epoch]), items % 2)  # columns stay together
    orders = [torch.cat([b["item_id"] for b in e]).tolist() for e in (first, second, third)]
    assert len({tuple(o) for o in orders}) == 3  # a new order each epoch
    again = KeptShard(stream, 4, lambda epoch: 100 + epoch)
    list(again.epoch(1))
    assert torch.cat([b["item_id"] for b in again.epoch(2)]).tolist() == orders[1]  # seeded
