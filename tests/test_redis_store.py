"""The Redis history store against a real redis-server, and POST /v1/events through the app in process."""

import threading
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient

from msit.data.feature_spec import FeatureSpec
from msit.data.schema import scene_slot
from msit.serving.app import ApiSettings, LocalBackend, create_app
from msit.serving.history_store import InMemoryHistoryStore, NewEvents
from msit.serving.redis_store import RedisHistoryStore, redact
from msit.serving.scorer import Scorer
from tests.redis_helpers import RedisServer

EVENTS_PER_USER = 50


@pytest.fixture(scope="module")
def memory(small_model):
    _, prepared = small_model
    return InMemoryHistoryStore.from_prepared(prepared, FeatureSpec.load(prepared), events_per_user=EVENTS_PER_USER)


@pytest.fixture(scope="module")
def loaded(small_model, redis_server, memory):
    """A namespace of the session's Redis holding the prepared histories (one bulk load)."""
    model_dir, _ = small_model
    namespace = f"t{uuid.uuid4().hex[:8]}"
    store = RedisHistoryStore(redis_server.url, FeatureSpec.load(model_dir), EVENTS_PER_USER, namespace=namespace)
    assert store.load(memory, chunk=64, progress=False) == len(memory)
    return namespace


def _replica(small_model, url: str, namespace: str) -> tuple[Scorer, TestClient]:
    """A scorer replica of its own (its own Redis client) behind the app."""
    model_dir, prepared = small_model
    scorer = Scorer(model_dir, max_candidates=20, catalogue_from=prepared)
    scorer.store = RedisHistoryStore(url, scorer.spec, EVENTS_PER_USER, namespace=namespace)
    return scorer, TestClient(create_app(LocalBackend(scorer), ApiSettings()), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def replicas(small_model, redis_server, loaded):
    return [_replica(small_model, redis_server.url, loaded) for _ in range(2)]


def _same(a, b) -> bool:
    return (
        a.user_id == b.user_id
        and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("item_ids", "scene_ids", "labels", "timestamps"))
        and a.features.keys() == b.features.keys()
        and all(np.array_equal(a.features[k], b.features[k]) for k in a.features)
    )


def test_bulk_load_matches_the_in_memory_store_user_for_user(replicas, memory, small_model, redis_server, loaded):
    store = replicas[0][0].store
    keys = list(memory)
    for key, record in zip(keys, store.users(keys), strict=True):
        assert record is not None and _same(record, memory.user(key)), key
    assert sorted(store.scan_users()) == sorted(keys) and store.user("nobody") is None
    # Loading again changes nothing, never duplicates.
    RedisHistoryStore(redis_server.url, FeatureSpec.load(small_model[0]), EVENTS_PER_USER, namespace=loaded).load(
        memory, progress=False
    )
    assert _same(store.user(keys[0]), memory.user(keys[0]))


def test_loading_again_keeps_the_events_posted_since_the_snapshot(small_model, redis_server, memory):
    model_dir, _ = small_model
    spec = FeatureSpec.load(model_dir)
    namespace = f"t{uuid.uuid4().hex[:8]}"
    store = RedisHistoryStore(redis_server.url, spec, EVENTS_PER_USER, namespace=namespace)
    store.load(memory, progress=False)
    user, items = list(memory)[3], spec.vocabularies["item_id"]
    snapshot = memory.user(user)
    # One event after the snapshot, one in the middle of it (a late event), both with ids.
    middle = int(snapshot.timestamps[len(snapshot.timestamps) // 2])
    posted = [
        NewEvents(
            user,
            snapshot.user_id,
            np.array([4, 6]),
            np.array([2, 3]),
            np.array([1, 0]),
            np.array([int(snapshot.timestamps[-1]) + 10, middle]),
            [str(items[4]), str(items[6])],
            ["late-1", "late-2"],
        )
    ]
    assert store.append(posted).applied == 2
    with_posted = store.user(user)
    assert len(with_posted.item_ids) == min(len(snapshot.item_ids) + 2, EVENTS_PER_USER)

    assert store.load(memory, chunk=7, progress=False) == len(memory)  # the snapshot again
    assert _same(store.user(user), with_posted), "the load dropped or moved events posted since the snapshot"
    other = next(iter(memory))
    assert _same(store.user(other), memory.user(other))  # the others are the snapshot's
    assert store.append(posted).duplicates == 2  # their event ids were kept too


def _raw_history(scorer: Scorer, record) -> list[dict]:
    items = scorer.spec.vocabularies["item_id"]
    return [
        {
            "item_id": items[i],
            "scenario": scorer.spec.scenarios[scene_slot(s)],
            "label": int(label),
            "timestamp": int(t),
        }
        for i, s, label, t in zip(record.item_ids, record.scene_ids, record.labels, record.timestamps, strict=True)
    ]


def test_posted_events_change_the_next_score_as_the_same_events_in_the_request_history_would(replicas, memory):
    (scorer, client), (_, other) = replicas
    items, scenes = scorer.spec.vocabularies["item_id"], scorer.spec.scenarios
    user = list(memory)[1]
    before = _raw_history(scorer, scorer.store.user(user))
    last = before[-1]["timestamp"]
    # One event ties with the stored last event (ordered by item key), one is later, one has an unknown item.
    new = [
        {"user_id": user, "item_id": items[5], "scenario": scenes[-1], "label": 1, "timestamp": last + 100},
        {"user_id": user, "item_id": items[3], "scenario": scenes[0], "label": 0, "timestamp": last},
        {"user_id": user, "item_id": "never-seen", "scenario": scenes[0], "label": 1, "timestamp": last + 50},
    ]
    request = {"user_id": user, "scenario": scenes[0], "candidates": items[2:8], "timestamp": last + 1000}
    score_before = client.post("/v1/score", json=request).json()["scores"]

    posted = client.post("/v1/events", json={"events": new})
    assert posted.status_code == 200 and posted.json() == {"applied": 3, "duplicates": 0}
    with_history = client.post(
        "/v1/score",
        json={
            **request,
            "history": before + [{k: e[k] for k in ("item_id", "scenario", "label", "timestamp")} for e in new],
        },
    ).json()["scores"]
    for replica in (client, other):  # the other replica sees them as well
        after = replica.post("/v1/score", json=request).json()["scores"]
        assert after == with_history and after != score_before
    assert len(scorer.store.user(user).item_ids) == min(len(before) + 3, EVENTS_PER_USER)
    top = other.post("/v1/recommend", json={"user_id": user, "scenario": scenes[-1], "k": 50}).json()["items"]
    assert items[5] not in [i["item_id"] for i in top]  # exclude_seen reads the new events too


def test_a_new_user_gets_a_record_and_event_ids_apply_once(replicas):
    (scorer, client), (_, other) = replicas
    items, scene = scorer.spec.vocabularies["item_id"], scorer.spec.scenarios[0]
    event = {
        "user_id": "fresh-user",
        "item_id": items[2],
        "scenario": scene,
        "label": 1,
        "timestamp": 10,
        "event_id": "e1",
    }
    assert client.post("/v1/events", json={"events": [event, event]}).json() == {"applied": 1, "duplicates": 1}
    assert other.post("/v1/events", json={"events": [event]}).json() == {"applied": 0, "duplicates": 1}
    record = scorer.store.user("fresh-user")
    assert record.user_id == 1 and record.item_ids.tolist() == [2] and record.features == {}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"scenario": "moon"}, ["body", "events", 1, "scenario"]),
        ({"label": 2}, ["body", "events", 1, "label"]),
        ({"timestamp": -1}, ["body", "events", 1, "timestamp"]),
        ({"context": {"weather": "rain"}}, ["body", "events", 1, "context", "weather"]),
        ({"item": "x"}, ["body", "events", 1, "item"]),
    ],
)
def test_a_bad_event_gets_422_naming_its_index_and_field_and_nothing_is_applied(replicas, memory, change, field):
    scorer, client = replicas[0]
    user = list(memory)[2]
    before = scorer.store.user(user)
    good = {
        "user_id": user,
        "item_id": scorer.spec.vocabularies["item_id"][2],
        "scenario": scorer.spec.scenarios[0],
        "label": 1,
        "timestamp": 5,
    }
    response = client.post("/v1/events", json={"events": [good, {**good, **change}]})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == field
    assert _same(scorer.store.user(user), before)


def test_concurrent_appends_to_one_user_lose_nothing(small_model, redis_server, loaded):
    model_dir, _ = small_model
    spec = FeatureSpec.load(model_dir)
    stores = [RedisHistoryStore(redis_server.url, spec, 1000, namespace=loaded) for _ in range(4)]

    def post(store: RedisHistoryStore, writer: int) -> None:
        for i in range(25):
            store.append(
                [
                    NewEvents(
                        "contended",
                        1,
                        np.array([2]),
                        np.array([2]),
                        np.array([1]),
                        np.array([writer * 1000 + i]),
                        [str(spec.vocabularies["item_id"][2])],
                        [None],
                    )
                ]
            )

    threads = [threading.Thread(target=post, args=(s, w)) for w, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stamps = stores[0].user("contended").timestamps
    assert sorted(stamps.tolist()) == [w * 1000 + i for w in range(4) for i in range(25)]
    assert (np.diff(stamps) >= 0).all()


def test_the_in_memory_store_refuses_events_with_409(small_model, memory):
    model_dir, prepared = small_model
    client = TestClient(
        create_app(LocalBackend(Scorer(model_dir, memory, catalogue_from=prepared)), ApiSettings()),
        raise_server_exceptions=False,
    )
    scene = FeatureSpec.load(prepared).scenarios[0]
    response = client.post(
        "/v1/events", json={"events": [{"user_id": "u", "item_id": "i", "scenario": scene, "label": 1, "timestamp": 1}]}
    )
    assert response.status_code == 409 and "--history redis://" in response.json()["detail"]
    assert client.get("/v1/health").json()["history_store"]["kind"] == "in-memory"


def test_redis_down_gives_503_then_serving_recovers(small_model, memory, tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        model_dir, _ = small_model
        RedisHistoryStore(server.url, FeatureSpec.load(model_dir), EVENTS_PER_USER).load(memory, progress=False)
        scorer, client = _replica(small_model, server.url, "msit")
        user = next(iter(memory))
        request = {
            "user_id": user,
            "scenario": scorer.spec.scenarios[0],
            "candidates": scorer.spec.vocabularies["item_id"][2:5],
            "timestamp": 10**9,
        }
        event = {
            "user_id": user,
            "item_id": request["candidates"][0],
            "scenario": request["scenario"],
            "label": 1,
            "timestamp": 10**9 - 5,
        }
        expected = client.post("/v1/score", json=request)
        assert expected.status_code == 200 and client.get("/v1/health").json()["status"] == "ok"

        server.stop()
        for method, route, body in (
            ("post", "/v1/score", request),
            ("post", "/v1/events", {"events": [event]}),
            ("post", "/v1/recommend", {"user_id": user, "scenario": request["scenario"]}),
        ):
            response = getattr(client, method)(route, json=body)
            assert response.status_code == 503 and "history store" in response.json()["detail"], response.text
        own_history = [{k: v for k, v in event.items() if k != "user_id"}]
        own = client.post("/v1/score", json={**request, "history": own_history})
        assert own.status_code == 200  # a request with its own history is still scored
        health = client.get("/v1/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["history_store"]["state"] == "unavailable"

        server.start()  # same port, empty: load again, as an operator would after losing a Redis without persistence
        RedisHistoryStore(server.url, FeatureSpec.load(model_dir), EVENTS_PER_USER).load(memory, progress=False)
        assert client.get("/v1/health").json()["status"] == "ok"
        assert client.post("/v1/score", json=request).json() == expected.json()
        assert client.post("/v1/events", json={"events": [event]}).status_code == 200
    finally:
        server.stop()


def test_passwords_never_appear_in_messages():
    assert redact("redis://:hunter2@db:6379/0") == "redis://:***@db:6379/0"
    assert redact("redis://user:hunter2@db/1") == "redis://user:***@db/1"
    assert redact("redis://db:6379/0") == "redis://db:6379/0"
