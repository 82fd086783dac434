"""The HTTP API in process (FastAPI TestClient over a LocalBackend): routes, 4xx with the field named, auth, fuzz."""

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msit.data.feature_spec import FeatureSpec
from msit.serving.app import ApiSettings, LocalBackend, create_app
from msit.serving.history_store import InMemoryHistoryStore
from msit.serving.scorer import Scorer

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def scorer(small_model):
    model_dir, prepared = small_model
    store = InMemoryHistoryStore.from_prepared(prepared, FeatureSpec.load(prepared))
    return Scorer(model_dir, store, max_candidates=20, catalogue_from=prepared)


@pytest.fixture(scope="module")
def client(scorer):
    return TestClient(create_app(LocalBackend(scorer), ApiSettings(max_body_bytes=20_000)),
                      raise_server_exceptions=False)


@pytest.fixture(scope="module")
def known(scorer):
    items = scorer.spec.vocabularies["item_id"]
    user = next(iter(scorer.store._records))
    return {"user_id": user, "scenario": scorer.spec.scenarios[0], "candidates": [items[2], items[3], items[4]]}


def test_every_route(client, scorer, known):
    scored = client.post("/v1/score", json=known)
    assert scored.status_code == 200, scored.text
    body = scored.json()
    assert body["model_version"] == scorer.version
    assert [s["item_id"] for s in body["scores"]] == known["candidates"]
    assert [s["score"] for s in body["scores"]] == scorer.score([known])[0].scores

    explained = client.post("/v1/score", json={**known, "explain": True}).json()["scores"][0]["explanation"]
    assert sum(explained["transfer_attention"].values()) == pytest.approx(1.0, abs=1e-5)

    top = client.post("/v1/recommend", json={"user_id": known["user_id"], "scenario": known["scenario"], "k": 3})
    assert top.status_code == 200 and len(top.json()["items"]) == 3 and top.json()["catalogue_size"] > 3
    assert client.get("/v1/health").json() == {"status": "ok", "model_version": scorer.version}
    model = client.get("/v1/model").json()
    assert model["scenarios"] == scorer.spec.scenarios and model["counts"]["items"] > 0
    assert model["config"]["embed_dim"] == 16 and model["version"] == scorer.version
    assert client.get("/docs").status_code == 200 and "/v1/score" in client.get("/openapi.json").json()["paths"]


def test_unknown_ids_get_a_valid_answer(client, known):
    response = client.post("/v1/score", json={**known, "user_id": "stranger", "candidates": ["nope", 123456]})
    assert response.status_code == 200 and len(response.json()["scores"]) == 2


@pytest.mark.parametrize("change, field, message", [
    ({"scenario": "moon"}, ["body", "scenario"], "unknown scenario 'moon'"),
    ({"candidates": []}, ["body", "candidates"], "candidates is empty"),
    ({"candidates": ["1"] * 21}, ["body", "candidates"], "at most 20 candidates"),
    ({"candidates": "1,2"}, ["body", "candidates"], "list"),
    ({"candidates": [1.5]}, ["body", "candidates", 0], ""),
    ({"explain": "yes"}, ["body", "explain"], "boolean"),
    ({"timestamp": -5}, ["body", "timestamp"], "greater than or equal to 0"),
    ({"histroy": []}, ["body", "histroy"], "Extra inputs are not permitted"),
    ({"history": [{"item_id": "1", "scenario": "moon", "timestamp": 5}]}, ["body", "history", 0, "scenario"],
     "unknown scenario"),
    ({"history": [{"item_id": "1", "scenario": "x"}]}, ["body", "history", 0, "timestamp"], "Field required"),
    ({"context": {"weather": "rain"}}, ["body", "context", "weather"], "unknown context feature"),
])
def test_client_mistakes_get_422_naming_the_field(client, known, change, field, message):
    response = client.post("/v1/score", json={**known, **change})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"][: len(field)] == field and message in e["msg"] for e in errors), errors


def test_malformed_json_oversized_bodies_and_missing_fields(client, known):
    bad_json = client.post("/v1/score", content=b'{"user_id": 1,', headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["detail"][0]["type"] == "json_invalid"
    missing = client.post("/v1/score", json={"user_id": 1})
    assert missing.status_code == 422
    assert {e["loc"][-1] for e in missing.json()["detail"]} == {"scenario", "candidates"}
    huge = client.post("/v1/score", json={**known, "candidates": ["x" * 100] * 300})
    assert huge.status_code == 413 and "20000 bytes" in huge.json()["detail"]
    # Chunked, with no Content-Length to check up front: counted as it is read.
    streamed = client.post("/v1/score", content=iter([b'{"user_id": "' + b"x" * 15_000, b"x" * 15_000 + b'"}']),
                           headers={"content-type": "application/json"})
    assert streamed.request.headers.get("transfer-encoding") == "chunked"
    assert streamed.status_code == 413 and "20000 bytes" in streamed.json()["detail"]
    assert client.post("/v1/recommend", json={**known, "k": 0}).status_code == 422
    assert client.get("/v1/score").status_code == 405


def test_bearer_token_guards_every_v1_route(scorer, known):
    client = TestClient(create_app(LocalBackend(scorer), ApiSettings(auth_token=TOKEN)))
    recommend = {"user_id": known["user_id"], "scenario": known["scenario"], "k": 2}
    for method, path, body in (("post", "/v1/score", known), ("post", "/v1/recommend", recommend),
                               ("get", "/v1/health", None), ("get", "/v1/model", None)):
        kwargs = {"json": body} if body else {}
        assert getattr(client, method)(path, **kwargs).status_code == 401
        wrong = getattr(client, method)(path, headers={"Authorization": "Bearer nope"}, **kwargs)
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert getattr(client, method)(path, headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs).status_code == 200


def test_token_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    from msit.errors import ConfigError
    from msit.serving.app import token_from_env

    monkeypatch.delenv("MSIT_SERVE_TOKEN", raising=False)
    monkeypatch.delenv("MSIT_SERVE_TOKEN_FILE", raising=False)
    assert token_from_env() is None
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("MSIT_SERVE_TOKEN_FILE", str(tmp_path / "token"))
    assert token_from_env() == "from-file"
    monkeypatch.setenv("MSIT_SERVE_TOKEN", "from-env")
    assert token_from_env() == "from-env"
    monkeypatch.delenv("MSIT_SERVE_TOKEN")
    monkeypatch.setenv("MSIT_SERVE_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="MSIT_SERVE_TOKEN_FILE"):
        token_from_env()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_no_request_gets_a_5xx(client, known, data):
    """Arbitrary JSON, near-valid bodies with one field replaced, and raw bytes: always a 2xx or 4xx."""
    kind = data.draw(st.sampled_from(["arbitrary", "mutated", "bytes"]))
    path = data.draw(st.sampled_from(["/v1/score", "/v1/recommend"]))
    if kind == "bytes":
        response = client.post(path, content=data.draw(st.binary(max_size=200)),
                               headers={"content-type": "application/json"})
    else:
        body = data.draw(json_values) if kind == "arbitrary" else {
            **known, "k": 3, data.draw(st.sampled_from(["user_id", "scenario", "candidates", "history", "context",
                                                        "timestamp", "explain", "k", "exclude_seen"])): data.draw(
                json_values)}
        if path == "/v1/recommend" and isinstance(body, dict):
            body.pop("candidates", None)
        elif isinstance(body, dict):
            body.pop("k", None)
        response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (path, response.text)
