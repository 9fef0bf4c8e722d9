"""A redis-server of the test's own on a free loopback port (Celery's broker in production).

`running_redis(tmp_dir)` starts one (`cloud.worker.scratch_redis`) and yields its URL. Needs the
redis-server binary (`scripts/services.sh redis`, which `make test` runs); without it the test is
skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from testsupport.redis import RedisUnavailable, redis_binary, scratch_redis


@contextmanager
def running_redis(tmp_dir: Path) -> Iterator[str]:
    """A redis-server on 127.0.0.1 and a free port, its files in `tmp_dir`; yields `redis://...:PORT/0`."""
    try:
        redis_binary()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    with scratch_redis(tmp_dir) as url:
        yield url
