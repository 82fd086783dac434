"""init_ray's local instance tells its workers where it is: with a second Ray instance on the machine, a worker's
state API lookup (what Ray Train's placement-group cleaner does to free a stopped trial's CPUs) still works."""

import subprocess
import sys

import ray

SECOND_INSTANCE = (
    "import ray, sys; ray.init(address='local', num_cpus=1, include_dashboard=False); "
    "print('up', flush=True); sys.stdin.read()"  # until the test closes stdin
)


@ray.remote(num_cpus=0)
def state_api_lookup() -> str:
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=30)
        return "ok"
    except ConnectionError as e:  # "Found multiple active Ray instances": report it, do not crash the task
        return f"{type(e).__name__}: {e}"


def test_workers_find_their_cluster_with_a_second_instance_on_the_machine(ray_session):
    assert ray.get(state_api_lookup.remote(), timeout=120) == "ok"
    other = subprocess.Popen(
        [sys.executable, "-c", SECOND_INSTANCE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "up"
        assert ray.get(state_api_lookup.remote(), timeout=120) == "ok"
    finally:
        other.stdin.close()  # type: ignore[union-attr]
        other.wait(timeout=60)
