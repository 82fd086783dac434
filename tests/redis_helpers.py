"""A real redis-server for the tests: started on a free 127.0.0.1 port in a temporary directory, no persistence."""

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None):
        binary = shutil.which("redis-server")
        if binary is None:  # a failure, never a skip: the Redis tests must run
            pytest.fail("redis-server is not installed: `apt-get install redis-server` (Debian/Ubuntu) or "
                        "`brew install redis`; the history store tests run against a real Redis server")
        self.binary, self.directory, self.port = binary, directory, port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        for _ in range(100):  # up to ~10 s to accept connections
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    pytest.fail(f"redis-server exited with {self.process.returncode} on port {self.port}")
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"redis-server did not accept connections on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None
