"""Ray Serve: the deployment over HTTP on the session's Ray, batching, and a model swap that drops no request."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from msit.data.feature_spec import FeatureSpec
from msit.model import ModelConfig, build_for_data
from msit.model_dir import save_model_dir
from msit.serving.deployment import build
from msit.serving.history_store import InMemoryHistoryStore
from msit.serving.scorer import Scorer


@pytest.fixture(scope="module")
def endpoint(small_model):
    from ray import serve

    model_dir, prepared = small_model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"model": str(model_dir), "data": str(prepared), "max_candidates": 100, "num_cpus": 0.5,
                     "autoscaling": {"min_replicas": 1, "max_replicas": 1}}), name="msit", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _request(prepared, count=3):
    spec = FeatureSpec.load(prepared)
    store = InMemoryHistoryStore.from_prepared(prepared, spec)
    user = next(iter(store._records))
    return {"user_id": user, "scenario": spec.scenarios[1], "candidates": spec.vocabularies["item_id"][2:2 + count],
            "timestamp": 2_000_000_000}


def test_the_endpoint_serves_the_offline_scores_and_batches_concurrent_requests(endpoint, small_model):
    model_dir, prepared = small_model
    body = _request(prepared)
    offline = Scorer(model_dir, InMemoryHistoryStore.from_prepared(prepared, FeatureSpec.load(prepared)))
    response = requests.post(f"{endpoint}/v1/score", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert [s["score"] for s in response.json()["scores"]] == pytest.approx(offline.score([body])[0].scores, abs=1e-6)
    assert requests.get(f"{endpoint}/v1/health", timeout=10).json()["model_version"] == offline.version
    assert requests.post(f"{endpoint}/v1/score", json={**body, "scenario": "moon"}, timeout=10).status_code == 422

    # Concurrent requests with different candidate lists (batched, and the batches merged) each get their own
    # answer; a bad request among them gets its 422 without failing the others.
    bodies = [{**body, "candidates": body["candidates"][: 1 + i % 3], "scenario": "moon" if i % 7 == 3 else
               body["scenario"]} for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: requests.post(f"{endpoint}/v1/score", json=b, timeout=30), bodies))
    for b, a in zip(bodies, answers, strict=True):
        if b["scenario"] == "moon":
            assert a.status_code == 422 and a.json()["detail"][0]["loc"] == ["body", "scenario"], a.text
        else:
            assert a.status_code == 200, a.text
            assert [s["score"] for s in a.json()["scores"]] == pytest.approx(offline.score([b])[0].scores, abs=1e-6)


def test_a_new_model_directory_is_swapped_in_without_dropping_requests(endpoint, small_model, tmp_path):
    from ray import serve

    model_dir, prepared = small_model
    spec = FeatureSpec.load(prepared)
    second = save_model_dir(tmp_path / "second", build_for_data(ModelConfig(embed_dim=8, mlp_dims=(8,)), prepared,
                                                                spec), ModelConfig(embed_dim=8, mlp_dims=(8,)), spec)
    new_version = Scorer(second).version
    body, statuses, stop = _request(prepared), [], threading.Event()

    def load() -> None:
        while not stop.is_set():
            statuses.append(requests.post(f"{endpoint}/v1/score", json=body, timeout=60).status_code)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    serve.run(build({"model": str(model_dir), "data": str(prepared), "max_candidates": 100, "num_cpus": 0.5,
                     "autoscaling": {"min_replicas": 1, "max_replicas": 1}, "user_config": {"model": str(second)}}),
              name="msit", route_prefix="/")
    deadline = time.monotonic() + 120
    while requests.get(f"{endpoint}/v1/model", timeout=10).json()["version"] != new_version:
        assert time.monotonic() < deadline, "the new model was never served"
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    assert len(statuses) > 5 and set(statuses) == {200}, statuses
    assert requests.get(f"{endpoint}/v1/model", timeout=10).json()["config"]["embed_dim"] == 8


def test_the_serve_config_file_names_a_working_builder():
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve" / "config.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "serve.app:build" and config["http_options"]["host"] == "127.0.0.1"
    from serve.app import build as serve_build

    assert serve_build is build
    assert {d["name"] for d in app["deployments"]} == {"MsitScorer", "MsitApi"}
