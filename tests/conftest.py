import os
from pathlib import Path

import pytest

# The benchmark data lives in ../shared/data beside the repo (override with MSIT_SHARED_DATA).
SHARED_DATA = Path(os.environ.get("MSIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


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
    prepare(PrepareConfig(inputs=[str(root / "log")], out=str(root / "prepared"), history_length=10,
                          spec=SceneLogSpec.load(root / "log" / "spec.yaml")), log=lambda _: None)
    return root / "log", root / "prepared"
