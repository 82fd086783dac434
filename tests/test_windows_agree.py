"""Training and serving cut identical windows for the same event.

For every event of a prepared directory, the window training cuts (`EventSplit.batches`, i.e.
`model_batch` with the event row's position) equals the window the serving scorer cuts for a request of
that user at that event's timestamp, from the history store built from the same directory, and from
the user's whole history given in the request, shuffled. The log is made for it: many events at one
timestamp (ties, broken by item key as numbers: 9 before 10), users with 1 to 30 events (short
histories, empty windows) and windows both full and partly padded.
"""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from msit.data.feature_spec import FeatureSpec
from msit.data.prepare import PrepareConfig, prepare
from msit.data.prepared import SEQUENCES_DIR, load_sequences, load_split
from msit.data.schema import WINDOW_FIELDS
from msit.model import ModelConfig, build_for_data
from msit.model.model_dir import load_model_config, save_model_dir
from msit.serving.history_store import InMemoryHistoryStore
from msit.serving.scorer import Scorer

N = 6  # the model's history_length: below most users' event counts, above the short users'
WINDOW = WINDOW_FIELDS


def tied_log(seed: int = 3) -> pd.DataFrame:
    """40 users with 1 to 30 events each, timestamps from 8 values (ties everywhere), numeric item keys."""
    rng = np.random.default_rng(seed)
    frames = []
    for user in range(40):
        n = [1, 2, 3, 5, 12, 30][user % 6]
        frames.append(
            pd.DataFrame(
                {
                    "user_id": user + 1,
                    "item_id": rng.choice(np.arange(1, 80), n, replace=False),  # no duplicate rows
                    "scenario": rng.choice(["feed", "search", "shop"], n),
                    "label": rng.integers(0, 2, n),
                    "timestamp": 1_000_000_000 + 1000 * rng.integers(0, 8, n),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def tied(ray_session, tmp_path_factory):
    """(raw log, prepared directory, model directory of an untrained model with history_length N)."""
    root = tmp_path_factory.mktemp("tied")
    log = tied_log()
    log.to_csv(root / "log.csv", index=False)
    prepare(PrepareConfig(inputs=[str(root / "log.csv")], out=str(root / "prepared")), log=lambda _: None)
    spec = FeatureSpec.load(root / "prepared")
    config = ModelConfig(embed_dim=8, mlp_dims=(8,), history_length=N)
    torch.manual_seed(0)
    model = build_for_data(config, root / "prepared", spec)
    return log, root / "prepared", save_model_dir(root / "model", model, config, spec)


def training_windows(prepared, spec, history_length: int) -> dict[str, dict[str, np.ndarray]]:
    """Per split: the event rows' user keys and timestamps, and the windows training cuts (odd batch size: the
    batch edges fall anywhere)."""
    sequences = load_sequences(prepared)
    keys = pq.read_table(prepared / SEQUENCES_DIR, columns=["sequence_row", "user_key"]).to_pandas()
    user_keys = keys.set_index("sequence_row").user_key.sort_index().to_numpy()
    out = {}
    for split in ("train", "val", "test"):
        data = load_split(prepared, split, spec, sequences)
        batches = list(data.batches(7, history_length))
        out[split] = {name: torch.cat([b[name] for b in batches]).numpy() for name in WINDOW}
        out[split]["user_key"] = user_keys[data.events["sequence_row"].numpy()]
        out[split]["timestamp"] = data.events["timestamp"].numpy()
    return out


def serving_windows(scorer: Scorer, requests: list[dict], per_batch: int = 16) -> dict[str, np.ndarray]:
    """The windows the scorer cuts for these requests, several requests per batch as in serving."""
    parts = [
        scorer.windows([scorer.encode(r) for r in requests[i : i + per_batch]])
        for i in range(0, len(requests), per_batch)
    ]
    return {name: torch.cat([p[name] for p in parts]).numpy() for name in WINDOW}


def assert_same_windows(served: dict, trained: dict, where: str) -> None:
    for name in WINDOW:
        np.testing.assert_array_equal(served[name], trained[name], err_msg=f"{where}: {name}")


def test_training_and_serving_cut_identical_windows_for_every_event(tied):
    log, prepared, model_dir = tied
    spec = FeatureSpec.load(prepared)
    scorer = Scorer(model_dir, InMemoryHistoryStore.from_prepared(prepared, spec))
    trained = training_windows(prepared, spec, scorer.config.history_length)
    rng = np.random.default_rng(0)
    events = dict(iter(log.groupby(log["user_id"].astype(str))))
    lengths, ties = [], 0
    for split, rows in trained.items():
        base = [
            {"user_id": user, "scenario": spec.scenarios[0], "candidates": ["1"], "timestamp": int(t)}
            for user, t in zip(rows["user_key"], rows["timestamp"], strict=True)
        ]
        assert_same_windows(serving_windows(scorer, base), rows, f"{split}, the store's sequences")

        # The user's whole log in the request instead, in a random order: put in event order, ties alike.
        given = [
            {
                **r,
                "history": [
                    {
                        "item_id": int(e.item_id),
                        "scenario": e.scenario,
                        "label": int(e.label),
                        "timestamp": int(e.timestamp),
                    }
                    for e in events[r["user_id"]].sample(frac=1, random_state=rng).itertuples()
                ],
            }
            for r in base
        ]
        assert_same_windows(serving_windows(scorer, given), rows, f"{split}, the request's history")
        lengths += rows["history_length"].tolist()
        ties += sum(
            int((events[u]["timestamp"] == t).sum() > 1)
            for u, t in zip(rows["user_key"], rows["timestamp"], strict=True)
        )
    # The log exercises what it is made for: events that tie, empty, partial and full windows.
    assert ties > 100 and {0, N} <= set(lengths) and any(0 < n < N for n in lengths)
    assert len(lengths) == len(log)


def test_identical_windows_on_the_synthetic_logs_with_user_and_context_features(small_model):
    """The shared small model (history_length 10) on its test split, at batch sizes 1 and 64."""
    model_dir, prepared = small_model
    spec = FeatureSpec.load(prepared)
    scorer = Scorer(model_dir, InMemoryHistoryStore.from_prepared(prepared, spec))
    assert scorer.config.history_length == load_model_config(model_dir).history_length
    rows = training_windows(prepared, spec, scorer.config.history_length)["test"]
    requests = [
        {"user_id": user, "scenario": spec.scenarios[0], "candidates": ["1"], "timestamp": int(t)}
        for user, t in zip(rows["user_key"], rows["timestamp"], strict=True)
    ]
    for per_batch in (1, 64):
        assert_same_windows(
            serving_windows(scorer, requests[:200], per_batch),
            {k: v[:200] for k, v in rows.items()},
            f"batches of {per_batch}",
        )
    assert_same_windows(serving_windows(scorer, requests, 64), rows, "the whole test split")
    assert (rows["history_length"] > 0).mean() > 0.8
