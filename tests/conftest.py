import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The benchmark data lives in ../shared/data beside the repo (override with MSIT_SHARED_DATA).
SHARED_DATA = Path(os.environ.get("MSIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# Markers (registered in pyproject.toml) that follow from the fixtures a test uses, directly or through others;
# a module that starts Ray some other way marks itself (pytestmark = pytest.mark.ray).
MARK_BY_FIXTURE = {"ray_session": "ray", "shared_data": "shared_data", "redis_server": "redis"}


FORBID_RAY_TMPDIR = pytest.StashKey[str]()


def pytest_addoption(parser):
    parser.addoption(
        "--forbid-ray",
        action="store_true",
        help="fail a test not marked `ray` that starts Ray, in this process or in a subprocess (make test-fast)",
    )


def pytest_configure(config):
    if config.getoption("--forbid-ray"):
        # Ray keeps each local instance's session under $RAY_TMPDIR/ray; subprocesses inherit the variable.
        config.stash[FORBID_RAY_TMPDIR] = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="msit-forbid-ray-")


def pytest_unconfigure(config):
    if FORBID_RAY_TMPDIR in config.stash:
        shutil.rmtree(config.stash[FORBID_RAY_TMPDIR], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, mark in MARK_BY_FIXTURE.items():
            if fixture in item.fixturenames:
                item.add_marker(mark)


def _seed_everything() -> None:
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Every fixture and every test starts from the same random state, so that what it draws (a model's initial
    weights, above all) does not depend on which tests ran before it in the process."""
    _seed_everything()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    _seed_everything()
    return (yield)


def _ray_sessions() -> set[str]:
    root = Path(os.environ["RAY_TMPDIR"]) / "ray"
    return {p.name for p in root.glob("session_*")} if root.is_dir() else set()


def _ray_running_here() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()  # not imported: cannot have started


RAY_BEFORE = pytest.StashKey[tuple[bool, set[str]]]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test is set up (a module fixture may start Ray for its first test)."""
    item.stash[RAY_BEFORE] = _ray_running_here(), _ray_sessions() if item.config.getoption("--forbid-ray") else set()


@pytest.fixture(autouse=True)
def _starts_ray_only_if_marked(request):
    """A test that is not marked `ray` fails if Ray starts during it or its fixtures (with --forbid-ray, also in a
    subprocess). Without it, only until the first `ray` test has started the session's instance."""
    yield
    if request.node.get_closest_marker("ray"):
        return
    forbid = request.config.getoption("--forbid-ray")
    running, sessions = request.node.stash[RAY_BEFORE]
    if not running and _ray_running_here():
        pytest.fail("started Ray in this process but is not marked `ray`", pytrace=False)
    if forbid and _ray_sessions() - sessions:
        pytest.fail(
            f"started Ray (a new session under {os.environ['RAY_TMPDIR']}) but is not marked `ray`", pytrace=False
        )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"benchmark data not found at {SHARED_DATA}: clone the repo with ../shared beside it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (start-up costs ~10 s)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    from msit.ray_env import init_ray

    # More logical CPUs than cores, so that Ray Data tasks never wait on each other on a 2-core box.
    init_ray(num_cpus=4, quiet=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def small_prepared(ray_session, tmp_path_factory):
    """A small synthetic scene log, prepared once for the session: (log dir, prepared dir)."""
    from msit.data import synth
    from msit.data.prepare import PrepareConfig, prepare
    from msit.data.spec import SceneLogSpec

    root = tmp_path_factory.mktemp("small")
    synth.write(synth.SynthConfig(users=400, items=300, events_per_user=25, seed=11), root / "log", progress=False)
    prepare(
        PrepareConfig(
            inputs=[str(root / "log")], out=str(root / "prepared"), spec=SceneLogSpec.load(root / "log" / "spec.yaml")
        ),
        log=lambda _: None,
    )
    return root / "log", root / "prepared"


@pytest.fixture(scope="session")
def small_model(small_prepared, tmp_path_factory):
    """A small MSIT model trained for one epoch on `small_prepared` (single process): (model dir, prepared dir)."""
    from msit.data.feature_spec import FeatureSpec
    from msit.data.prepared import load_split
    from msit.model import ModelConfig, build_for_data
    from msit.model.model_dir import save_model_dir
    from msit.training.trainer import TrainConfig, fit

    _, prepared = small_prepared
    spec = FeatureSpec.load(prepared)
    config = ModelConfig(embed_dim=16, mlp_dims=(32,), history_length=10)
    model = build_for_data(config, prepared, spec)
    fit(
        model,
        load_split(prepared, "train", spec),
        load_split(prepared, "val", spec),
        spec,
        TrainConfig(epochs=1, batch_size=256, lr=5e-3),
        log=lambda _: None,
    )
    return save_model_dir(tmp_path_factory.mktemp("model") / "model", model, config, spec), prepared


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A redis-server of the session's own (free port, 127.0.0.1, no persistence); fails if it is not installed."""
    from tests.redis_helpers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
