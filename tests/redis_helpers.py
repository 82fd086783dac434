"""A real redis-server for the tests (msit.serving.local_redis); a missing or broken one fails, never skips."""

from pathlib import Path

import pytest

from msit.serving.local_redis import LocalRedis, RedisNotAvailable


class RedisServer(LocalRedis):
    def __init__(self, directory: Path, port: int | None = None):
        try:
            super().__init__(directory, port)
        except RedisNotAvailable as error:  # the Redis tests must run
            pytest.fail(f"{error}; the history store tests run against a real Redis server")

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        try:
            return super().start(timeout_s)
        except RedisNotAvailable as error:
            pytest.fail(str(error))
