"""Starting or joining Ray, the same way for every command."""

from __future__ import annotations

import os
import socket
import sys

import ray


def init_ray(num_cpus: int | None = None, quiet: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local
    one on 127.0.0.1. `num_cpus` only applies to a new local instance."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # "local", not None: ray.init(None) would join whatever cluster /tmp/ray last recorded, even a dead one.
    # The dashboard (on 127.0.0.1) serves the state API, which Ray Train's placement-group cleaner needs: without
    # it, a Train run stopped from outside (a trial ASHA stops) keeps its CPUs and the next trials hang.
    kwargs: dict = (
        {"address": address}
        if address
        else {"address": "local", "num_cpus": num_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1"}
    )
    chosen = os.environ.get("RAY_GCS_SERVER_PORT")  # read by ray.init when it starts the head
    if not address:
        # The state API in a worker finds its cluster by RAY_ADDRESS, else by looking for running instances, and
        # fails with a second one on the machine ("Found multiple active Ray instances"): then the cleaner never
        # frees a stopped trial's CPUs. So the new instance's GCS gets a port chosen here, and its workers the
        # address.
        port = int(chosen) if chosen else free_ports(1)[0]
        kwargs["runtime_env"] = {"env_vars": {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}}
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        # logging_level is typed int, but ray hands it to `logging`, which takes level names too
        ray.init(
            log_to_driver=not quiet,
            configure_logging=True,
            logging_level="WARNING",  # type: ignore[arg-type]
            **kwargs,
        )
    finally:
        if not address and not chosen:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    # Without a terminal (CI, `ray job logs`), Ray Data logs every operator's progress every few seconds:
    # keep the one overall line.
    ctx.enable_operator_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1, for a second Ray cluster (`ray start`) beside this one."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# Linux hands out ephemeral ports from 32768 up: free_ports' ports, and those of the workers of a Ray instance that
# ray.init started. `ray start` puts workers on 10002-19999 by default. A block between the two collides with neither.
_WORKER_PORTS_LOW, _WORKER_PORTS_HIGH = 20_000, 32_767


def worker_port_block(count: int) -> tuple[int, int]:
    """The first and last of `count` consecutive ports for a second cluster's workers (`--min/max-worker-port`),
    chosen by this process's id so that concurrent test runs get different blocks."""
    blocks = (_WORKER_PORTS_HIGH - _WORKER_PORTS_LOW + 1) // count
    low = _WORKER_PORTS_LOW + os.getpid() % blocks * count
    return low, low + count - 1
