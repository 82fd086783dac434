"""The HTTP API as a FastAPI app over a scoring backend. No Ray here: tests run it in process, and the
Ray Serve deployment (`msit.serving.deployment`) builds the same app on each replica.

    POST /v1/score      scores of candidate items for a user in a scene (optionally explained)
    POST /v1/recommend  the top k of the scene's catalogue
    POST /v1/events     new events of users, appended to their sequences in the history store
    GET  /v1/health     liveness, and the history store's state
    GET  /v1/model      model version, config, scenes, counts

A client's mistake gets a 4xx naming the field (422), a missing or wrong token 401, a body over the
limit 413; never a 5xx. A request the server fails to score gets a 500 of its own: the other requests of
its batch are answered. A history store that cannot be reached gets a 503 for the requests that need it
(a request with its own `history` is still scored); events posted to a deployment whose store is
read-only (the in-memory one) get a 409.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from msit.errors import ConfigError
from msit.serving.history_store import Appended, HistoryUnavailable, ReadOnlyHistory
from msit.serving.schemas import (
    EventsRequest,
    EventsResponse,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
    ScoreRequest,
    ScoreResponse,
)
from msit.serving.scorer import RequestError, Scored, ScoringError

logger = logging.getLogger("msit.serving")
TOKEN_ENV, TOKEN_FILE_ENV = "MSIT_SERVE_TOKEN", "MSIT_SERVE_TOKEN_FILE"
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


@dataclass
class ApiSettings:
    auth_token: str | None = None  # bearer token required on every /v1 route; None: no auth
    max_body_bytes: int = 1_000_000
    max_history: int = 1000  # events in a request's `history`
    max_events: int = 1000  # events in one POST /v1/events


def token_from_env(required: bool = False) -> str | None:
    """The bearer token from MSIT_SERVE_TOKEN, or from the file MSIT_SERVE_TOKEN_FILE names; None if neither.
    A variable set but empty, an unreadable or empty file, or (`required`) no token at all is a ConfigError:
    auth that was asked for never silently turns off."""
    token, path = os.environ.get(TOKEN_ENV), os.environ.get(TOKEN_FILE_ENV)
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{TOKEN_FILE_ENV}={path}: cannot read the token file ({e.strerror})") from None
    if token is not None and not token.strip():
        raise ConfigError(f"{TOKEN_ENV} / {TOKEN_FILE_ENV} is set but empty")
    if required and not token:
        raise ConfigError(
            f"a bearer token is required (require_token) but neither {TOKEN_ENV} nor {TOKEN_FILE_ENV} "
            "is set (a missing Secret?); refusing to serve without auth"
        )
    return token or None


class Backend(Protocol):
    version: str  # the latest model version seen (for logs); answers carry their own

    async def score(self, request: dict) -> tuple[str, Scored | RequestError | ScoringError]: ...

    async def recommend(self, request: dict) -> tuple[str, list[dict], int]: ...

    async def ingest(self, events: list[dict]) -> Appended: ...

    async def store_health(self) -> dict: ...

    async def current_version(self) -> str: ...

    async def describe(self) -> dict: ...


def _printable(value):
    """A string as JSON can carry it: a lone surrogate (from a `\\ud800` escape) would fail the response."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value


def _field_error(error: RequestError) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={
            "detail": [
                {
                    "loc": ["body", *map(_printable, error.field)],
                    "msg": _printable(error.message),
                    "type": "value_error",
                }
            ]
        },
    )


def create_app(backend: Backend, settings: ApiSettings) -> FastAPI:  # noqa: C901  (one nested handler per route)
    app = FastAPI(
        title="msit", description="Multi-scenario interest transfer: scoring and recommendations.", version="1"
    )

    async def authorize(credentials: Credentials) -> None:  # async: a sync dependency costs a thread hop
        if settings.auth_token is None:
            return
        if credentials is None or not hmac.compare_digest(
            credentials.credentials.encode(), settings.auth_token.encode()
        ):
            raise _Unauthorized()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        # pydantic's details, minus the echoed input: it may not be valid JSON (Infinity, NaN) and is payload.
        details = [
            {"loc": [_printable(part) for part in e["loc"]], "msg": _printable(e["msg"]), "type": e["type"]}
            for e in error.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": details})

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError) -> JSONResponse:
        return _field_error(error)

    @app.exception_handler(ScoringError)
    async def scoring_error(_: Request, error: ScoringError) -> JSONResponse:
        return JSONResponse(status_code=500, content={"detail": f"internal error: {error}"})

    @app.exception_handler(HistoryUnavailable)
    async def store_unavailable(_: Request, error: HistoryUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(error)}, headers={"Retry-After": "1"})

    @app.exception_handler(ReadOnlyHistory)
    async def read_only(_: Request, error: ReadOnlyHistory) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(error)})

    @app.exception_handler(_Unauthorized)
    async def unauthorized(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse(
            status_code=401, content={"detail": "missing or wrong bearer token"}, headers={"WWW-Authenticate": "Bearer"}
        )

    app.add_middleware(_LimitAndLog, max_body_bytes=settings.max_body_bytes, backend=backend)

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=[Depends(authorize)])
    async def score(body: ScoreRequest) -> JSONResponse:  # documented as ScoreResponse (response_model)
        if body.history is not None and len(body.history) > settings.max_history:
            raise RequestError(
                ("history",), f"at most {settings.max_history} history events per request, got {len(body.history)}"
            )
        version, result = await backend.score(body.model_dump())
        if isinstance(result, RequestError | ScoringError | HistoryUnavailable):
            raise result
        explanations: Sequence[dict | None] = (
            result.explanations if result.explanations else [None] * len(result.scores)
        )
        # Built as plain JSON: validating a response the scorer just made (as response_model would) costs
        # more than the rest of the route; ScoreResponse still documents it.
        return JSONResponse(
            {
                "model_version": version,
                "scores": [
                    {"item_id": str(item), "score": score, "explanation": explanation}
                    for item, score, explanation in zip(body.candidates, result.scores, explanations, strict=True)
                ],
            }
        )

    @app.post("/v1/recommend", response_model=RecommendResponse, dependencies=[Depends(authorize)])
    async def recommend(body: RecommendRequest) -> RecommendResponse:
        version, items, size = await backend.recommend(body.model_dump())
        return RecommendResponse(model_version=version, items=[ScoredItem(**i) for i in items], catalogue_size=size)

    @app.post("/v1/events", response_model=EventsResponse, dependencies=[Depends(authorize)])
    async def events(body: EventsRequest) -> EventsResponse:
        if len(body.events) > settings.max_events:
            raise RequestError(("events",), f"at most {settings.max_events} events per request, got {len(body.events)}")
        appended = await backend.ingest([e.model_dump() for e in body.events])
        return EventsResponse(applied=appended.applied, duplicates=appended.duplicates)

    @app.get("/v1/health", dependencies=[Depends(authorize)])
    async def health() -> dict:
        """200 while the model scores: "degraded" when the history store is unavailable (requests that bring their
        own history are still scored), so that a probe does not take every replica out for a store outage."""
        store = await backend.store_health()
        return {
            "status": "ok" if store["state"] == "ok" else "degraded",
            "model_version": await backend.current_version(),
            "history_store": store,
        }

    @app.get("/v1/model", dependencies=[Depends(authorize)])
    async def model() -> dict:
        return await backend.describe()

    return app


class _Unauthorized(Exception):
    pass


class _LimitAndLog:
    """413 for a body over the limit, declared (Content-Length) or streamed (chunked: counted as it is read);
    one structured, payload-free log line per request (no user ids, items or scores). Plain ASGI:
    Starlette's BaseHTTPMiddleware costs a task per request."""

    def __init__(self, app, max_body_bytes: int, backend: Backend):
        self.app, self.max_body_bytes, self.backend = app, max_body_bytes, backend
        self.too_big = f"request body over {max_body_bytes} bytes"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await JSONResponse(status_code=413, content={"detail": self.too_big})(scope, receive, send)

        received = 0

        async def receive_within_limit():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # FastAPI answers an HTTPException raised while reading the body
                raise HTTPException(413, self.too_big)
            return message

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive_within_limit, send_and_note)
        finally:
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    json.dumps(
                        {
                            "route": scope["path"],
                            "method": scope["method"],
                            "status": status,
                            "ms": round(1000 * (time.perf_counter() - started), 2),
                            "model_version": self.backend.version,
                        }
                    )
                )


class LocalBackend:
    """A backend scoring in the calling process, one request at a time (tests, debugging)."""

    def __init__(self, scorer):
        self.scorer, self.version = scorer, scorer.version

    async def score(self, request: dict) -> tuple[str, Scored | RequestError | ScoringError]:
        return self.version, self.scorer.score([request])[0]

    async def recommend(self, request: dict) -> tuple[str, list[dict], int]:
        return self.version, *self.scorer.recommend(request)

    async def ingest(self, events: list[dict]) -> Appended:
        return self.scorer.ingest(events)

    async def store_health(self) -> dict:
        return self.scorer.store_health()

    async def current_version(self) -> str:
        return self.version

    async def describe(self) -> dict:
        return {**self.scorer.describe(), "last_reload_error": None}
