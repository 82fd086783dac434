"""Fault drills: each fault against a real local Ray cluster, and what it cost.

Every drill runs in its own child process with its own Ray (a local instance, or a head and a second node
started with `ray start` on free ports), under a deadline; whatever it started is stopped afterwards, also
on failure or timeout. Tiny synthetic data (`msit data synth` + `msit data prepare`) and a tiny model.

  train_rank0_kill     2-worker `run_training`; rank 0's process dies hard (os._exit) halfway through an epoch
                       (the run's own drill hook: run.kill_rank, run.kill_after_batches)
  train_rank1_kill     the same with rank 1
  driver_kill          `python -m msit.cli train --config X` SIGKILLed mid-run, then the same command again
  node_kill_train      a head and a second node (`ray start --address`, resource drill_node); one of two Train
                       workers on the second node, whose process group is SIGKILLed mid-epoch
  node_kill_serve      the same cluster; one of two scorer replicas on the second node, killed under load
  serve_replica_kill   one of two scorer replicas killed under load (ray.kill)
  serve_broken_model   a hot reload (user_config) onto a model whose model.safetensors is corrupt, under load
  serve_poison         malformed-but-parseable requests (lone surrogates, NaN, 2^63) among a loaded batch
  serve_redis_outage   the history store's redis-server stopped under load and started again (its append-only
                       file kept): 503s only, own-history requests still scored, recovery without a restart

Per drill: requests sent / failed (serving; failed = non-200 answers to well-formed requests;
the Redis outage: answers other than 200 or 503),
epochs_lost (training: the interrupted epoch plus any checkpointed epoch the restart had to redo;
1 = only the epoch since the last checkpoint), finished (training: the run exported a model, every epoch
appears once in its history and the exported model's val AUC equals the best epoch's; serving: the
endpoint answers afterwards with the expected model). Writes benchmarks/results/faults.json; with --only,
merges into it, keeping the other drills' entries (each entry has its own commit and tree_clean; the
top-level stamp, benchmarks/provenance.py, is the run that last wrote the file).

    python benchmarks/fault_drills.py                       # all drills, ~15 min on an idle 2-core machine
    python benchmarks/fault_drills.py --only serve_poison,serve_broken_model
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from provenance import stamp

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".cache" / "fault_drills"
PYTHON = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
SYNTH = {"users": 400, "items": 300, "events_per_user": 25, "seed": 11}
HISTORY_LENGTH = 10  # the models' window; the prepared layout is in the setup marker (an older layout: set up again)
SETUP = {**SYNTH, "layout": 2}
EPOCHS = 4
KILL_AFTER_EPOCH = 2  # the kill lands while epoch 3 trains: checkpoint 2 exists, 3 does not
TIMEOUTS = {
    "train_rank0_kill": 480,
    "train_rank1_kill": 480,
    "driver_kill": 600,
    "node_kill_train": 600,
    "node_kill_serve": 420,
    "serve_replica_kill": 300,
    "serve_broken_model": 300,
    "serve_poison": 300,
    "serve_redis_outage": 300,
}
LOAD_SECONDS = 30.0
CONCURRENCY = 8


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- process groups: everything a drill starts is registered, and stopped by the drill or else by main ------


def _register_group(work: Path, name: str, pid: int) -> None:
    with (work / f"{name}.groups").open("a") as f:
        f.write(f"{pid}\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_group(pgid: int, grace_s: float = 60.0, term: bool = True) -> None:
    """SIGTERM to the group's leader (a blocking `ray start` then stops its own node), SIGKILL to what is left."""
    if term and _alive(pgid):
        os.kill(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return env


def _wait(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)


# --- setup: data and a model, shared by the drills ----------------------------------------------------------


def setup(work: Path) -> None:
    """Synthetic log + prepared directory (the CLI, as a user runs it) and a tiny model (single process)."""
    marker = work / "setup.json"
    if marker.is_file() and json.loads(marker.read_text()) == SETUP:
        return
    shutil.rmtree(work / "synth", ignore_errors=True)
    log("setup: msit data synth + msit data prepare")
    synth = [
        PYTHON,
        "-m",
        "msit.cli",
        "data",
        "synth",
        "--out",
        str(work / "synth"),
        *(a for k, v in SYNTH.items() for a in (f"--{k.replace('_', '-')}", str(v))),
    ]
    prepare = [
        PYTHON,
        "-m",
        "msit.cli",
        "data",
        "prepare",
        str(work / "synth"),
        "--out",
        str(work / "prepared"),
        "--spec",
        str(work / "synth" / "spec.yaml"),
        "--num-cpus",
        "4",
        "--overwrite",
    ]
    for command in (synth, prepare):
        done = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    log("setup: a tiny model for the serving drills")
    from msit.data.feature_spec import FeatureSpec
    from msit.data.prepared import load_sequences, load_split
    from msit.model import ModelConfig, build_for_data
    from msit.model.model_dir import save_model_dir
    from msit.training.trainer import TrainConfig, fit

    prepared = work / "prepared"
    spec = FeatureSpec.load(prepared)
    config = ModelConfig(embed_dim=16, mlp_dims=(32,), history_length=HISTORY_LENGTH)
    model = build_for_data(config, prepared, spec)
    sequences = load_sequences(prepared)  # once for both splits
    fit(
        model,
        load_split(prepared, "train", spec, sequences),
        load_split(prepared, "val", spec, sequences),
        spec,
        TrainConfig(epochs=1, batch_size=256, lr=5e-3),
        log=lambda _: None,
    )
    shutil.rmtree(work / "model", ignore_errors=True)
    save_model_dir(work / "model", model, config, spec)
    marker.write_text(json.dumps(SETUP))


# --- training drills -----------------------------------------------------------------------------------------


def _train_config(work: Path, name: str):
    from msit.model import ModelConfig
    from msit.training.ray_train import RunSpec, ScalingSpec, TrainRunConfig
    from msit.training.trainer import TrainConfig

    directory = work / name
    shutil.rmtree(directory, ignore_errors=True)  # a fresh run name each time: the same one would resume
    directory.mkdir(parents=True)
    return TrainRunConfig(
        data=str(work / "prepared"),
        output=str(directory / "model"),
        model=ModelConfig(embed_dim=16, mlp_dims=(32,), history_length=HISTORY_LENGTH),
        train=TrainConfig(epochs=EPOCHS, batch_size=256, lr=5e-3, patience=EPOCHS),
        scaling=ScalingSpec(num_workers=2, use_gpu=False, cpus_per_worker=1.0),
        run=RunSpec(name=name, storage_path=str(directory / "ray_results"), max_failures=2),
    )


def _checkpoint_states(cfg) -> dict[int, dict]:
    """The run's checkpoints in storage, by epoch (a checkpoint being written is skipped)."""
    states = {}
    for path in (Path(cfg.run.storage_path) / cfg.run.name).glob("checkpoint_*/train_state.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        states[state["epoch"]] = state
    return states


def _kill_mid_epoch(cfg, kill: Callable[[], dict], timeout_s: float) -> dict:
    """Wait for checkpoint KILL_AFTER_EPOCH, let the next epoch get going, kill, and check no newer checkpoint
    existed at that moment (so the kill landed between two checkpoints, mid-epoch)."""
    state = _wait(
        lambda: _checkpoint_states(cfg).get(KILL_AFTER_EPOCH), timeout_s, f"checkpoint of epoch {KILL_AFTER_EPOCH}"
    )
    time.sleep(max(0.5, 0.4 * state["train_seconds"]))
    between = KILL_AFTER_EPOCH + 1 not in _checkpoint_states(cfg)
    victim = kill()
    log(f"killed {victim} while epoch {KILL_AFTER_EPOCH + 1} trained (between checkpoints: {between})")
    return {"epoch_in_progress": KILL_AFTER_EPOCH + 1, "between_checkpoints": between, **victim}


def _check_run(cfg, kill: dict | None) -> tuple[bool, int | None, list[str]]:
    """finished, epochs lost, notes: from the run's metrics.json and the exported model."""
    from msit.data.prepared import load_split
    from msit.model.model_dir import load_model_dir
    from msit.training.ray_train import run_outputs_dir
    from msit.training.trainer import evaluate

    notes = []
    metrics_file = run_outputs_dir(cfg) / "metrics.json"
    if not (Path(cfg.output) / "model.safetensors").is_file() or not metrics_file.is_file():
        return False, None, ["no exported model / metrics.json"]
    history = json.loads(metrics_file.read_text())
    epochs = [h["epoch"] for h in history]
    once = epochs == list(range(1, cfg.train.epochs + 1))
    notes.append(f"history epochs {epochs}" + ("" if once else " (expected each of 1..N once)"))
    attempts = sorted({h["first_epoch_of_attempt"] for h in history})
    notes.append(f"attempts started at epochs {attempts}")
    lost = None
    if kill is not None:
        resumed = min([a for a in attempts if a > 1] or [1])
        lost = kill["epoch_in_progress"] - resumed + 1
    loaded = load_model_dir(cfg.output)
    best = max(history, key=lambda h: h["val_auc"])
    val_auc = evaluate(loaded.model, load_split(cfg.data, "val", loaded.spec), loaded.spec)["overall"]["auc"]
    same = abs(val_auc - best["val_auc"]) < 1e-6 and loaded.info["train"]["best_epoch"] == best["epoch"]
    notes.append(
        f"exported model val AUC {val_auc:.6f}, best epoch {best['epoch']} recorded {best['val_auc']:.6f}"
        + ("" if same else " (MISMATCH)")
    )
    return once and same, lost, notes


def _state_address() -> str:
    """This driver's own cluster's dashboard: with several Ray instances on the machine (other users' local ones),
    the state API cannot guess which one is meant."""
    import ray

    return "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]


def _train_workers() -> list[dict]:
    from ray.util.state import list_actors

    actors = list_actors(
        address=_state_address(), detail=True, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )
    return [{"actor_id": a.actor_id, "pid": a.pid, "node_id": a.node_id} for a in actors]


def drill_train_rank_kill(work: Path, name: str, rank: int) -> dict:
    """The chosen rank's process dies hard (os._exit) halfway through epoch KILL_AFTER_EPOCH + 1, through the
    run's own drill hook (run.kill_rank, run.kill_after_batches): it lands at a known batch whatever the load,
    where a kill from outside must first find which actor holds which rank (the state API's log lookup was too
    slow for that under load)."""
    import dataclasses

    from msit.data.feature_spec import FeatureSpec
    from msit.ray_env import init_ray
    from msit.training.ray_train import run_training

    cfg = _train_config(work, name)
    batches = FeatureSpec.load(cfg.data).row_counts["train"] // cfg.train.batch_size // cfg.scaling.num_workers
    cfg = dataclasses.replace(
        cfg,
        run=dataclasses.replace(
            cfg.run, kill_worker_after_epoch=KILL_AFTER_EPOCH, kill_rank=rank, kill_after_batches=max(1, batches // 2)
        ),
    )
    init_ray(num_cpus=4, quiet=True)
    started = time.monotonic()
    run_training(cfg, log=log)
    marker = Path(cfg.run.storage_path) / cfg.run.name / ".fault_drill_done"
    landed = marker.is_file()
    kill = {"epoch_in_progress": KILL_AFTER_EPOCH + 1} if landed else None
    finished, lost, notes = _check_run(cfg, kill)
    notes = [
        (
            f"{marker.read_text()} (of about {batches} batches a worker trains per epoch)"
            if landed
            else "the kill did not land before the run ended: the drill did not happen"
        ),
        *notes,
        f"run took {time.monotonic() - started:.0f} s",
    ]
    return {"requests": None, "failed": None, "epochs_lost": lost, "finished": finished and landed, "notes": notes}


def drill_driver_kill(work: Path) -> dict:
    import yaml

    cfg = _train_config(work, "driver_kill")
    cfg_dict = json.loads(json.dumps(__import__("dataclasses").asdict(cfg)))
    config = work / "driver_kill" / "train.yaml"
    config.write_text(yaml.safe_dump(cfg_dict))
    command = [PYTHON, "-m", "msit.cli", "train", "--config", str(config), "--num-cpus", "4"]
    notes = [f"command: {shlex.join(command[1:])}"]
    with (work / "driver_kill" / "first.log").open("w") as out:
        first = subprocess.Popen(
            command, env=_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _register_group(work, "driver_kill", first.pid)
    try:

        def kill_driver() -> dict:
            before = _descendants(first.pid)
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
            # What the local Ray of the dead driver leaves behind (it should follow its driver).
            left = _wait(lambda: not any(_alive(p) for p in before) or "timeout", 60, "") if before else True
            survivors = [p for p in before if _alive(p)]
            notes.append(
                f"{len(before)} processes under the driver; {len(survivors)} still alive 60 s after it died"
                if left == "timeout"
                else f"{len(before)} processes under the driver exited with it"
            )
            return {"killed": f"the driver (pid {first.pid})"}

        kill = _kill_mid_epoch(cfg, kill_driver, TIMEOUTS["driver_kill"] - 240)
    finally:
        stop_group(first.pid, term=False)
    log("driver killed; the same command again")
    second = subprocess.run(
        command,
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUTS["driver_kill"] - 120,
        start_new_session=True,
        check=False,
    )
    (work / "driver_kill" / "second.log").write_text(second.stdout + second.stderr)
    notes.insert(
        0,
        f"driver SIGKILLed while epoch {kill['epoch_in_progress']} trained (no newer checkpoint at "
        f"that moment: {kill['between_checkpoints']}); the same command again exited {second.returncode}",
    )
    finished, lost, run_notes = _check_run(cfg, kill)
    return {
        "requests": None,
        "failed": None,
        "epochs_lost": lost,
        "finished": finished and second.returncode == 0,
        "notes": notes + run_notes,
    }


# --- a head and a second node, started with `ray start` --------------------------------------------------------


@contextmanager
def two_node_cluster(work: Path, name: str, head_cpus: int, node_cpus: int):
    """A head and a second node (resource drill_node), each a blocking `ray start` in its own process group,
    on free ports and their own temp dirs; this process joins the head as the driver. Yields the second node's
    process group id and both node ids. Stopped with SIGTERM to each blocking `ray start` (never `ray stop`)."""
    import ray

    from msit.ray_env import free_ports, worker_port_block

    env = _env()
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 clients of a `ray start` cluster present its token
    temp = Path(tempfile.mkdtemp(prefix="msit-drill-", dir="/tmp"))  # short: socket paths are length-limited
    groups, logs = [], []
    worker_low, _ = worker_port_block(40)  # head: the first 20, node: the last 20
    try:
        gcs, dashboard, *head_ports = free_ports(7)
        logs.append((work / name / "head.log").open("w"))
        head = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--disable-usage-stats",
                f"--num-cpus={head_cpus}",
                f"--port={gcs}",
                f"--temp-dir={temp / 'head'}",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                *(
                    f"--{flag}={port}"
                    for flag, port in zip(
                        (
                            "dashboard-agent-listen-port",
                            "dashboard-agent-grpc-port",
                            "metrics-export-port",
                            "runtime-env-agent-port",
                            "ray-client-server-port",
                        ),
                        head_ports,
                        strict=True,
                    )
                ),
                f"--min-worker-port={worker_low}",
                f"--max-worker-port={worker_low + 19}",
            ],
            stdout=logs[-1],
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        groups.append(head.pid)
        _register_group(work, name, head.pid)
        address = f"http://127.0.0.1:{dashboard}"
        _wait(
            lambda: (
                head.poll() is not None
                or subprocess.run(
                    [RAY, "job", "list", "--address", address], env=env, capture_output=True, check=False
                ).returncode
                == 0
            ),
            120,
            "ray start --head",
            poll_s=1,
        )
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited: {(work / name / 'head.log').read_text()[-2000:]}")
        ip = "127.0.0.1"  # the second node and the driver join the head's GCS through loopback
        node_ports = free_ports(6)
        logs.append((work / name / "node.log").open("w"))
        node = subprocess.Popen(
            [
                RAY,
                "start",
                "--block",
                "--disable-usage-stats",
                f"--address={ip}:{gcs}",
                f"--num-cpus={node_cpus}",
                "--node-ip-address=127.0.0.1",
                '--resources={"drill_node": 1}',
                f"--temp-dir={temp / 'node'}",
                *(
                    f"--{flag}={port}"
                    for flag, port in zip(
                        (
                            "node-manager-port",
                            "object-manager-port",
                            "dashboard-agent-listen-port",
                            "dashboard-agent-grpc-port",
                            "metrics-export-port",
                            "runtime-env-agent-port",
                        ),
                        node_ports,
                        strict=True,
                    )
                ),
                f"--min-worker-port={worker_low + 20}",
                f"--max-worker-port={worker_low + 39}",
            ],
            stdout=logs[-1],
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        groups.append(node.pid)
        _register_group(work, name, node.pid)
        ray.init(address=f"{ip}:{gcs}", log_to_driver=False, logging_level="WARNING")
        nodes = _wait(lambda: len(n := [n for n in ray.nodes() if n["Alive"]]) == 2 and n, 120, "the second node")
        second = next(n["NodeID"] for n in nodes if "drill_node" in n["Resources"])
        head_id = next(n["NodeID"] for n in nodes if n["NodeID"] != second)
        log(f"cluster up: head {head_id[:8]} ({head_cpus} CPU), second node {second[:8]} ({node_cpus} CPU)")
        yield {"node_pgid": node.pid, "head_id": head_id, "node_id": second}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for pgid in reversed(groups):
            stop_group(pgid)
        for f in logs:
            f.close()
        shutil.rmtree(temp, ignore_errors=True)


def _hold_cpus(node_id: str, cpus: float):
    """An actor holding `cpus` CPUs on a node, so that the next thing scheduled lands elsewhere."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote
    class Hold:
        def ready(self) -> bool:
            return True

    hold = Hold.options(num_cpus=cpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    ray.get(hold.ready.remote(), timeout=120)
    return hold


def drill_node_kill_train(work: Path) -> dict:
    import ray

    from msit.training.ray_train import run_training

    cfg = _train_config(work, "node_kill_train")
    # The head (3 CPUs) can take both workers after the loss; while the group starts, 2 of its CPUs are held,
    # so one worker goes to the second node (1 CPU).
    with two_node_cluster(work, "node_kill_train", head_cpus=3, node_cpus=1) as cluster:
        hold = _hold_cpus(cluster["head_id"], 2)
        kill: dict = {}

        def killer() -> None:
            try:
                workers = _wait(lambda: len(w := _train_workers()) == 2 and w, 180, "two Train workers")
                ray.kill(hold)
                on_node = [w for w in workers if w["node_id"] == cluster["node_id"]]
                kill["placement"] = f"{len(on_node)} of 2 Train workers on the second node"

                def kill_node() -> dict:
                    os.killpg(cluster["node_pgid"], signal.SIGKILL)
                    return {"killed": f"the second node's process group ({kill['placement']})"}

                kill.update(_kill_mid_epoch(cfg, kill_node, TIMEOUTS["node_kill_train"] - 240))
            except Exception as error:  # noqa: BLE001
                kill["error"] = f"kill failed: {error}"

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        started = time.monotonic()
        error = None
        try:
            run_training(cfg, log=log)
        except Exception as e:  # noqa: BLE001 - the drill's result
            error = _first_line(e)
        thread.join(timeout=5)
    notes = [
        f"killed {kill.get('killed')} while epoch {kill.get('epoch_in_progress')} trained "
        f"(no newer checkpoint at that moment: {kill.get('between_checkpoints')}); the head has room for "
        "both restarted workers"
    ]
    if "error" in kill:
        notes.append(kill["error"])
    if error:
        return {
            "requests": None,
            "failed": None,
            "epochs_lost": None,
            "finished": False,
            "notes": [*notes, f"run failed: {error}"],
        }
    finished, lost, run_notes = _check_run(cfg, kill if "epoch_in_progress" in kill else None)
    return {
        "requests": None,
        "failed": None,
        "epochs_lost": lost,
        "finished": finished and "error" not in kill,
        "notes": [*notes, *run_notes, f"run took {time.monotonic() - started:.0f} s"],
    }


# --- serving drills ----------------------------------------------------------------------------------------------


def _serving(work: Path):
    from serve_bench import make_requests

    from msit.data.feature_spec import FeatureSpec

    data = work / "prepared"
    spec = FeatureSpec.load(data)
    return work / "model", data, make_requests(data, spec, count=200, candidates=20)


def _serve_args(model: Path, data: Path, replicas: int, num_cpus: float, **extra) -> dict:
    return {
        "model": str(model),
        "data": str(data),
        "num_cpus": num_cpus,
        "num_gpus": 0,
        "max_batch_size": 32,
        "autoscaling": {"min_replicas": replicas, "max_replicas": replicas},
        **extra,
    }


def _scorer_replicas() -> list[dict]:
    from ray.util.state import list_actors

    return [
        {"actor_id": a.actor_id, "pid": a.pid, "node_id": a.node_id, "name": a.name}
        for a in list_actors(address=_state_address(), filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
        if "MsitScorer" in (a.class_name or "")
    ]


def _probe(url: str, body: dict, count: int = 5) -> tuple[int, str | None]:
    """`count` requests after the drill: how many answered 200, and the model version served."""
    import requests

    ok = 0
    for _ in range(count):
        with contextlib.suppress(requests.RequestException):
            ok += requests.post(f"{url}/v1/score", json=body, timeout=30).status_code == 200
    try:
        version = requests.get(f"{url}/v1/model", timeout=30).json().get("version")
    except (requests.RequestException, ValueError):
        version = None
    return ok, version


def _port() -> int:
    from msit.ray_env import free_ports

    return free_ports(1)[0]


def drill_serve_replica_kill(work: Path) -> dict:
    import asyncio

    from ray import serve
    from serve_bench import closed_loop, deploy, kill_one_replica_during_load

    from msit.ray_env import init_ray

    model, data, requests = _serving(work)
    init_ray(num_cpus=4, quiet=True)
    try:
        url = deploy(model, data, _port(), replicas=2, device="cpu", num_cpus=0.75)
        asyncio.run(closed_loop(url, requests, CONCURRENCY, 3.0))  # warm-up, not counted
        result = kill_one_replica_during_load(url, requests, LOAD_SECONDS)
        back = _wait(lambda: len(_scorer_replicas()) == 2, 120, "the replica replaced", poll_s=2)
        ok, _ = _probe(url, requests[0])
    finally:
        serve.shutdown()
    return {
        "requests": result["requests"],
        "failed": result["failed"],
        "epochs_lost": None,
        "finished": ok == 5 and back,
        "notes": [
            f"ray.kill of one of {result['replicas_before']} scorer replicas {LOAD_SECONDS / 3:.0f} s into "
            f"a {LOAD_SECONDS:.0f} s closed loop at concurrency {CONCURRENCY}; p99 {result['p99_ms']:.0f} ms",
            f"afterwards: 2 replicas again, {ok}/5 probe requests answered 200",
        ],
    }


def _deploy_config(port: int, args: dict, user_config: dict) -> None:
    """Deploy as `serve deploy serve/config.yaml` (and KubeRay) do: a config whose user_config alone changes is
    applied in place, by each scorer replica's reconfigure() (serve.run would replace the replicas instead)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = {
        "name": "msit",
        "route_prefix": "/",
        "import_path": "serve.app:build",
        "args": args,
        "deployments": [{"name": "MsitScorer", "user_config": user_config}],
    }
    _get_global_client().deploy_apps(
        ServeDeploySchema(http_options={"host": "127.0.0.1", "port": port}, applications=[app]), _blocking=True
    )


def _reload_error(url: str) -> dict | None:
    import requests

    try:
        return requests.get(f"{url}/v1/model", timeout=30).json().get("last_reload_error")
    except (requests.RequestException, ValueError):
        return None


def drill_serve_broken_model(work: Path) -> dict:
    import asyncio

    from ray import serve
    from serve_bench import closed_loop

    from msit.ray_env import init_ray

    model, data, requests = _serving(work)
    broken = work / "broken_model"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(model, broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a truncated copy, as a failed upload
    init_ray(num_cpus=4, quiet=True)
    port = _port()
    args = _serve_args(model, data, replicas=2, num_cpus=0.75)
    push: dict = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _deploy_config(port, args, {})
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _probe(url, requests[0], count=1)[0] == 1, 180, "the endpoint to answer")
        asyncio.run(closed_loop(url, requests, CONCURRENCY, 3.0))
        _, version = _probe(url, requests[0], count=0)  # the good model's version
        before = {r["actor_id"] for r in _scorer_replicas()}

        def push_broken() -> None:
            time.sleep(LOAD_SECONDS / 3)
            started = time.monotonic()
            try:
                _deploy_config(port, args, {"model": str(broken)})
                _wait(lambda: _reload_error(url), 120, "the failed reload to be reported at /v1/model")
                push["result"] = "the config was applied in place; /v1/model reports last_reload_error"
            except Exception as error:  # noqa: BLE001 - what the user sees
                push["result"] = f"the push raised {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            push["seconds"] = time.monotonic() - started

        thread = threading.Thread(target=push_broken, daemon=True)
        thread.start()
        result = asyncio.run(closed_loop(url, requests, CONCURRENCY, LOAD_SECONDS))
        thread.join(timeout=120)
        ok, served = _probe(url, requests[0])
        after = {r["actor_id"] for r in _scorer_replicas()}
    finally:
        serve.shutdown()
    push.setdefault("result", "serve.run had not returned 120 s after the load ended")
    kept = served == version
    return {
        "requests": result["requests"],
        "failed": result["errors"],
        "epochs_lost": None,
        "finished": ok == 5 and kept,
        "notes": [
            f"serve deploy's path (the config's user_config model -> a copy whose model.safetensors is "
            f"truncated, applied in place: reconfigure in each replica), "
            f"{LOAD_SECONDS / 3:.0f} s into a {LOAD_SECONDS:.0f} s closed loop at concurrency {CONCURRENCY}; "
            f"{push['result']}" + (f" after {push['seconds']:.0f} s" if "seconds" in push else ""),
            f"scorer replicas {'kept' if after == before else 'replaced'} ({len(after)} alive after)",
            f"afterwards: {ok}/5 probe requests answered 200, /v1/model version "
            f"{'= the old model' if kept else repr(served)}",
        ],
    }


POISONS = {
    "lone surrogate in a candidate": lambda r: {**r, "candidates": [*r["candidates"][:-1], "\ud800"]},
    "lone surrogate user_id": lambda r: {**r, "user_id": "\udfff"},
    "NaN context value": lambda r: {**r, "context": {"hour": float("nan")}},
    "Infinity context value": lambda r: {**r, "context": {"hour": float("inf")}},
    "timestamp 2^63": lambda r: {**r, "timestamp": 2**63},
}


async def _send_poisons(url: str, requests: list[dict], seconds: float, every_s: float = 0.25) -> Counter:
    """Poisoned requests, one kind after another, while the closed loop runs; their status codes by kind."""
    import asyncio

    import aiohttp

    statuses: Counter = Counter()
    deadline, i = time.perf_counter() + seconds, 0
    kinds = list(POISONS)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        while time.perf_counter() < deadline:
            kind = kinds[i % len(kinds)]
            body = json.dumps(POISONS[kind](requests[i % len(requests)]))  # NaN / Infinity as Python's json writes
            try:
                async with session.post(
                    f"{url}/v1/score", data=body, headers={"content-type": "application/json"}
                ) as response:
                    await response.read()
                    statuses[(kind, response.status)] += 1
            except aiohttp.ClientError as error:
                statuses[(kind, type(error).__name__)] += 1
            i += 1
            await asyncio.sleep(every_s)
    return statuses


def drill_serve_poison(work: Path) -> dict:
    import asyncio

    from ray import serve
    from serve_bench import closed_loop, deploy

    from msit.ray_env import init_ray

    model, data, requests = _serving(work)
    init_ray(num_cpus=4, quiet=True)
    try:
        # One replica and 64 per pass: poisoned requests share forward passes with well-formed ones.
        url = deploy(model, data, _port(), replicas=1, device="cpu", num_cpus=1.0, max_batch_size=64)
        asyncio.run(closed_loop(url, requests, CONCURRENCY, 3.0))

        async def both():
            return await asyncio.gather(
                closed_loop(url, requests, CONCURRENCY, LOAD_SECONDS), _send_poisons(url, requests, LOAD_SECONDS)
            )

        good, poisons = asyncio.run(both())
        ok, _ = _probe(url, requests[0])
    finally:
        serve.shutdown()
    by_kind: dict[str, dict] = {}
    for (kind, status), count in poisons.items():
        by_kind.setdefault(kind, {})[str(status)] = count
    return {
        "requests": good["requests"],
        "failed": good["errors"],
        "epochs_lost": None,
        "finished": ok == 5,
        "notes": [
            f"{sum(poisons.values())} poisoned requests (every 0.25 s) among a {LOAD_SECONDS:.0f} s "
            f"closed loop of well-formed ones at concurrency {CONCURRENCY}, 1 replica, up to 64 "
            "requests per forward pass; requests/failed count the well-formed ones",
            "poisoned answers by kind: " + "; ".join(f"{k}: {v}" for k, v in by_kind.items()),
            f"afterwards: {ok}/5 probe requests answered 200",
        ],
    }


def drill_node_kill_serve(work: Path) -> dict:
    import asyncio

    import ray
    from ray import serve
    from serve_bench import closed_loop, deploy

    model, data, requests = _serving(work)
    port = _port()
    with two_node_cluster(work, "node_kill_serve", head_cpus=3, node_cpus=1) as cluster:
        # The proxy on the head only (one per node would bind one port twice on this machine). While the
        # replicas start, the head keeps room for the ingress and one scorer only: the other goes to the
        # second node. Afterwards the head has room for a replacement.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        hold = _hold_cpus(cluster["head_id"], 2.25)
        url = deploy(model, data, port, replicas=2, device="cpu", num_cpus=0.5)
        replicas = _scorer_replicas()
        ray.kill(hold)
        on_node = sum(r["node_id"] == cluster["node_id"] for r in replicas)
        asyncio.run(closed_loop(url, requests, CONCURRENCY, 3.0))

        async def kill_during_load():
            load = asyncio.create_task(closed_loop(url, requests, CONCURRENCY, LOAD_SECONDS))
            await asyncio.sleep(LOAD_SECONDS / 3)
            os.killpg(cluster["node_pgid"], signal.SIGKILL)
            log(f"killed the second node ({on_node} of {len(replicas)} scorer replicas on it)")
            return await load

        result = asyncio.run(kill_during_load())
        back = False
        with contextlib.suppress(TimeoutError):
            back = bool(_wait(lambda: len(_scorer_replicas()) == 2, 120, "a replacement replica", poll_s=2))
        ok, _ = _probe(url, requests[0])
        serve.shutdown()
    return {
        "requests": result["requests"],
        "failed": result["errors"],
        "epochs_lost": None,
        "finished": ok == 5 and back,
        "notes": [
            f"{on_node} of {len(replicas)} scorer replicas on the second node (1 CPU; head 3 CPUs), its "
            f"process group SIGKILLed {LOAD_SECONDS / 3:.0f} s into a {LOAD_SECONDS:.0f} s closed loop at "
            f"concurrency {CONCURRENCY}; p99 {result['p99_ms']:.0f} ms",
            f"afterwards: {'2 replicas again' if back else 'no second replica within 120 s'}, "
            f"{ok}/5 probe requests answered 200",
            f"failed answers by kind: {result.get('error_kinds') or 'none'}",
        ],
    }


def drill_serve_redis_outage(work: Path) -> dict:
    """Redis stopped under load and started again (its append-only file kept): requests that need the store get
    503s, never other errors; a request with its own history is still scored; health says so; serving recovers
    without a restart, and events posted before the outage are still there."""
    import asyncio

    import requests as http
    from ray import serve
    from serve_bench import closed_loop, deploy, load_histories, make_events

    from msit.data.feature_spec import FeatureSpec
    from msit.ray_env import init_ray
    from msit.serving.local_redis import LocalRedis

    model, data, bodies = _serving(work)
    spec = FeatureSpec.load(model)
    redis_server = LocalRedis(work / "redis_outage", persist=True)
    shutil.rmtree(redis_server.directory, ignore_errors=True)
    redis_server.start()
    init_ray(num_cpus=4, quiet=True)
    try:
        load_histories(data, model, redis_server.url, env=_env(), timeout=300)
        url = deploy(model, data, _port(), replicas=1, device="cpu", history=redis_server.url)
        asyncio.run(closed_loop(url, bodies, CONCURRENCY, 3.0))  # warm-up, not counted
        posted = make_events(data, spec, batches=1, size=20)[0]
        before = http.post(f"{url}/v1/events", json=posted, timeout=30).json()
        user = posted["events"][0]["user_id"]
        own_history = {
            **bodies[0],
            "history": [{k: e[k] for k in ("item_id", "scenario", "label", "timestamp")} for e in posted["events"][:5]],
        }
        during: dict = {}

        async def outage() -> dict:
            load = asyncio.create_task(closed_loop(url, bodies, CONCURRENCY, LOAD_SECONDS))
            await asyncio.sleep(LOAD_SECONDS / 3)
            redis_server.stop()
            await asyncio.sleep(2.0)
            during["health"] = await asyncio.to_thread(lambda: http.get(f"{url}/v1/health", timeout=30).json())
            during["own_history"] = await asyncio.to_thread(
                lambda: http.post(f"{url}/v1/score", json=own_history, timeout=30).status_code
            )
            during["events"] = await asyncio.to_thread(
                lambda: http.post(f"{url}/v1/events", json=posted, timeout=30).status_code
            )
            await asyncio.sleep(max(0.0, LOAD_SECONDS / 3 - 2.0))
            redis_server.start()
            return await load

        result = asyncio.run(outage())
        time.sleep(2.0)
        after_health = http.get(f"{url}/v1/health", timeout=30).json()
        ok, _ = _probe(url, bodies[0])
        again = http.post(f"{url}/v1/events", json=posted, timeout=30).json()  # all duplicates if none was lost
        recommend = http.post(
            f"{url}/v1/recommend",
            json={"user_id": user, "scenario": posted["events"][0]["scenario"], "k": 5},
            timeout=30,
        ).status_code
    finally:
        serve.shutdown()
        redis_server.stop()
    kinds = result.get("error_kinds") or {}
    unavailable = sum(n for kind, n in kinds.items() if kind.startswith("503 "))
    other = result["errors"] - unavailable
    store_state = lambda health: (health.get("history_store") or {}).get("state")  # noqa: E731
    finished = (
        other == 0
        and unavailable > 0
        and during["own_history"] == 200
        and during["events"] == 503
        and store_state(during["health"]) == "unavailable"
        and store_state(after_health) == "ok"
        and ok == 5
        and again == {"applied": 0, "duplicates": len(posted["events"])}
        and recommend == 200
    )
    return {
        "requests": result["requests"],
        "failed": other,
        "epochs_lost": None,
        "finished": finished,
        "unavailable_503": unavailable,
        "notes": [
            f"redis-server stopped {LOAD_SECONDS / 3:.0f} s into a {LOAD_SECONDS:.0f} s closed loop at "
            f"concurrency {CONCURRENCY} and started again (same append-only file) {LOAD_SECONDS / 3:.0f} s "
            f"later: {unavailable} answers were 503, {other} other errors",
            f"during the outage: health history_store {store_state(during['health'])!r}, a request with "
            f"its own history answered {during['own_history']}, POST /v1/events answered "
            f"{during['events']}",
            f"afterwards, with no restart: health {store_state(after_health)!r}, {ok}/5 probes answered "
            f"200; the {before.get('applied')} events posted before the outage sent again: {again}",
            f"failed answers by kind: {kinds or 'none'}",
        ],
    }


DRILLS: dict[str, Callable[[Path], dict]] = {
    "train_rank0_kill": lambda work: drill_train_rank_kill(work, "train_rank0_kill", 0),
    "train_rank1_kill": lambda work: drill_train_rank_kill(work, "train_rank1_kill", 1),
    "driver_kill": drill_driver_kill,
    "node_kill_train": drill_node_kill_train,
    "node_kill_serve": drill_node_kill_serve,
    "serve_replica_kill": drill_serve_replica_kill,
    "serve_broken_model": drill_serve_broken_model,
    "serve_poison": drill_serve_poison,
    "serve_redis_outage": drill_serve_redis_outage,
}


# --- the child: one drill ----------------------------------------------------------------------------------------


def run_child(name: str, work: Path, result_file: Path) -> None:
    """Runs one drill; a watchdog ends it (result: not finished) if it outlives its deadline."""
    os.environ.update({k: v for k, v in _env().items() if k in ("PYTHONPATH", "RAY_TRAIN_ENABLE_PRINT_PATCH")})
    os.environ.pop("RAY_ADDRESS", None)
    if name.startswith("node_"):  # read when ray is imported: clients of a `ray start` cluster present its token
        os.environ["RAY_AUTH_MODE"] = "token"
    deadline = TIMEOUTS[name]

    def watchdog() -> None:
        time.sleep(deadline)
        if not result_file.exists():
            result_file.write_text(
                json.dumps(
                    {
                        "requests": None,
                        "failed": None,
                        "epochs_lost": None,
                        "finished": False,
                        "notes": [f"drill timed out after {deadline} s"],
                    }
                )
            )
        os._exit(3)  # main stops the process groups this drill registered

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        entry = DRILLS[name](work)
    except Exception as error:  # noqa: BLE001 - a drill that could not run is recorded as such
        traceback.print_exc()
        entry = {
            "requests": None,
            "failed": None,
            "epochs_lost": None,
            "finished": False,
            "notes": [f"drill failed: {_first_line(error)}"],
        }
    result_file.write_text(json.dumps(entry))
    sys.stdout.flush()
    os._exit(0)  # not waiting on Ray's atexit hooks or lingering non-daemon threads


# --- main ----------------------------------------------------------------------------------------------------------


def run_drill(name: str, work: Path) -> dict:
    result_file, groups = work / f"{name}.result.json", work / f"{name}.groups"
    result_file.unlink(missing_ok=True)
    groups.unlink(missing_ok=True)
    (work / name).mkdir(parents=True, exist_ok=True)
    log(f"== {name}")
    started = time.monotonic()
    with (work / f"{name}.log").open("w") as stderr:
        child = subprocess.Popen(
            [PYTHON, __file__, "--run-drill", name, "--work", str(work), "--result", str(result_file)],
            env=_env(),
            cwd=ROOT,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            child.wait(timeout=TIMEOUTS[name] + 120)
        except subprocess.TimeoutExpired:
            log(f"{name}: the child outlived its watchdog; killing it")
        finally:
            stop_group(child.pid, grace_s=10, term=False)
            for line in groups.read_text().split() if groups.exists() else []:
                stop_group(int(line))
    if result_file.is_file():
        entry = json.loads(result_file.read_text())
    else:
        entry = {
            "requests": None,
            "failed": None,
            "epochs_lost": None,
            "finished": False,
            "notes": [f"the drill process ended ({child.returncode}) without a result; see {work / name}.log"],
        }
    entry = {"name": name, **entry, "seconds": round(time.monotonic() - started, 1)}
    log(f"{name}: {json.dumps({k: entry[k] for k in ('requests', 'failed', 'epochs_lost', 'finished')})}")
    for note in entry["notes"]:
        log(f"  {note}")
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated drills (default all): {', '.join(DRILLS)}")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    parser.add_argument("--work", default=str(WORK), help="scratch directory (data, runs, logs; default %(default)s)")
    parser.add_argument("--run-drill", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    if args.run_drill:
        run_child(args.run_drill, work, Path(args.result))
        return
    names = list(DRILLS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        parser.error(f"unknown drill(s) {', '.join(unknown)}; known: {', '.join(DRILLS)}")
    provenance = stamp("cpu")
    sys.path.insert(0, str(ROOT))  # setup trains in this process: this checkout's msit, whatever is installed
    out = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    setup(work)
    entries = {}
    for name in names:
        entries[name] = {
            **run_drill(name, work),
            "commit": provenance["commit"],
            "tree_clean": provenance["tree_clean"],
        }
    previous = json.loads(out.read_text()).get("drills", []) if out.is_file() and args.only else []
    # an entry written before provenance.py names tree_clean `clean`
    kept = [
        {**{k: v for k, v in d.items() if k != "clean"}, "tree_clean": d.get("tree_clean", d.get("clean"))}
        for d in previous
        if d["name"] not in entries
    ]
    drills = sorted(
        [*kept, *entries.values()], key=lambda d: list(DRILLS).index(d["name"]) if d["name"] in DRILLS else len(DRILLS)
    )
    report = {
        "drills": drills,
        **provenance,
        "notes": [
            "commit, tree_clean, command at the top: the run that last wrote this file; each drill's "
            "entry has the commit it ran on",
            "requests/failed: serving drills (failed = non-200 answers to well-formed requests; in "
            "the Redis outage, answers other than 200 or 503); "
            "epochs_lost: training drills (the interrupted epoch plus any checkpointed epoch redone; "
            "1 = only the epoch since the last checkpoint)",
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
