"""Ray Serve: the deployment over HTTP on the session's Ray, batching, a model swap that drops no request, a broken
model pushed under load and a poisoned request inside a loaded batch that fail no other request."""

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
from msit.model.model_dir import save_model_dir
from msit.serving.deployment import DEPLOYMENT, MsitScorer, build
from msit.serving.history_store import InMemoryHistoryStore
from msit.serving.scorer import RequestError, Scorer, ScoringError
from tests.serving_helpers import corrupt_weights, nan_weights

ARGS = {"num_cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}, "max_candidates": 100}


@pytest.fixture(scope="module")
def endpoint(small_model):
    from ray import serve

    model_dir, prepared = small_model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"model": str(model_dir), "data": str(prepared), **ARGS}), name="msit", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _request(prepared, count=3):
    spec = FeatureSpec.load(prepared)
    store = InMemoryHistoryStore.from_prepared(prepared, spec)
    user = next(iter(store))
    return {
        "user_id": user,
        "scenario": spec.scenarios[1],
        "candidates": spec.vocabularies["item_id"][2 : 2 + count],
        "timestamp": 2_000_000_000,
    }


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
    bodies = [
        {**body, "candidates": body["candidates"][: 1 + i % 3], "scenario": "moon" if i % 7 == 3 else body["scenario"]}
        for i in range(32)
    ]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: requests.post(f"{endpoint}/v1/score", json=b, timeout=30), bodies))
    for b, a in zip(bodies, answers, strict=True):
        if b["scenario"] == "moon":
            assert a.status_code == 422 and a.json()["detail"][0]["loc"] == ["body", "scenario"], a.text
        else:
            assert a.status_code == 200, a.text
            assert [s["score"] for s in a.json()["scores"]] == pytest.approx(offline.score([b])[0].scores, abs=1e-6)


class _Load:
    """Requests sent back to back from two threads until stopped; every status kept."""

    def __init__(self, url: str, body: dict):
        self.url, self.body, self.statuses, self.stop = url, body, [], threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(2)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.statuses.append(requests.post(self.url, json=self.body, timeout=60).status_code)
            except requests.RequestException as error:  # a lost request counts as a failure
                self.statuses.append(type(error).__name__)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        for t in self.threads:
            t.join()


def test_a_poisoned_request_inside_a_loaded_batch_fails_no_other(endpoint, small_model):
    """Requests that bypass the HTTP schema, sent straight to the scorers while HTTP load runs, so they share
    forward passes with other requests: each poisoned one fails alone, the good ones get the offline scores."""
    from ray import serve

    model_dir, prepared = small_model
    body = _request(prepared)
    offline = Scorer(model_dir, InMemoryHistoryStore.from_prepared(prepared, FeatureSpec.load(prepared)))
    expected = offline.score([body])[0].scores
    scene = body["scenario"]
    poisoned = [
        {**body, "candidates": ["\ud800"]},
        {**body, "timestamp": 2**64},
        {**body, "user_id": "\udfff"},
        {**body, "history": [{"item_id": "\ud800", "scenario": scene, "timestamp": 1}]},
    ]
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name="msit")
    with _Load(f"{endpoint}/v1/score", body) as load:
        calls = [handle.score_many.remote([body, p, body]) for p in poisoned for _ in range(3)]
        answers = [call.result(timeout_s=60)[1] for call in calls]
    for (good, bad, good_again), p in zip(answers, [p for p in poisoned for _ in range(3)], strict=True):
        assert isinstance(bad, ScoringError | RequestError), (p, bad)
        # Batches of other sizes may round differently in the last float32 bits: equal to 1e-6, not bitwise.
        assert good.scores == pytest.approx(expected, abs=1e-6)
        assert good_again.scores == pytest.approx(good.scores, abs=1e-6)
    assert load.statuses and set(load.statuses) == {200}, load.statuses


def test_a_new_model_directory_is_swapped_in_without_dropping_requests(endpoint, small_model, tmp_path):
    from ray import serve

    model_dir, prepared = small_model
    spec = FeatureSpec.load(prepared)
    second = save_model_dir(
        tmp_path / "second",
        build_for_data(ModelConfig(embed_dim=8, mlp_dims=(8,)), prepared, spec),
        ModelConfig(embed_dim=8, mlp_dims=(8,)),
        spec,
    )
    new_version = Scorer(second).version
    body, statuses, stop = _request(prepared), [], threading.Event()

    def load() -> None:
        while not stop.is_set():
            statuses.append(requests.post(f"{endpoint}/v1/score", json=body, timeout=60).status_code)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    serve.run(
        build({"model": str(model_dir), "data": str(prepared), **ARGS, "user_config": {"model": str(second)}}),
        name="msit",
        route_prefix="/",
    )
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


def _deploy_config(endpoint: str, model_dir, prepared, user_config: dict) -> None:
    """Deploy as `serve deploy serve/config.yaml` (and KubeRay) do: a config whose user_config alone changed is
    applied in place, each scorer replica's reconfigure() is called (serve.run would replace the replicas)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = {
        "name": "msit",
        "route_prefix": "/",
        "import_path": "serve.app:build",
        "args": {"model": str(model_dir), "data": str(prepared), **ARGS},
        "deployments": [{"name": DEPLOYMENT, "user_config": user_config}],
    }
    http = {"host": "127.0.0.1", "port": int(endpoint.rsplit(":", 1)[1])}
    _get_global_client().deploy_apps(ServeDeploySchema(http_options=http, applications=[app]), _blocking=True)


def test_a_broken_model_pushed_under_load_fails_no_request(endpoint, small_model, tmp_path):
    """Hot reload onto a model directory that does not load: the old model keeps serving, no request fails,
    and /v1/model says what went wrong."""
    model_dir, prepared = small_model
    broken = corrupt_weights(model_dir, tmp_path / "broken")
    _deploy_config(endpoint, model_dir, prepared, {"max_batch_size": 64})
    version = requests.get(f"{endpoint}/v1/model", timeout=10).json()["version"]
    assert version == Scorer(model_dir).version
    with _Load(f"{endpoint}/v1/score", _request(prepared)) as load:
        _deploy_config(endpoint, model_dir, prepared, {"max_batch_size": 64, "model": str(broken)})
        deadline = time.monotonic() + 120
        while (model := requests.get(f"{endpoint}/v1/model", timeout=10).json())["last_reload_error"] is None:
            assert time.monotonic() < deadline, "the failed reload was never reported"
            time.sleep(0.5)
        time.sleep(1)
    assert len(load.statuses) > 5 and set(load.statuses) == {200}, load.statuses
    assert model["version"] == version and model["last_reload_error"]["model"] == str(broken)
    assert model["last_reload_error"]["error"]
    assert requests.get(f"{endpoint}/v1/health", timeout=10).json()["model_version"] == version


def test_the_serve_config_file_names_a_working_builder():
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve" / "config.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "serve.app:build" and config["http_options"]["host"] == "127.0.0.1"
    assert config["http_options"]["request_timeout_s"] > 0  # a stuck request gets a 408, never hangs
    from serve.app import build as serve_build

    assert serve_build is build
    assert {d["name"] for d in app["deployments"]} == {"MsitScorer", "MsitApi"}


def test_a_reload_self_tests_the_new_model_and_keeps_the_old_one_if_it_fails(small_model, tmp_path):
    """The scorer deployment's reconfigure, in process: a model that loads but cannot score is never swapped in."""
    model_dir, prepared = small_model
    replica = MsitScorer.func_or_class(
        {
            "model": str(model_dir),
            "data": str(prepared),
            "max_candidates": 10,
            "max_batch_size": 8,
            "base_dir": str(tmp_path),
        }
    )
    version = replica.current_version()
    replica.reconfigure({"model": str(nan_weights(prepared, tmp_path / "nan"))})
    assert replica.current_version() == version  # still the old model
    error = replica.describe()["last_reload_error"]
    assert error["model"] == str(tmp_path / "nan") and "self-test failed" in error["error"], error
    replica.reconfigure({"model": str(corrupt_weights(model_dir, tmp_path / "corrupt"))})
    assert replica.describe()["last_reload_error"]["model"] == str(tmp_path / "corrupt")
    replica.reconfigure({"model": str(model_dir)})  # a good one again: the error clears
    assert replica.describe()["last_reload_error"] is None and replica.current_version() == version


def test_the_history_store_keeps_the_latest_events_asked_for_but_never_fewer_than_a_window(small_model, tmp_path):
    from msit.errors import ConfigError

    model_dir, prepared = small_model
    settings = {
        "model": str(model_dir),
        "data": str(prepared),
        "max_candidates": 10,
        "max_batch_size": 8,
        "base_dir": str(tmp_path),
    }
    window = Scorer(model_dir).config.history_length
    every = MsitScorer.func_or_class(settings).scorer.store
    capped = MsitScorer.func_or_class({**settings, "history_events_per_user": window}).scorer.store
    assert capped.events() == sum(min(len(every.user(u).item_ids), window) for u in every) < every.events()
    user = next(u for u in every if len(every.user(u).item_ids) > window)
    assert capped.user(user).timestamps.tolist() == every.user(user).timestamps[-window:].tolist()
    with pytest.raises(ConfigError, match=f"history_events_per_user {window - 1} is below the model's history_length"):
        MsitScorer.func_or_class({**settings, "history_events_per_user": window - 1})


def test_the_scorer_health_check_scores_a_request(small_model, tmp_path):
    import asyncio

    model_dir, prepared = small_model
    options = MsitScorer._deployment_config
    assert options.health_check_period_s == 10 and options.health_check_timeout_s == 30
    replica = MsitScorer.func_or_class(
        {
            "model": str(model_dir),
            "data": str(prepared),
            "max_candidates": 10,
            "max_batch_size": 8,
            "base_dir": str(tmp_path),
        }
    )
    asyncio.run(replica.check_health())
    replica.scorer.model = None  # a model that cannot score
    with pytest.raises(AttributeError, match="encode_user"):
        asyncio.run(replica.check_health())


def test_msit_serve_sets_a_request_timeout_and_the_request_bounds(monkeypatch, small_model):
    """`msit serve` flags reach Serve's proxy (request_timeout_s: a stuck request gets a 408) and the app."""
    from ray import serve

    from msit.cli import build_parser, start_serving

    model_dir, prepared = small_model
    started, ran = {}, {}
    monkeypatch.setattr(serve, "start", lambda http_options: started.update(http_options))
    monkeypatch.setattr(serve, "run", lambda app, **kwargs: ran.update(app=app))
    monkeypatch.delenv("MSIT_SERVE_TOKEN", raising=False)
    monkeypatch.delenv("MSIT_SERVE_TOKEN_FILE", raising=False)
    parser = build_parser()
    base = ["serve", "--model", str(model_dir), "--data", str(prepared), "--num-gpus", "0"]
    start_serving(parser.parse_args(base), str(model_dir), str(prepared))
    assert started == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 30.0}
    assert ran["app"]._bound_deployment.init_args[1]["history_events_per_user"] is None  # default: every event
    args = parser.parse_args(
        [*base, "--request-timeout-s", "5", "--max-history", "7", "--history-events-per-user", "20"]
    )
    start_serving(args, str(model_dir), str(prepared))
    assert started["request_timeout_s"] == 5.0
    settings = ran["app"]._bound_deployment.init_args[1]  # MsitApi(scorer, settings)
    assert settings["max_history"] == 7 and settings["history_events_per_user"] == 20
    from msit.errors import ConfigError

    with pytest.raises(ConfigError, match="refusing to serve without auth"):
        start_serving(parser.parse_args([*base, "--require-token"]), str(model_dir), str(prepared))
