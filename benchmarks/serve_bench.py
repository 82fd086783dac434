"""Serving throughput and latency: the Ray Serve endpoint under closed-loop load, against the same
scorer in process, in one run; then one of two replicas is killed during a load run; then the same endpoint
reads its histories from Redis instead of memory, and takes events.

The model is the ml100k_genre one (by default the best model of benchmarks/tune_ml100k.py). Each
request scores 100 candidates for a test-split user. For each concurrency (1, 8, 32, 64), that many
clients send a request, wait for its answer and send the next, for a fixed duration; latency
percentiles, requests/s and errors are recorded. `inprocess_scores_per_s` is the scorer (encoding +
forward pass) on batches of the same requests in this process, with the same torch thread count as a
replica (1).

The Redis part: a local redis-server (127.0.0.1, free port), bulk-loaded from the prepared directory as
`msit history load` (run as a command), behind the same deployment; requests/s and latency at concurrency
32, alternating with the in-memory store's (two runs each), then `POST /v1/events` in batches of 100 (each event with
an event id, of users with stored histories, later than anything stored) from 8 clients.

Writes benchmarks/results/serve.json (serve_gpu.json with --device cuda).

    python benchmarks/serve_bench.py [--model DIR] [--data DIR] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np
import torch
from provenance import stamp

from msit.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"


def make_requests(data: Path, spec, count: int = 200, candidates: int = 100, seed: int = 0) -> list[dict]:
    import pyarrow.parquet as pq

    from msit.data.feature_spec import SEQUENCES_DIR
    from msit.data.schema import real_values, scene_slot

    rng = np.random.default_rng(seed)
    test = pq.read_table(data / "test", columns=["sequence_row", "scene_id"]).to_pandas()
    keys = pq.read_table(data / SEQUENCES_DIR, columns=["sequence_row", "user_key"]).to_pandas()
    test = test.merge(keys, on="sequence_row", how="left", validate="many_to_one")  # the raw user id of each row
    items = real_values(spec.vocabularies["item_id"])
    rows = test.sample(count, random_state=seed)
    return [
        {
            "user_id": r.user_key,
            "scenario": spec.scenarios[scene_slot(r.scene_id)],
            "candidates": [str(i) for i in rng.choice(items, candidates, replace=False)],
        }
        for r in rows.itertuples()
    ]


def inprocess_scores_per_s(scorer, requests: list[dict], batch: int, seconds: float) -> float:
    scored, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for start in range(0, len(requests), batch):
            chunk = requests[start : start + batch]
            scorer.score(chunk)
            scored += sum(len(r["candidates"]) for r in chunk)
    return scored / (time.perf_counter() - started)


def make_events(data: Path, spec, batches: int = 200, size: int = 100, seed: int = 0) -> list[dict]:
    """Bodies for POST /v1/events: `size` events each, of users with stored histories, later than any stored."""
    import pyarrow.parquet as pq

    from msit.data.feature_spec import SEQUENCES_DIR
    from msit.data.schema import real_values

    rng = np.random.default_rng(seed)
    keys = pq.read_table(data / SEQUENCES_DIR, columns=["user_key"]).column("user_key").to_pylist()
    items, scenes = real_values(spec.vocabularies["item_id"]), spec.scenarios
    start = 2_000_000_000  # 2033: later than any stored event
    bodies = []
    for b in range(batches):
        users, picked = rng.choice(keys, size), rng.choice(items, size)
        bodies.append(
            {
                "events": [
                    {
                        "user_id": str(users[i]),
                        "item_id": str(picked[i]),
                        "scenario": scenes[rng.integers(len(scenes))],
                        "label": int(rng.integers(2)),
                        "timestamp": start + b * size + i,
                        "event_id": f"bench-{b}-{i}",
                    }
                    for i in range(size)
                ]
            }
        )
    return bodies


async def closed_loop(
    url: str, requests: list[dict], concurrency: int, seconds: float, path: str = "/v1/score"
) -> dict:
    """`concurrency` clients, each sending the next body when its answer came; `units_per_s` counts
    candidates scored (or events sent, for /v1/events)."""
    latencies, errors, error_kinds = [], 0, Counter()
    deadline = time.perf_counter() + seconds

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        i = index
        while time.perf_counter() < deadline:
            body = requests[i % len(requests)]
            i += concurrency
            started = time.perf_counter()
            try:
                async with session.post(f"{url}{path}", json=body) as response:
                    text = await response.read()
                    ok = response.status == 200
                    if not ok:
                        error_kinds[f"{response.status} {text[:120].decode(errors='replace')}"] += 1
            except aiohttp.ClientError as error:
                ok = False
                error_kinds[type(error).__name__] += 1
            latencies.append(time.perf_counter() - started)
            errors += not ok

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    units = len(requests[0]["events"] if path == "/v1/events" else requests[0]["candidates"])
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        ("events_per_s" if path == "/v1/events" else "scores_per_s"): len(latencies) * units / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": errors,
        "error_kinds": dict(error_kinds),
    }


def deploy(
    model: Path,
    data: Path,
    port: int,
    replicas: int,
    device: str,
    num_cpus: float = 1.0,
    max_batch_size: int = 32,
    history: str | None = None,
) -> str:
    """One ingress and `replicas` scorer replicas; on cuda the replicas share the machine's GPUs.
    `history`: a redis:// URL (default: in memory from `data`)."""
    from ray import serve

    from msit.serving.deployment import build

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build(
            {
                "model": str(model),
                "data": str(data),
                "num_cpus": num_cpus,
                "num_gpus": gpus_per_replica(replicas) if device == "cuda" else 0,
                "max_batch_size": max_batch_size,
                "history": history,
                "autoscaling": {"min_replicas": replicas, "max_replicas": replicas},
            }
        ),
        name="msit",
        route_prefix="/",
    )
    return f"http://127.0.0.1:{port}"


def gpus_per_replica(replicas: int) -> float:
    """A whole GPU each where there are enough, else an equal share: two replicas on one GPU get 0.5 each
    (asking 1 each would leave the second waiting for a GPU forever)."""
    return min(1.0, torch.cuda.device_count() / replicas)


def kill_one_replica_during_load(url: str, requests: list[dict], seconds: float) -> dict:
    import ray

    async def run() -> dict:
        load = asyncio.create_task(closed_loop(url, requests, 8, seconds))
        await asyncio.sleep(seconds / 3)
        replicas = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "SERVE_REPLICA" in a["name"] and "MsitScorer" in a["name"]
        ]
        victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
        ray.kill(victim, no_restart=True)
        result = await load
        return {"replicas_before": len(replicas), "killed": replicas[0]["name"], **result}

    run_result = asyncio.run(run())
    return {
        "requests": run_result["requests"],
        "failed": run_result["errors"],
        "concurrency": 8,
        "replicas_before": run_result["replicas_before"],
        "p99_ms": run_result["p99_ms"],
    }


def load_histories(data: Path, model: Path, url: str, **run) -> None:
    """`msit history load` of a prepared directory into Redis, as a user runs it (a command, not a call)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "msit.cli", "history", "load", "--data", str(data), "--model", str(model)]
    subprocess.run([*command, "--history", url, "--quiet"], check=True, cwd=ROOT, **run)


REDIS_ROUNDS = 2  # in-memory and Redis deployments alternate, so that a drift in the machine's load hits both


def redis_runs(model: Path, data: Path, spec, port: int, requests: list[dict], args) -> dict:
    """The one-replica endpoint with its histories in memory and in a local Redis, alternately, at concurrency 32
    (`REDIS_ROUNDS` runs each; rps and latencies are their means); then events through the Redis one."""
    import tempfile

    from ray import serve

    from msit.serving.local_redis import LocalRedis

    def loaded(history: str | None) -> str:
        url = deploy(model, data, port, replicas=1, device=args.device, history=history)
        asyncio.run(closed_loop(url, requests, 8, 3.0))  # warm-up, not recorded
        return url

    runs: dict[str, list[dict]] = {"memory": [], "redis": []}
    with tempfile.TemporaryDirectory() as directory, LocalRedis(Path(directory)) as redis_server:
        started = time.perf_counter()
        load_histories(data, model, redis_server.url)
        load_s = time.perf_counter() - started
        for _ in range(REDIS_ROUNDS):
            for store, history in (("memory", None), ("redis", redis_server.url)):
                url = loaded(history)
                runs[store].append(asyncio.run(closed_loop(url, requests, 32, args.seconds)))
                print(
                    store,
                    {k: round(v, 1) if isinstance(v, float) else v for k, v in runs[store][-1].items()},
                    flush=True,
                )
                if store == "memory":
                    serve.shutdown()
        events = asyncio.run(closed_loop(url, make_events(data, spec), 8, args.seconds, path="/v1/events"))
        print({k: round(v, 1) if isinstance(v, float) else v for k, v in events.items()}, flush=True)
        serve.shutdown()

    def mean(store: str, key: str) -> float:
        return float(np.mean([r[key] for r in runs[store]]))

    return {
        "inmemory_rps": mean("memory", "rps"),
        "redis_rps": mean("redis", "rps"),
        "redis_vs_inmemory": mean("redis", "rps") / mean("memory", "rps"),
        "events_per_s": events["events_per_s"],
        "errors": sum(r["errors"] for rs in runs.values() for r in rs) + events["errors"],
        "p50_ms": mean("redis", "p50_ms"),
        "p99_ms": mean("redis", "p99_ms"),
        "inmemory_p50_ms": mean("memory", "p50_ms"),
        "inmemory_p99_ms": mean("memory", "p99_ms"),
        "concurrency": 32,
        "rounds": REDIS_ROUNDS,
        "runs": runs,
        "events": {**events, "batch": 100},
        "bulk_load_s": load_s,
        "store": "local redis-server on 127.0.0.1 (no persistence), bulk-loaded by `msit history load`",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(CACHE / "tune_ml100k_genre" / "best"))
    parser.add_argument("--data", default=str(CACHE / "genre"))
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each load run")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    model, data = Path(args.model), Path(args.data)
    if not (model / "model.safetensors").is_file():
        parser.error(f"no model at {model}: run benchmarks/tune_ml100k.py first, or pass --model and --data")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    torch.set_num_threads(1)  # as a 1-CPU replica runs
    keep_freed_memory()  # as a replica does (MsitScorer.__init__)
    provenance = stamp(args.device)

    from msit.data.feature_spec import FeatureSpec
    from msit.ray_env import init_ray
    from msit.serving.history_store import InMemoryHistoryStore
    from msit.serving.scorer import Scorer

    spec = FeatureSpec.load(data)
    requests = make_requests(data, spec)
    scorer = Scorer(model, InMemoryHistoryStore.from_prepared(data, spec), device=args.device, catalogue_from=data)
    inprocess = inprocess_scores_per_s(scorer, requests, batch=32, seconds=args.seconds)
    print(f"in process: {inprocess:,.0f} scores/s", flush=True)

    init_ray(quiet=True)
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = deploy(model, data, port, replicas=1, device=args.device)
    asyncio.run(closed_loop(url, requests, 8, 3.0))  # warm-up, not recorded
    runs = []
    for concurrency in (1, 8, 32, 64):
        runs.append(asyncio.run(closed_loop(url, requests, concurrency, args.seconds)))
        print({k: round(v, 1) if isinstance(v, float) else v for k, v in runs[-1].items()}, flush=True)
    serve.shutdown()

    # Two replicas and the ingress must fit the machine's CPUs (Ray reserves them: 2 x 1 + 0.25 would not fit 2).
    url = deploy(model, data, port, replicas=2, device=args.device, num_cpus=0.75)
    asyncio.run(closed_loop(url, requests, 8, 3.0))
    replica_kill = kill_one_replica_during_load(url, requests, args.seconds * 2)
    print(f"replica kill: {replica_kill}", flush=True)
    serve.shutdown()

    redis_part = redis_runs(model, data, spec, port, requests, args)
    print(f"redis: {redis_part}", flush=True)

    at_32 = next(r for r in runs if r["concurrency"] == 32)
    report = {
        **provenance,
        "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model),
        "candidates_per_request": len(requests[0]["candidates"]),
        "seconds_per_run": args.seconds,
        "replica": {
            "num_cpus": 1,
            "torch_threads": 1,
            "max_batch_size": 32,
            "device": args.device,
            "num_gpus": gpus_per_replica(1) if args.device == "cuda" else 0,
            "replica_kill_num_gpus": gpus_per_replica(2) if args.device == "cuda" else 0,
            "ingress": "1 MsitApi replica, 0.25 CPU: batches requests (up to 4 batches in flight), one "
            "handle call per batch; the scorer merges batches that queue behind a forward pass",
            "serve_throughput_mode": "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the replicas, direct ingress off",
            "replica_kill_num_cpus": 0.75,
        },
        "runs": runs,
        "inprocess_scores_per_s": inprocess,
        "endpoint_vs_inprocess_at_32": at_32["scores_per_s"] / inprocess,
        "replica_kill": replica_kill,
        "redis": redis_part,
        "machine": {
            "cores": os.cpu_count(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
            "note": "load generator, Serve proxy and replicas share these cores",
        },
    }
    out = Path(
        args.out or ROOT / "benchmarks" / "results" / ("serve_gpu.json" if args.device == "cuda" else "serve.json")
    )
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
