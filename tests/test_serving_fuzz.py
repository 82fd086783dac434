"""A property-based fuzz test of the HTTP API driven by its own OpenAPI schema, in process (no Ray).

The bodies follow the schema the app publishes (every route with a JSON body, every field, nested history
events and context maps). Each value is usually a plausible one (real scene names, ids and context feature
names, in-range numbers), so that many requests get past the schema into the scorer, and now and then a
hostile one: a lone UTF-16 surrogate in a string, an integer far beyond int64, NaN / Infinity / 1e300 where a
number goes, a wrong type; sometimes a field is missing or unknown. Whatever is sent, the answer is never a
5xx, is valid JSON, and a 200 carries only probabilities.
"""

import json
import math

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from msit.data.feature_spec import FeatureSpec
from msit.serving.app import ApiSettings, LocalBackend, create_app
from msit.serving.history_store import InMemoryHistoryStore
from msit.serving.scorer import Scorer
from tests.serving_helpers import NUMERIC_CONTEXT, numeric_context_model

SURROGATES = ["\ud800", "\udfff", "\udbff", "a\udc00b"]
EXTREME_INTS = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**300)]
EXTREME_FLOATS = [math.nan, math.inf, -math.inf, 1e300, -1e300, 1.7976931348623157e308, 5e-324, -0.0, 3.4e38]


def _mostly(valid, hostile):
    """`valid` nine times in ten, else `hostile`: a request of a few fields then has a fair chance to pass."""
    return st.integers(0, 9).flatmap(lambda i: hostile if i == 0 else valid)


@pytest.fixture(scope="module")
def app_and_words(small_model, tmp_path_factory):
    """The app over a model with a numeric context feature, and the words that get a request past the schema."""
    _, prepared = small_model
    model = numeric_context_model(prepared, tmp_path_factory.mktemp("fuzz") / "model")
    spec = FeatureSpec.load(prepared)
    store = InMemoryHistoryStore.from_prepared(prepared, spec)
    scorer = Scorer(model, store, max_candidates=20, catalogue_from=prepared)
    client = TestClient(
        create_app(LocalBackend(scorer), ApiSettings(max_body_bytes=100_000, max_history=20)),
        raise_server_exceptions=False,
    )
    context = [c for c, f in scorer.spec.fields.items() if f.role == "context"]
    assert NUMERIC_CONTEXT in context
    words = {
        "text": [
            *spec.scenarios,
            *spec.vocabularies["item_id"][2:6],
            *list(store)[:3],
            *spec.vocabularies["hour"][2:4],
        ],
        "keys": context,
    }
    return client, words


def _hostile_text():
    return st.text(max_size=8) | st.builds(
        lambda a, s, b: a + s + b, st.text(max_size=3), st.sampled_from(SURROGATES), st.text(max_size=3)
    )


def _any_json():
    leaves = (
        st.none()
        | st.booleans()
        | st.sampled_from(EXTREME_INTS)
        | st.integers()
        | st.sampled_from(EXTREME_FLOATS)
        | st.floats()
        | _hostile_text()
    )
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_hostile_text(), inner, max_size=3),
        max_leaves=6,
    )


def from_schema(schema: dict, components: dict, words: dict[str, list[str]], depth: int = 0):  # noqa: C901  (one branch per JSON Schema keyword)
    """Values shaped like `schema` (OpenAPI 3.1 JSON Schema), hostile in every leaf; sometimes anything at all."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].split("/")[-1]], components, words, depth)
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s, components, words, depth) for s in schema.get("anyOf", schema.get("oneOf"))])
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        return _mostly(st.sampled_from(values), st.sampled_from(EXTREME_INTS) | _any_json())
    kind = schema.get("type")
    if kind == "object":
        properties, required = schema.get("properties", {}), set(schema.get("required", []))
        if not properties:  # a map: context
            values = from_schema(schema.get("additionalProperties") or {}, components, words, depth + 1)
            return st.dictionaries(_mostly(st.sampled_from(words["keys"]), _hostile_text()), values, max_size=3)
        fields = {name: from_schema(s, components, words, depth + 1) for name, s in properties.items()}
        optional = sorted(set(properties) - required)

        @st.composite
        def build(draw):
            out = {name: draw(fields[name]) for name in properties if name in required}
            for name in draw(st.lists(st.sampled_from(optional), unique=True)) if optional else []:
                out[name] = draw(fields[name])
            if draw(st.integers(0, 19)) == 0:  # a misspelt or unknown field
                out[draw(_hostile_text())] = draw(_any_json())
            if required and draw(st.integers(0, 19)) == 0:  # a required field missing
                out.pop(draw(st.sampled_from(sorted(required))), None)
            return out

        return build()
    if kind == "array":
        items = from_schema(schema.get("items", {}), components, words, depth + 1)
        return st.lists(items, max_size=4 if depth < 2 else 2)
    if kind == "string":
        return _mostly(st.sampled_from(words["text"]), _hostile_text() | _any_json())
    if kind == "integer":
        low, high = schema.get("minimum", 0), schema.get("maximum", 2 * 10**9)
        return _mostly(st.integers(low, high), st.sampled_from(EXTREME_INTS) | st.integers() | _any_json())
    if kind == "number":
        return _mostly(st.floats(-100, 100), st.sampled_from(EXTREME_FLOATS) | st.floats() | _any_json())
    if kind == "boolean":
        return _mostly(st.booleans(), _any_json())
    if kind == "null":
        return st.none()
    return _any_json()  # no type given: anything


def _operations(openapi: dict) -> list[tuple[str, str, dict | None]]:
    out = []
    for path, methods in openapi["paths"].items():
        for method, operation in methods.items():
            content = operation.get("requestBody", {}).get("content", {}).get("application/json")
            out.append((method, path, content["schema"] if content else None))
    return out


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_fuzz_over_the_openapi_schema_finds_no_5xx(app_and_words, data):
    client, words = app_and_words
    openapi = client.get("/openapi.json").json()
    operations = _operations(openapi)
    assert {("post", "/v1/score"), ("post", "/v1/recommend")} <= {(m, p) for m, p, s in operations if s}
    method, path, schema = data.draw(st.sampled_from(operations))
    if schema is None:
        response = getattr(client, method)(path)
    else:
        body = data.draw(from_schema(schema, openapi["components"]["schemas"], words))
        # Python's json writes NaN / Infinity and escapes lone surrogates as \ud800: what a client may send.
        response = client.request(method, path, content=json.dumps(body), headers={"content-type": "application/json"})
    event(f"{method} {path} {response.status_code}")  # --hypothesis-show-statistics: how many got past the schema
    assert response.status_code < 500, (method, path, response.status_code, response.text)
    answer = json.loads(response.content.decode("utf-8"))  # valid UTF-8 JSON, never NaN
    if response.status_code == 200 and path in ("/v1/score", "/v1/recommend"):
        scores = [s["score"] for s in answer.get("scores", answer.get("items", []))]
        assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores), answer
