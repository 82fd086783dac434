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
from tests.serving_helpers import NUMERIC_CONTEXT, numeric_context_model

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def scorer(small_model):
    model_dir, prepared = small_model
    store = InMemoryHistoryStore.from_prepared(prepared, FeatureSpec.load(prepared))
    return Scorer(model_dir, store, max_candidates=20, catalogue_from=prepared)


@pytest.fixture(scope="module")
def client(scorer):
    return TestClient(
        create_app(LocalBackend(scorer), ApiSettings(max_body_bytes=20_000)), raise_server_exceptions=False
    )


@pytest.fixture(scope="module")
def known(scorer):
    items = scorer.spec.vocabularies["item_id"]
    user = next(iter(scorer.store))
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
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["model_version"] == scorer.version
    assert health["history_store"] == {
        "kind": "in-memory",
        "state": "ok",
        "users": len(scorer.store),
        "writable": False,
    }
    model = client.get("/v1/model").json()
    assert model["scenarios"] == scorer.spec.scenarios and model["counts"]["items"] > 0
    assert model["config"]["embed_dim"] == 16 and model["version"] == scorer.version
    assert client.get("/docs").status_code == 200 and "/v1/score" in client.get("/openapi.json").json()["paths"]


def test_unknown_ids_get_a_valid_answer(client, known):
    response = client.post("/v1/score", json={**known, "user_id": "stranger", "candidates": ["nope", 123456]})
    assert response.status_code == 200 and len(response.json()["scores"]) == 2


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"scenario": "moon"}, ["body", "scenario"], "unknown scenario 'moon'"),
        ({"candidates": []}, ["body", "candidates"], "candidates is empty"),
        ({"candidates": ["1"] * 21}, ["body", "candidates"], "at most 20 candidates"),
        ({"candidates": "1,2"}, ["body", "candidates"], "list"),
        ({"candidates": [1.5]}, ["body", "candidates", 0], ""),
        ({"explain": "yes"}, ["body", "explain"], "boolean"),
        ({"timestamp": -5}, ["body", "timestamp"], "greater than or equal to 0"),
        ({"histroy": []}, ["body", "histroy"], "Extra inputs are not permitted"),
        (
            {"history": [{"item_id": "1", "scenario": "moon", "timestamp": 5}]},
            ["body", "history", 0, "scenario"],
            "unknown scenario",
        ),
        ({"history": [{"item_id": "1", "scenario": "x"}]}, ["body", "history", 0, "timestamp"], "Field required"),
        ({"context": {"weather": "rain"}}, ["body", "context", "weather"], "unknown context feature"),
    ],
)
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
    streamed = client.post(
        "/v1/score",
        content=iter([b'{"user_id": "' + b"x" * 15_000, b"x" * 15_000 + b'"}']),
        headers={"content-type": "application/json"},
    )
    assert streamed.request.headers.get("transfer-encoding") == "chunked"
    assert streamed.status_code == 413 and "20000 bytes" in streamed.json()["detail"]
    assert client.post("/v1/recommend", json={**known, "k": 0}).status_code == 422
    assert client.get("/v1/score").status_code == 405


def test_bearer_token_guards_every_v1_route(scorer, known):
    client = TestClient(create_app(LocalBackend(scorer), ApiSettings(auth_token=TOKEN)))
    recommend = {"user_id": known["user_id"], "scenario": known["scenario"], "k": 2}
    for method, path, body in (
        ("post", "/v1/score", known),
        ("post", "/v1/recommend", recommend),
        ("get", "/v1/health", None),
        ("get", "/v1/model", None),
    ):
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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_no_request_gets_a_5xx(client, known, data):
    """Arbitrary JSON, near-valid bodies with one field replaced, and raw bytes: always a 2xx or 4xx."""
    kind = data.draw(st.sampled_from(["arbitrary", "mutated", "bytes"]))
    path = data.draw(st.sampled_from(["/v1/score", "/v1/recommend"]))
    if kind == "bytes":
        response = client.post(
            path, content=data.draw(st.binary(max_size=200)), headers={"content-type": "application/json"}
        )
    else:
        body = (
            data.draw(json_values)
            if kind == "arbitrary"
            else {
                **known,
                "k": 3,
                data.draw(
                    st.sampled_from(
                        [
                            "user_id",
                            "scenario",
                            "candidates",
                            "history",
                            "context",
                            "timestamp",
                            "explain",
                            "k",
                            "exclude_seen",
                        ]
                    )
                ): data.draw(json_values),
            }
        )
        if path == "/v1/recommend" and isinstance(body, dict):
            body.pop("candidates", None)
        elif isinstance(body, dict):
            body.pop("k", None)
        response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (path, response.text)


SURROGATE = '"\\ud800"'  # a JSON escape Python's json reads into a lone UTF-16 surrogate


@pytest.mark.parametrize(
    "path, change, field",
    [
        ("/v1/score", {"candidates": ["@"]}, ["body", "candidates", 0]),
        ("/v1/score", {"user_id": "@"}, ["body", "user_id"]),
        ("/v1/score", {"scenario": "@"}, ["body", "scenario"]),
        ("/v1/score", {"context": {"hour": "@"}}, ["body", "context", "hour"]),
        ("/v1/score", {"context": {"hour": ["@"]}}, ["body", "context", "hour"]),
        (
            "/v1/score",
            {"history": [{"item_id": "@", "scenario": "x", "timestamp": 1}]},
            ["body", "history", 0, "item_id"],
        ),
        (
            "/v1/score",
            {"history": [{"item_id": 1, "scenario": "@", "timestamp": 1}]},
            ["body", "history", 0, "scenario"],
        ),
        ("/v1/recommend", {"user_id": "@"}, ["body", "user_id"]),
        ("/v1/recommend", {"scenario": "@"}, ["body", "scenario"]),
    ],
)
def test_a_lone_surrogate_is_a_422_naming_the_field(client, known, path, change, field):
    body = {**known, **change}
    if path == "/v1/recommend":
        body = {k: v for k, v in body.items() if k != "candidates"}
    text = json.dumps(body).replace('"@"', SURROGATE)
    response = client.post(path, content=text.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"][: len(field)] == field and "lone UTF-16 surrogate" in e["msg"] for e in errors), errors


def test_a_lone_surrogate_in_a_context_key_is_a_422_and_the_answer_is_valid_json(client, known):
    text = json.dumps({**known, "context": {"@": 1}}).replace('"@"', SURROGATE)
    response = client.post("/v1/score", content=text.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    # pydantic hands the key back with replacement characters: the answer stays valid UTF-8 JSON.
    assert error["loc"][:2] == ["body", "context"] and error["loc"][-1] == "[key]", error
    assert "lone UTF-16 surrogate" in error["msg"]


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"timestamp": 2**63}, ["body", "timestamp"], "less than or equal to 9223372036854775807"),
        ({"timestamp": 2**63 - 1}, None, None),  # the largest int64 is a valid moment
        (
            {"history": [{"item_id": 1, "scenario": "x", "timestamp": 2**64}]},
            ["body", "history", 0, "timestamp"],
            "less than or equal to 9223372036854775807",
        ),
        ({"context": {"hour": float("nan")}}, ["body", "context", "hour"], "finite number"),
        ({"context": {"hour": float("inf")}}, ["body", "context", "hour"], "finite number"),
    ],
)
def test_timestamps_are_int64_and_numbers_finite(client, known, change, field, message):
    response = client.post(
        "/v1/score",
        content=json.dumps({**known, **change}),  # NaN, Infinity as Python writes
        headers={"content-type": "application/json"},
    )
    if field is None:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"][: len(field)] == field and message in e["msg"] for e in errors), errors
    recommend = client.post(
        "/v1/recommend",
        content=json.dumps(
            {
                "user_id": known["user_id"],
                "scenario": known["scenario"],
                **{k: v for k, v in change.items() if k != "history"},
            }
        ),
        headers={"content-type": "application/json"},
    )
    assert recommend.status_code == (422 if "history" not in change else 200), recommend.text


def test_the_history_is_capped(scorer, known):
    assert ApiSettings().max_history == 1000
    client = TestClient(create_app(LocalBackend(scorer), ApiSettings(max_history=5)))
    event = {"item_id": known["candidates"][0], "scenario": known["scenario"], "timestamp": 100}
    assert client.post("/v1/score", json={**known, "history": [event] * 5}).status_code == 200
    response = client.post("/v1/score", json={**known, "history": [event] * 6})
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"loc": ["body", "history"], "type": "value_error", "msg": "at most 5 history events per request, got 6"}
    ]


def test_timestamp_zero_is_a_moment_over_http(client, known):
    at_zero = client.post("/v1/score", json={**known, "timestamp": 0}).json()["scores"]
    cold = client.post("/v1/score", json={**known, "timestamp": 0, "history": []}).json()["scores"]
    now = client.post("/v1/score", json=known).json()["scores"]
    assert at_zero == cold != now


@pytest.fixture(scope="module")
def numeric_client(small_model, tmp_path_factory):
    _, prepared = small_model
    model = numeric_context_model(prepared, tmp_path_factory.mktemp("numeric") / "model")
    return TestClient(
        create_app(LocalBackend(Scorer(model, catalogue_from=prepared)), ApiSettings()), raise_server_exceptions=False
    )


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e300", "1" + "0" * 400])
@pytest.mark.parametrize("path", ["/v1/score", "/v1/recommend"])
def test_a_numeric_context_value_must_be_finite_once_standardised(numeric_client, known, path, value):
    body = {
        "user_id": known["user_id"],
        "scenario": known["scenario"],
        "context": {NUMERIC_CONTEXT: "@"},
        **({"candidates": known["candidates"]} if path == "/v1/score" else {"k": 5}),
    }
    text = json.dumps(body).replace('"@"', value)
    response = numeric_client.post(path, content=text.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text  # before: a 500, or `score: null` for every item
    errors = response.json()["detail"]
    assert any(
        e["loc"][:3] == ["body", "context", NUMERIC_CONTEXT] and ("finite number" in e["msg"]) for e in errors
    ), errors
    fine = numeric_client.post(path, json={**body, "context": {NUMERIC_CONTEXT: 21.5}})
    assert fine.status_code == 200 and all(
        0 <= s["score"] <= 1 for s in fine.json().get("scores", fine.json().get("items"))
    )


def test_a_required_token_that_is_missing_or_empty_refuses_to_serve(tmp_path, monkeypatch, small_model):
    from msit.errors import ConfigError
    from msit.serving.app import token_from_env
    from msit.serving.deployment import build

    monkeypatch.delenv("MSIT_SERVE_TOKEN", raising=False)
    monkeypatch.delenv("MSIT_SERVE_TOKEN_FILE", raising=False)
    with pytest.raises(ConfigError, match="refusing to serve without auth"):
        token_from_env(required=True)
    model_dir, prepared = small_model
    args = {"model": str(model_dir), "data": str(prepared), "num_gpus": 0, "require_token": True}
    with pytest.raises(ConfigError, match="MSIT_SERVE_TOKEN nor MSIT_SERVE_TOKEN_FILE is set"):
        build(args)  # what deploy/rayservice.yaml gets without its Secret: the application does not start
    monkeypatch.setenv("MSIT_SERVE_TOKEN", "")  # a Secret whose key is empty
    with pytest.raises(ConfigError, match="set but empty"):
        build(args)
    (tmp_path / "token").write_text("\n")
    monkeypatch.delenv("MSIT_SERVE_TOKEN")
    monkeypatch.setenv("MSIT_SERVE_TOKEN_FILE", str(tmp_path / "token"))
    with pytest.raises(ConfigError, match="set but empty"):
        token_from_env()
    monkeypatch.setenv("MSIT_SERVE_TOKEN", "t0ken")
    assert token_from_env(required=True) == "t0ken" and build(args) is not None
