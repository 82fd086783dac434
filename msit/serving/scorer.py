"""Scoring requests with a model directory: encoding, batching, explanations. No Ray, no HTTP.

A request names raw ids (as in the scene logs); the scorer encodes them with the model's own
vocabularies (unknown users and items become out-of-vocabulary, and still get a score), takes the
user's behaviour sequence (the request's `history`, put in prepare's event order, or else the history
store's copy of the prepared sequence), cuts the history window of the request's moment from it with
`history_windows`, the function training cuts its windows with, and scores every candidate. Several
requests are scored in one forward pass, their windows cut in one call.
A client's mistake raises `RequestError`, naming the field. In a batch, each request fails alone: a
client's mistake or a fault of the server (`ScoringError`) is that request's result, never the others'.
A history store that cannot be reached (`HistoryUnavailable`) fails the requests that need it (no
`history` of their own); a request with its own history is still scored, its user side features then
padding (the store holds them). `ingest` validates and encodes new events (`POST /v1/events`) and hands
them to the store.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from msit.data.history import items_are_numbers, sorted_event_order
from msit.data.parse import normalize_key, normalize_keys
from msit.data.schema import (
    HISTORY_ITEM_IDS,
    HISTORY_LENGTH,
    HISTORY_SCENE_IDS,
    OOV,
    PAD,
    SCENE_ID,
    USER_ID,
    real_count,
    real_values,
    scene_slot,
)
from msit.data.sequences import Sequences, history_windows
from msit.data.vocab import encode_multi_value, standardised
from msit.evaluation.ranking import scene_catalogues
from msit.model.features import fields_of
from msit.model.model_dir import WEIGHTS_FILE, load_model_dir
from msit.model.output import score_in_chunks
from msit.serving.history_store import (
    Appended,
    HistoryStore,
    HistoryUnavailable,
    NewEvents,
    ReadOnlyHistory,
    UserRecord,
    items_numeric,
)

logger = logging.getLogger("msit.serving")
TOP_HISTORY = 5  # past events listed per candidate in an explanation
INT64_MAX = 2**63 - 1
MAX_Z_SCORE = 1e6  # numeric context values: at most this many standard deviations from the training mean
_READ = object()  # encode(): read the user's record from the store


class RequestError(ValueError):
    """A client's mistake: `field` is the path of the offending field in the request body."""

    def __init__(self, field: tuple[str | int, ...], message: str):
        super().__init__(message)
        self.field, self.message = field, message

    def __reduce__(self):  # crosses Ray Serve handles by pickle: keep both fields
        return RequestError, (self.field, self.message)


class ScoringError(RuntimeError):
    """Not the client's mistake: the server could not score this request (a 500 for it alone, logged)."""

    def __reduce__(self):
        return ScoringError, self.args


@dataclass
class Scored:
    scores: list[float]
    explanations: list[dict] | None = None
    oov_ids: int = 0  # unknown user/candidate ids in the request (they were scored as out-of-vocabulary)
    ids: int = 0


@dataclass
class _Encoded:
    """One request, encoded: what every candidate row shares, the user's sequence, and the candidates."""

    shared: dict[str, np.ndarray | np.generic]  # user, scene and context features of one row
    sequence: tuple[np.ndarray, ...]  # (E,) each: item, scene, label, timestamp of the user's events, event order
    now: int  # the request's moment: its window holds the events strictly before it
    item_ids: np.ndarray  # (C,)
    oov_ids: int
    ids: int
    explain: bool


def _key(value: Any) -> str:
    """`normalize_key` of an id the request schemas require (`schemas.Id`, never null), so never None."""
    return cast(str, normalize_key(value))


def _keys(values: list) -> list[str]:
    return cast(list[str], normalize_keys(values))


class Scorer:
    def __init__(
        self,
        model_dir: str | Path,
        store: HistoryStore | None = None,
        max_candidates: int = 1000,
        device: str | torch.device = "cpu",
        catalogue_from: str | Path | None = None,
    ):
        loaded = load_model_dir(model_dir, device)
        self.model, self.config, self.spec, self.info = loaded.model, loaded.config, loaded.spec, loaded.info
        self.device = torch.device(device)
        self.store, self.max_candidates = store, max_candidates
        self.model_dir = str(model_dir)
        self.version = hashlib.sha256((Path(model_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()[:12]
        self._vocabularies = {name: self.spec.vocabulary(name) for name in self.spec.vocabularies}
        self._index = {name: vocabulary.index() for name, vocabulary in self._vocabularies.items()}  # hash tables, once
        self._items = np.asarray(self.spec.vocabularies["item_id"], dtype=object)
        self.scenes = {name: i for i, name in self.spec.scene_names().items()}
        self._user_fields = [
            c for kind in ("categorical", "multi", "numeric") for c in fields_of(self.spec, "user", kind)
        ]
        self._context_fields = {c: f for c, f in self.spec.fields.items() if f.role == "context"}
        self._items_numeric = items_numeric(self.spec)  # how prepare broke ties between a user's events
        self.catalogues = _catalogues(catalogue_from) if catalogue_from else {}

    # -- encoding ------------------------------------------------------------------------------------------------

    # Raw values go through the data layer's own functions, as prepare encodes them: `parse.normalize_keys` (its
    # `keys` spelling), then the vocabulary's `encode` (the reserved ids of msit.data.schema).

    def _encode_ids(self, vocab: str, keys: list) -> np.ndarray:
        return self._encode_normalized(vocab, normalize_keys(list(keys)))

    def _encode_normalized(self, vocab: str, keys: Sequence[str | None]) -> np.ndarray:
        """User or item ids. An id is never missing in prepared data (prepare drops such rows): a request's empty
        id is one the model does not know, OOV rather than padding."""
        codes = self._vocabularies[vocab].encode(list(keys), self._index[vocab])
        return np.where(codes == PAD, OOV, codes)

    def _encode_feature(self, name: str, values: list) -> np.ndarray:
        """Categorical feature values: a missing or empty one is padding, as in prepare."""
        return self._vocabularies[name].encode(normalize_keys(list(values)), self._index[name])

    def _scene(self, name: Any, where: tuple) -> int:
        if name not in self.scenes:
            raise RequestError(where, f"unknown scenario {name!r}; the model knows {list(self.scenes)}")
        return self.scenes[name]

    def _context(self, context: dict[str, Any]) -> dict[str, np.ndarray | np.generic]:
        unknown = sorted(set(context) - set(self._context_fields))
        if unknown:
            raise RequestError(
                ("context", unknown[0]),
                f"unknown context feature {unknown[0]!r}; the model "
                f"reads {sorted(self._context_fields) or 'no context features'}",
            )
        out: dict[str, np.ndarray | np.generic] = {}
        for name, info in self._context_fields.items():
            value = context.get(name)
            if info.type == "numeric":
                out[name] = self._standardised(name, info, value)
            elif info.type == "multi":  # a list is one value's tokens, as prepare reads a Parquet list column
                sep = info.sep
                assert sep is not None  # a multi field's spec names its separator
                joined = sep.join(value) if isinstance(value, list) else value
                out[name] = encode_multi_value(
                    normalize_key(joined), sep, self._vocabularies[name], info.width, self._index[name]
                )
            else:
                out[name] = np.int64(self._encode_feature(name, [value])[0])
        return out

    @staticmethod
    def _standardised(name: str, info, value: Any) -> np.float32:
        """The model's input for a numeric context value: finite, and standardised within MAX_Z_SCORE (no value
        of a training set of under 10^12 rows lies further out; beyond, float32 arithmetic in the model may
        overflow into a NaN score)."""
        if value is None:
            return np.float32(0.0)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise RequestError(("context", name), f"context feature {name!r} must be a number, got {value!r:.40}")
        try:
            z = (float(value) - info.mean) / (info.std or 1.0)
        except OverflowError:  # an int beyond float's range
            z = float("inf")
        if not abs(z) <= MAX_Z_SCORE:  # also NaN
            raise RequestError(
                ("context", name),
                f"context feature {name!r} must be a finite number within "
                f"{MAX_Z_SCORE:g} standard deviations of its training mean (mean {info.mean:g}, "
                f"std {info.std:g}), got {value!r:.40}",
            )
        return standardised(np.array([float(value)]), {"mean": info.mean, "std": info.std or 1.0})[0]

    @staticmethod
    def _timestamp(value: Any, where: tuple) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
            raise RequestError(where, f"timestamp must be an integer from 0 to 2^63-1 (seconds), got {value!r:.40}")
        return value

    def _sequence(self, request: dict, record: UserRecord | None) -> tuple[np.ndarray, ...]:
        """The user's events in event order (item, scene, label, timestamp arrays): the request's `history`
        if it has one ([] is a real, empty history), else the store's record, else none."""
        if request.get("history") is None:
            if record is not None:
                return record.item_ids, record.scene_ids, record.labels, record.timestamps
            return tuple(np.zeros(0, dtype=np.int64) for _ in range(4))
        events = request["history"]
        keys = normalize_keys([e["item_id"] for e in events])
        items = self._encode_normalized("item_id", keys)
        scenes = np.array(
            [self._scene(e["scenario"], ("history", i, "scenario")) for i, e in enumerate(events)], dtype=np.int64
        )
        labels = np.array([int(e.get("label", 1)) for e in events], dtype=np.int64)
        stamps = np.array(
            [self._timestamp(e["timestamp"], ("history", i, "timestamp")) for i, e in enumerate(events)], dtype=np.int64
        )
        # The request lists them in any order: prepare's order (timestamp, ties by item key), so that ties
        # cut into the window as they do in training.
        items_keys = pa.array(keys, pa.string())
        numeric = self._items_numeric and items_are_numbers(items_keys)
        order = sorted_event_order(pa.array(np.zeros(len(events), np.int8)), pa.array(stamps), items_keys, numeric)
        return items[order], scenes[order], labels[order], stamps[order]

    def windows(self, encoded: list[_Encoded]) -> dict[str, torch.Tensor]:
        """The (R, N) history tensors of R encoded requests (N = the model's history_length), cut in one
        `history_windows` call over their sequences."""
        lengths = np.array([len(e.sequence[0]) for e in encoded], dtype=np.int64)
        sequences = Sequences.from_arrays(
            lengths, *(np.concatenate([e.sequence[i] for e in encoded]) for i in range(4))
        )
        return history_windows(
            sequences, torch.arange(len(encoded)), torch.tensor([e.now for e in encoded]), self.config.history_length
        )

    def _record(self, user_key: str, request: dict, record=_READ) -> UserRecord | None:
        """The user's record (`record`: already read, or the store's failure to read it). A store that cannot be
        reached fails a request that needs it; one with its own history goes on without the record."""
        if record is _READ:
            try:
                record = self.store.user(user_key) if self.store is not None else None
            except HistoryUnavailable as error:
                record = error
        if isinstance(record, HistoryUnavailable):
            if request.get("history") is None:
                raise record
            return None
        return record

    def _records(self, requests: list[dict]) -> list:
        """Each request's user record, read in one round trip where the store can (`users`); a store failure is
        every request's "record" (each then fails or goes on without it, `_record`)."""
        if self.store is None:
            return [None] * len(requests)
        keys = [_key(r["user_id"]) for r in requests]
        try:
            return self.store.users(keys) if hasattr(self.store, "users") else [self.store.user(k) for k in keys]
        except HistoryUnavailable as error:
            return [error] * len(requests)
        except Exception:  # noqa: BLE001  (e.g. a user id that does not normalise: each request meets its own error in encode)
            return [_READ] * len(requests)

    def encode(self, request: dict, record=_READ) -> _Encoded:
        """Raises RequestError for a client's mistake; unknown ids are not mistakes (they are out-of-vocabulary).
        `record`: the user's record if already read (None: the store has none), else it is read here."""
        candidates = request["candidates"]
        if not candidates:
            raise RequestError(("candidates",), "candidates is empty: give at least one item id")
        if len(candidates) > self.max_candidates:
            raise RequestError(
                ("candidates",), f"at most {self.max_candidates} candidates per request, got {len(candidates)}"
            )
        scene = self._scene(request["scenario"], ("scenario",))
        user_key = _key(request["user_id"])
        record = self._record(user_key, request, record)
        user_id = self._encode_ids("user_id", [user_key])[0]
        stamp = request.get("timestamp")  # 0 is a moment (1970), not "now"
        now = int(time.time()) if stamp is None else self._timestamp(stamp, ("timestamp",))
        sequence = self._sequence(request, record)
        shared: dict[str, np.ndarray | np.generic] = {
            USER_ID: np.int64(user_id),
            SCENE_ID: np.int64(scene),
            **self._context(request.get("context") or {}),
        }
        for name in self._user_fields:  # unknown users: padding, the "no value" of every feature
            info = self.spec.fields[name]
            default = (
                np.zeros(info.width, np.int64)
                if info.type == "multi"
                else np.float32(0.0)
                if info.type == "numeric"
                else np.int64(PAD)
            )
            shared[name] = record.features.get(name, default) if record is not None else default
        item_ids = self._encode_ids("item_id", candidates)
        oov = int((item_ids == OOV).sum()) + int(user_id == OOV)
        return _Encoded(shared, sequence, now, item_ids, oov, len(candidates) + 1, bool(request.get("explain")))

    # -- scoring -------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def score_encoded(self, encoded: list[_Encoded]) -> list[Scored | ScoringError]:
        """All requests in one pass: each request's user side (history window, user, scene, context) encoded
        once, and each of its candidates scored against it (the model's `encode_user` and `score`)."""
        if not encoded:
            return []
        counts = [len(e.item_ids) for e in encoded]
        batch = {
            name: torch.as_tensor(np.stack([np.asarray(e.shared[name]) for e in encoded])).to(self.device)
            for name in encoded[0].shared
        }
        windows = self.windows(encoded)  # (R, N) per request
        batch |= {name: values.to(self.device) for name, values in windows.items()}
        item_ids = np.zeros((len(encoded), max(counts)), dtype=np.int64)  # (R, C): padded with item 0
        for j, e in enumerate(encoded):
            item_ids[j, : len(e.item_ids)] = e.item_ids
        explain = any(e.explain for e in encoded)
        output = score_in_chunks(
            self.model, self.model.encode_user(batch), torch.as_tensor(item_ids).to(self.device), explain
        )
        scores = torch.sigmoid(output.logits.float()).cpu().numpy()  # (R, C)
        out: list[Scored | ScoringError] = []
        for j, (e, count) in enumerate(zip(encoded, counts, strict=True)):
            if not np.isfinite(scores[j, :count]).all():  # never a `score: null`; and it fails this request only
                out.append(ScoringError("the model gave a non-finite score for this request"))
                continue
            explanations = self._explain(output, j, count, self._history_keys(windows, j)) if e.explain else None
            out.append(Scored(scores[j, :count].tolist(), explanations, e.oov_ids, e.ids))
        return out

    def score(self, requests: list[dict]) -> list[Scored | RequestError | ScoringError]:
        """Each request's result: its scores, its RequestError, or a ScoringError. One bad request never fails
        the others: each is encoded alone, and if the merged forward pass fails, each request is scored alone."""
        records = self._records(requests)
        encoded = [_guarded(lambda pair: self.encode(*pair), pair) for pair in zip(requests, records, strict=True)]
        ready = [e for e in encoded if isinstance(e, _Encoded)]
        try:
            scored = self.score_encoded(ready)
        except Exception:
            logger.exception(f"a forward pass of {len(ready)} requests failed; scoring them one by one")
            scored = [_guarded(lambda e: self.score_encoded([e])[0], e) for e in ready]
        results = iter(scored)
        return [next(results) if isinstance(e, _Encoded) else e for e in encoded]

    def self_test(self) -> None:
        """Score one tiny request (an unknown user, one known item, the first scene); raise if that fails or gives a
        score that is not a probability. Run before a reloaded model is served, and by the health check."""
        items = self.spec.vocabularies["item_id"]
        request = {
            "user_id": "<msit-self-test>",
            "scenario": self.spec.scenarios[0],
            "candidates": real_values(items)[:1] or ["<msit-self-test>"],
            "timestamp": int(time.time()),
        }
        result = self.score_encoded([self.encode(request, record=None)])[0]  # not the store: it may be down
        if isinstance(result, ScoringError) or not all(0.0 <= s <= 1.0 for s in result.scores):
            raise ScoringError(f"the model's self-test failed: {result}")

    def _history_keys(self, windows: dict[str, torch.Tensor], j: int) -> list[tuple[str, str]]:
        """(item id, scenario) of each real slot of request j's window, most recent first."""
        k = int(windows[HISTORY_LENGTH][j])
        items, scenes = windows[HISTORY_ITEM_IDS][j, :k].tolist(), windows[HISTORY_SCENE_IDS][j, :k].tolist()
        return [(str(self._items[i]), self.spec.scenarios[scene_slot(s)]) for i, s in zip(items, scenes, strict=True)]

    def _explain(self, output, j: int, count: int, history_keys: list[tuple[str, str]]) -> list[dict]:
        """Per candidate of request j: the transfer attention over scenes, and the past events that weighed most."""
        if output.transfer_attention is None:
            return [{} for _ in range(count)]
        transfer = output.transfer_attention[j, :count].float().cpu().numpy()  # (C, S)
        behaviour = (
            None
            if output.behaviour_attention is None or not history_keys
            else output.behaviour_attention[j, :count].float().cpu().numpy()
        )  # (C, S, N)
        explanations = []
        for c in range(count):
            weights_by_scene = {s: float(w) for s, w in zip(self.spec.scenarios, transfer[c], strict=True)}
            item: dict[str, Any] = {"transfer_attention": weights_by_scene}
            if behaviour is not None:
                # An event's weight: its scene's transfer weight x its weight within that scene's interest.
                weights = (transfer[c][:, None] * behaviour[c]).sum(0)[: len(history_keys)]
                top = np.argsort(-weights, kind="stable")[:TOP_HISTORY]
                item["top_history"] = [
                    {
                        "item_id": history_keys[i][0],
                        "scenario": history_keys[i][1],
                        "position": int(i),
                        "weight": float(weights[i]),
                    }
                    for i in top
                ]
            explanations.append(item)
        return explanations

    def recommend(self, request: dict) -> tuple[list[dict], int]:
        """The top k of the scene's catalogue (items seen there in training); and the catalogue size."""
        scene = self._scene(request["scenario"], ("scenario",))
        catalogue = self.catalogues.get(scene, np.zeros(0, dtype=np.int64))
        record = self.store.user(_key(request["user_id"])) if self.store is not None else None
        if request.get("exclude_seen", True) and record is not None:
            catalogue = catalogue[~np.isin(catalogue, record.item_ids)]
        if len(catalogue) == 0:
            return [], 0
        probe = {**request, "candidates": [0], "explain": False}  # encodes everything but the items
        encoded = self.encode(probe, record)
        encoded.item_ids = catalogue
        scored = self.score_encoded([encoded])[0]
        if isinstance(scored, ScoringError):
            raise scored
        scores = np.asarray(scored.scores)
        top = np.argsort(-scores, kind="stable")[: request["k"]]
        return [{"item_id": str(self._items[catalogue[i]]), "score": float(scores[i])} for i in top], len(catalogue)

    def ingest(self, events: list[dict]) -> Appended:
        """Validate and encode every event (a RequestError names the first bad one: ("events", index, field)),
        then append them to the store, grouped by user: nothing of a batch with a bad event is applied. Event ids
        repeated within the batch count once; the store skips those it has seen."""
        if self.store is None or not hasattr(self.store, "append"):
            raise ReadOnlyHistory(
                "this deployment has no history store that takes events; serve with --history redis://HOST:PORT/DB"
            )
        rows = []  # (scene, label, timestamp, event id) of each event, validated
        for i, event in enumerate(events):
            where = ("events", i)
            scene = self._scene(event["scenario"], (*where, "scenario"))
            stamp = self._timestamp(event["timestamp"], (*where, "timestamp"))
            try:
                self._context(event.get("context") or {})  # validated; a sequence holds no context
            except RequestError as error:
                raise RequestError((*where, *error.field), error.message) from None
            label = event["label"]
            if label not in (0, 1) or isinstance(label, bool):
                raise RequestError((*where, "label"), f"label must be 0 or 1, got {label!r:.40}")
            event_id = event.get("event_id")
            rows.append((scene, int(label), stamp, None if event_id is None else str(event_id)))
        # Ids normalised and encoded once for the batch (per event, this was most of an ingest's time).
        user_keys = _keys([event["user_id"] for event in events])
        item_keys = _keys([event["item_id"] for event in events])
        item_ids = self._encode_normalized("item_id", item_keys)
        by_user: dict[str, list[int]] = {}
        seen_ids, duplicates = set(), 0
        for i, (user_key, (_, _, _, event_id)) in enumerate(zip(user_keys, rows, strict=True)):
            if event_id is not None:
                if (user_key, event_id) in seen_ids:
                    duplicates += 1
                    continue
                seen_ids.add((user_key, event_id))
            by_user.setdefault(user_key, []).append(i)
        if not by_user:
            return Appended(0, duplicates)
        user_ids = self._encode_normalized("user_id", list(by_user))
        batch = []
        for (user_key, picked), user_id in zip(by_user.items(), user_ids, strict=True):
            scenes, labels, stamps, ids = map(list, zip(*(rows[i] for i in picked), strict=True))
            batch.append(
                NewEvents(
                    user_key,
                    int(user_id),
                    item_ids[picked],
                    np.array(scenes, np.int64),
                    np.array(labels, np.int64),
                    np.array(stamps, np.int64),
                    [item_keys[i] for i in picked],
                    ids,
                )
            )
        appended = self.store.append(batch)
        appended.duplicates += duplicates
        return appended

    def store_health(self) -> dict:
        return (
            self.store.health()
            if self.store is not None and hasattr(self.store, "health")
            else {"kind": "none", "state": "ok", "writable": False}
        )

    def describe(self) -> dict:
        train = self.info.get("train", {})
        return {
            "version": self.version,
            "model_dir": self.model_dir,
            "family": self.config.family,
            "config": asdict(self.config),
            "scenarios": self.spec.scenarios,
            "counts": {
                "users": real_count(self.spec.vocabularies["user_id"]),
                "items": real_count(self.spec.vocabularies["item_id"]),
                "history_users": len(self.store) if isinstance(self.store, Sized) else None,
                "catalogue": {s: len(self.catalogues.get(i, [])) for s, i in self.scenes.items()},
            },
            "history_length": self.config.history_length,
            "history_store": self.store_health(),
            "trained": {k: train[k] for k in ("best_epoch", "best_val_auc") if k in train},
            "feature_spec_fingerprint": self.spec.fingerprint(),
        }


def _guarded(step, value):
    """step(value), or the request's error as its result: a RequestError as is, anything else a ScoringError."""
    try:
        return step(value)
    except (RequestError, HistoryUnavailable) as error:
        return error
    except Exception as error:
        logger.exception("a request failed to score")  # the traceback, not the request: no payload in logs
        return ScoringError(f"this request could not be scored ({type(error).__name__})")


def _catalogues(prepared_dir: str | Path) -> dict[int, np.ndarray]:
    table = pq.read_table(Path(prepared_dir) / "train", columns=["item_id", "scene_id"])
    return scene_catalogues({name: torch.from_numpy(np.array(table.column(name))) for name in table.column_names})
