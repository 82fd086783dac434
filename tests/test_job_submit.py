"""`ray job submit` against a head started with `ray start --head`, as the README tells users to do."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from msit.model.model_dir import load_model_dir
from msit.ray_env import free_ports, worker_port_block

pytestmark = pytest.mark.ray  # starts a Ray cluster of its own (`ray start --head`, its own temp dir)

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_head(tmp_path):
    """A second, separate Ray cluster (`ray start --head --block`) on its own ports, beside the session's
    instance; SIGTERM to the blocking `ray start` shuts down exactly this cluster (`ray stop` would kill both)."""
    gcs, dashboard, agent_http, agent_grpc, metrics, env_agent, client = free_ports(7)
    worker_low, worker_high = worker_port_block(20)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (tmp_path / "head.log").open("w")
    # Its own short temp dir (socket paths are length-limited): the address file it leaves behind stays there.
    temp_dir = tempfile.mkdtemp(prefix="msit-head-", dir="/tmp")
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--num-cpus=2",
            f"--port={gcs}",
            f"--temp-dir={temp_dir}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={env_agent}",
            f"--ray-client-server-port={client}",
            f"--min-worker-port={worker_low}",
            f"--max-worker-port={worker_high}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    client_env = {**env, "RAY_AUTH_MODE": "token"}  # Ray 2.60 clients must present the cluster's token
    try:
        deadline = time.monotonic() + 120
        while (
            subprocess.run(
                [RAY, "job", "list", "--address", address], env=client_env, capture_output=True, check=False
            ).returncode
            != 0
        ):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not come up:\n{(tmp_path / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield address, client_env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_and_exports_a_model(ray_head, small_prepared, tmp_path):
    address, client_env = ray_head
    _, prepared = small_prepared
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": str(prepared),
                "output": str(tmp_path / "model"),
                "model": {"embed_dim": 16, "mlp_dims": [32]},
                "train": {"epochs": 2, "batch_size": 256, "lr": 5e-3},
                "scaling": {"num_workers": 1, "use_gpu": "auto"},
                "run": {"name": "job-submit", "storage_path": str(tmp_path / "ray_results")},
            }
        )
    )
    submitted = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            "msit-test",
            "--working-dir",
            str(REPO),
            "--",
            sys.executable,
            "train/main.py",
            "--config",
            str(config),
        ],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, logs[-4000:]
    status = subprocess.run(
        [RAY, "job", "status", "--address", address, "msit-test"],
        env=client_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert "succeeded" in (status.stdout + status.stderr).lower()
    assert f"exported to {tmp_path / 'model'}" in logs  # the driver ran inside the job and told the user
    loaded = load_model_dir(tmp_path / "model")
    assert loaded.info["train"]["epoch"] >= 1 and loaded.config.embed_dim == 16
