"""A throwaway redis-server on this machine: 127.0.0.1, a free port, no persistence unless asked.

For the tests, benchmarks and fault drills, which need a real Redis but must not depend on one running
already. Production deployments run their own Redis (see deploy/README.md).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


class RedisNotAvailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    def __init__(self, directory: Path, port: int | None = None, persist: bool = False):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotAvailable(
                "redis-server is not installed: `apt-get install redis-server` (Debian/Ubuntu) or `brew install redis`"
            )
        self.binary, self.directory, self.port = binary, Path(directory), port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.persist = persist  # an append-only file in `directory`, fsynced per write: a restart keeps the data
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *(["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]),
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    raise RedisNotAvailable(
                        f"redis-server exited with {self.process.returncode} on port {self.port}"
                    ) from None
                time.sleep(0.1)
        self.stop()
        raise RedisNotAvailable(f"redis-server did not accept connections on port {self.port} in {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
