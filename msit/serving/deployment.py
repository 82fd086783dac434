"""The Ray Serve edge: two deployments.

- `MsitApi` replicas serve the FastAPI app of `msit.serving.app` and batch concurrent requests
  (`@serve.batch`): one call to a scorer per batch, not per request, since each call costs more CPU
  than scoring a request does. A batch whose scorer replica died is sent again to another one, so
  a lost replica costs latency, not answers.
- `MsitScorer` replicas hold a Scorer: a batch in one forward pass, hot reload of a new model
  directory through `user_config`, request metrics on Ray's Prometheus endpoint. They autoscale and
  take the GPUs. A reload loads and self-tests the new model before swapping it in; if that fails,
  the old model keeps serving and `/v1/model` shows the error. Serve's health check scores a tiny
  request on each replica (without the history store: a Redis outage must not restart replicas).

The history store is in memory by default (each scorer replica loads the prepared sequences, read-only)
or, with `history: redis://HOST:PORT/DB`, one Redis every replica reads and `POST /v1/events` writes
(`msit.serving.redis_store`; fill it first with `msit history load`).

`build(args)` is the application builder named in serve/config.yaml (`serve run serve/config.yaml`)
and used by `msit serve`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram

from msit.allocator import keep_freed_memory
from msit.config import absolute_path, from_dict
from msit.errors import ConfigError
from msit.serving.app import ApiSettings, create_app, token_from_env
from msit.serving.history_store import Appended, HistoryUnavailable, InMemoryHistoryStore, ReadOnlyHistory
from msit.serving.redis_store import DEFAULT_EVENTS_PER_USER, RedisHistoryStore, is_redis_url, redact
from msit.serving.scorer import RequestError, Scored, Scorer, ScoringError

logger = logging.getLogger("msit.serving")
DEPLOYMENT, INGRESS = "MsitScorer", "MsitApi"
RETRIES = 2  # further attempts for a batch whose scorer replica died
# Batches one ingress replica has in flight: one computing and one queued per scorer replica keeps them
# busy; the queued one is received while the other computes.
CONCURRENT_BATCHES = 4
TARGET_ONGOING_BATCHES = 2  # autoscaling target per scorer replica: one batch computing, one queued
# Ray Serve's throughput mode (Ray >= 2.56), set in the replicas' own environment so that it needs nothing
# from the cluster: gRPC between the ingress and the scorers, user code on the replica's event loop (no
# thread hop per request), buffered request logs. Direct ingress (replicas serving HTTP on their own ports,
# meant to sit behind HAProxy) stays off: clients keep talking to the proxy's host and port.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


@dataclass
class ServeArgs:
    """The application's arguments (serve/config.yaml `args`, or `msit serve` flags)."""

    model: str  # model directory
    data: str  # its prepared directory: the history store and the scene catalogues come from it
    max_candidates: int = 1000
    max_batch_size: int = 64  # requests scored in one forward pass
    batch_wait_timeout_s: float = 0.005
    max_body_bytes: int = 1_000_000
    max_history: int = 1000  # events in a request's `history` (a 422 beyond)
    # Events per user the history store keeps (the latest; None: all). At least the model's history_length, so that
    # a request "now" sees its whole window; fewer events only cut windows of requests timestamped in the past.
    history_events_per_user: int | None = None
    # Where users' histories live: None (in memory, from `data`; read-only) or redis://HOST:PORT/DB (shared by the
    # replicas, takes POST /v1/events; password from MSIT_REDIS_PASSWORD / MSIT_REDIS_PASSWORD_FILE). With Redis,
    # history_events_per_user bounds each user's sequence there (default 1000).
    history: str | None = None
    history_namespace: str = "msit"  # Redis key prefix (with the feature spec's fingerprint): one per deployment
    max_events: int = 1000  # events in one POST /v1/events (a 422 beyond)
    # Refuse to start without a bearer token (MSIT_SERVE_TOKEN / MSIT_SERVE_TOKEN_FILE): where auth is meant to
    # be on (deploy/rayservice.yaml), a missing Secret must not mean an open API.
    require_token: bool = False
    num_gpus: float | None = None  # per replica; None: 1 if the cluster has GPUs, else 0
    num_cpus: float = 1.0
    # MsitScorer replicas; their ongoing requests are batches (at most CONCURRENT_BATCHES per ingress replica)
    autoscaling: dict[str, Any] = field(
        default_factory=lambda: {
            "min_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": TARGET_ONGOING_BATCHES,
        }
    )
    # hot-reloadable: model and data (the scorers), max_batch_size (both), batch_wait_timeout_s (the ingress)
    user_config: dict[str, Any] | None = None
    api_replicas: int = 1  # HTTP ingress replicas (light: parsing and forwarding)
    api_num_cpus: float = 0.25
    throughput_optimized: bool = True  # THROUGHPUT_ENV in the replicas


Recommended = tuple[list[dict], int] | RequestError | ScoringError | HistoryUnavailable  # MsitScorer.recommend


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=16, health_check_period_s=10, health_check_timeout_s=30)
class MsitScorer:
    def __init__(self, settings: dict):
        keep_freed_memory()  # a scoring batch reallocates the same MB-sized tensors every time
        self.settings = settings
        self.scorer: Scorer | None = None
        self.loaded = ("", "")  # the (model, data) of self.scorer
        self.last_reload_error: dict | None = None  # the latest failed reload, until one succeeds
        self.computing = asyncio.Lock()
        self.queued: deque[tuple[list[dict], asyncio.Future]] = deque()
        self.candidates = Histogram(
            "msit_candidates_per_request",
            "candidate items per score request",
            boundaries=[1, 5, 10, 25, 50, 100, 250, 500, 1000],
        )
        self.scores = Histogram(
            "msit_scores", "distribution of the scores returned", boundaries=[i / 10 for i in range(1, 10)]
        )
        self.ids = Counter("msit_ids_total", "user and candidate ids seen in score requests")
        self.oov_ids = Counter("msit_oov_ids_total", "of those, ids unknown to the model (out-of-vocabulary)")
        self.model_version = Gauge(
            "msit_model_version", "1 for the model version this replica serves", tag_keys=("version",)
        )
        self.reconfigure({})  # the model of `settings`; Serve calls reconfigure again if a user_config is set

    def reconfigure(self, user_config: dict) -> None:
        """Hot reload: load the new model directory beside the old one, self-test it, then swap; requests keep
        flowing. A model that fails to load or to score is not swapped in: the old one keeps serving (like
        `nginx -s reload`), and the error is logged and shown at /v1/model. Only the first load may raise."""
        self.max_batch_size = int(user_config.get("max_batch_size", self.settings["max_batch_size"]))
        model, data = (self._resolve(user_config.get(key, self.settings[key])) for key in ("model", "data"))
        if self.scorer is not None and (model, data) == self.loaded:
            self.last_reload_error = None  # asked for what is served (say, back after a failed reload): nothing failed
            return
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            scorer = Scorer(model, max_candidates=self.settings["max_candidates"], device=device, catalogue_from=data)
            keep = self.settings.get("history_events_per_user")
            if keep is not None and keep < scorer.config.history_length:
                raise ConfigError(
                    f"history_events_per_user {keep} is below the model's history_length "
                    f"{scorer.config.history_length}: requests would be served shorter windows than "
                    "training cut"
                )
            history = self.settings.get("history")
            if is_redis_url(history):
                keep = keep if keep is not None else DEFAULT_EVENTS_PER_USER
                if keep < scorer.config.history_length:
                    raise ConfigError(
                        f"history_events_per_user {keep} is below the model's history_length "
                        f"{scorer.config.history_length}"
                    )
                scorer.store = RedisHistoryStore(
                    history, scorer.spec, events_per_user=keep, namespace=self.settings.get("history_namespace", "msit")
                )
            else:
                scorer.store = InMemoryHistoryStore.from_prepared(data, scorer.spec, events_per_user=keep)
            scorer.self_test()
        except Exception as error:
            if self.scorer is None:  # nothing to keep serving: the replica fails to start, and says why
                raise
            message = " ".join(f"{type(error).__name__}: {error}".split())[:500]
            self.last_reload_error = {
                "model": model,
                "data": data,
                "error": message,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            logger.error(
                f"reload of {model} failed, still serving {self.scorer.version} from {self.loaded[0]}: {message}"
            )
            return
        self.last_reload_error = None
        if self.scorer is not None:
            self.model_version.set(0, tags={"version": self.scorer.version})
        self.scorer, self.loaded = scorer, (model, data)
        self.model_version.set(1, tags={"version": scorer.version})
        logger.info(f"serving model {scorer.version} from {model} on {device}")

    @property
    def _current(self) -> Scorer:
        """The scorer serving now: __init__'s reconfigure loaded one, or the replica failed to start."""
        assert self.scorer is not None
        return self.scorer

    def _resolve(self, path: str) -> str:
        """Relative paths are relative to where the application was built."""
        return path if "://" in path else str(Path(self.settings["base_dir"], path))

    async def score_many(self, requests: list[dict]) -> tuple[str, list[Scored | RequestError | ScoringError]]:
        """A batch of score requests; a client's mistake or a failure to score is that request's result. Batches
        that queue while a forward pass runs are merged into the next one, up to max_batch_size requests (at
        least one batch)."""
        answer = asyncio.get_running_loop().create_future()
        self.queued.append((requests, answer))
        async with self.computing:  # FIFO: each waiter either finds its batch already scored, or scores it
            if not answer.done():
                # Shielded: if this caller is cancelled, the pass still answers the other batches it took.
                await asyncio.shield(self._score_queued())
        return await answer

    async def _score_queued(self) -> None:
        taken: list[tuple[list[dict], asyncio.Future]] = []
        size = 0
        while self.queued and (not taken or size + len(self.queued[0][0]) <= self.max_batch_size):
            taken.append(self.queued.popleft())
            size += len(taken[-1][0])
        merged = [request for requests, _ in taken for request in requests]
        scorer = self._current  # one model for the whole pass, even if a reload swaps it meanwhile
        try:
            results = await asyncio.to_thread(scorer.score, merged)  # off the loop, which keeps receiving
        except Exception as error:  # noqa: BLE001  (whatever it is, every waiting caller gets it)
            for _, answer in taken:
                answer.set_exception(error)
            return
        self._record(merged, results)
        start = 0
        for requests, answer in taken:
            answer.set_result((scorer.version, results[start : start + len(requests)]))
            start += len(requests)

    def _record(self, requests: list[dict], results: list[Scored | RequestError | ScoringError]) -> None:
        for request, result in zip(requests, results, strict=True):
            if isinstance(result, Scored):
                self.candidates.observe(len(request["candidates"]))
                self.ids.inc(result.ids)
                if result.oov_ids:
                    self.oov_ids.inc(result.oov_ids)
                for score in result.scores:
                    self.scores.observe(score)

    async def recommend(self, request: dict) -> tuple[str, Recommended]:
        scorer = self._current
        try:  # off the loop: it reads the history store
            return scorer.version, await asyncio.to_thread(scorer.recommend, request)
        except (RequestError, ScoringError, HistoryUnavailable) as error:  # returned, not raised: it crosses the
            return scorer.version, error  # handle as a value

    async def ingest(self, events: list[dict]) -> Appended | RequestError | HistoryUnavailable | ReadOnlyHistory:
        try:
            return await asyncio.to_thread(self._current.ingest, events)
        except (RequestError, HistoryUnavailable, ReadOnlyHistory) as error:
            return error

    async def store_health(self) -> dict:
        return await asyncio.to_thread(self._current.store_health)

    async def check_health(self) -> None:
        """Serve's health check (every health_check_period_s): the model must still score a tiny request."""
        await asyncio.to_thread(self._current.self_test)

    def current_version(self) -> str:
        return self._current.version

    def describe(self) -> dict:
        return {**self._current.describe(), "last_reload_error": self.last_reload_error}


# graceful_shutdown_timeout_s: an ingress replica being replaced (a redeploy) answers the requests it holds first;
# they may wait for a scorer replica that is starting. Beyond the proxy's request timeout (30 s) none is left.
@serve.deployment(name=INGRESS, max_ongoing_requests=512, graceful_shutdown_timeout_s=60)
@serve.ingress()
class MsitApi:
    """HTTP in front of the scorers: batches score requests, retries a batch whose scorer replica died."""

    def __init__(self, scorer: DeploymentHandle, settings: dict):
        self.handle, self.settings, self.version = scorer, settings, ""
        self.reconfigure({})

    def reconfigure(self, user_config: dict) -> None:
        """Hot-reloadable batching; the scorers take the model keys of the same user_config."""
        # serve.batch's wrapper has these setters; ray types the decorated method as the bare function
        self._score_batch.set_max_batch_size(  # type: ignore[attr-defined]
            int(user_config.get("max_batch_size", self.settings["max_batch_size"]))
        )
        self._score_batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            float(user_config.get("batch_wait_timeout_s", self.settings["batch_wait_timeout_s"]))
        )

    def __serve_build_asgi_app__(self):
        return create_app(
            self,
            ApiSettings(
                auth_token=self.settings.get("auth_token"),
                max_body_bytes=self.settings["max_body_bytes"],
                max_history=self.settings["max_history"],
                max_events=self.settings.get("max_events", 1000),
            ),
        )

    async def _call(self, method: str, *args):
        for attempt in range(RETRIES + 1):
            try:
                return await getattr(self.handle, method).remote(*args)
            except (RayActorError, ActorUnavailableError):
                if attempt == RETRIES:
                    raise
                logger.warning(f"a scorer replica died during {method}; retrying ({attempt + 1}/{RETRIES})")
                await asyncio.sleep(0.05 * (attempt + 1))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, max_concurrent_batches=CONCURRENT_BATCHES)
    async def _score_batch(self, requests: list[dict]) -> list[tuple[str, Scored | RequestError | ScoringError]]:
        version, results = await self._call("score_many", requests)
        return [(version, result) for result in results]

    async def score(self, request: dict) -> tuple[str, Scored | RequestError | ScoringError]:
        self.version, result = await self._score_batch(request)
        return self.version, result

    async def recommend(self, request: dict) -> tuple[str, list[dict], int]:
        self.version, result = await self._call("recommend", request)
        if isinstance(result, RequestError | ScoringError):
            raise result
        return self.version, *result

    async def ingest(self, events: list[dict]) -> Appended:
        # A scorer replica that dies mid-batch gets the batch again from _call: give events ids to apply them once.
        result = await self._call("ingest", events)
        if isinstance(result, Exception):
            raise result
        return result

    async def store_health(self) -> dict:
        return await self._call("store_health")

    async def current_version(self) -> str:
        self.version = await self._call("current_version")
        return self.version

    async def describe(self) -> dict:
        return await self._call("describe")


def build(args: dict[str, Any]) -> serve.Application:
    """The application: the HTTP ingress before autoscaling scorers, with GPUs where the cluster has them."""
    cfg = from_dict(ServeArgs, args, where="serve args")
    if cfg.history not in (None, "memory") and not is_redis_url(cfg.history):
        raise ConfigError(
            f"serve args: history {redact(cfg.history)!r}: expected redis://HOST:PORT/DB, or leave it "
            "out for the in-memory store"
        )
    gpus = cfg.num_gpus
    if gpus is None:  # asking for a GPU on a cluster without one would leave the replica pending forever
        gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    settings = {
        "model": absolute_path(cfg.model),
        "data": absolute_path(cfg.data),
        "max_candidates": cfg.max_candidates,
        "max_batch_size": cfg.max_batch_size,
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        "max_body_bytes": cfg.max_body_bytes,
        "max_history": cfg.max_history,
        "history_events_per_user": cfg.history_events_per_user,
        "history": cfg.history,
        "history_namespace": cfg.history_namespace,
        "max_events": cfg.max_events,
        "auth_token": token_from_env(required=cfg.require_token),
        "base_dir": os.getcwd(),
    }
    runtime_env = {"env_vars": THROUGHPUT_ENV} if cfg.throughput_optimized else {}
    # serve.deployment makes each class a Deployment; ray types the decorated class as the class itself.
    scorer = MsitScorer.options(  # type: ignore[attr-defined]
        autoscaling_config=cfg.autoscaling,
        user_config=cfg.user_config,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": gpus, "runtime_env": runtime_env},
    ).bind(settings)
    return MsitApi.options(  # type: ignore[attr-defined]
        num_replicas=cfg.api_replicas,
        user_config=cfg.user_config,
        ray_actor_options={"num_cpus": cfg.api_num_cpus, "runtime_env": runtime_env},
    ).bind(scorer, settings)
