"""Test session: a private redis-server on a free port, the fragile API, real celery processes.

Nothing here touches the shared Redis on 6379: the session's server is started on
a free port and REDIS_URL points at it before the app is first imported.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.fragile_api import FragileAPI  # noqa: E402
from demo.redis_server import RedisServer  # noqa: E402
from tests import procs  # noqa: E402

_SESSION_REDIS = RedisServer(appendonly=True).start()
os.environ["REDIS_URL"] = _SESSION_REDIS.url
for _name in [k for k in os.environ if k.startswith("ONELANE_")]:
    del os.environ[_name]
os.environ["ONELANE_BACKOFF_BASE"] = "0.2"
os.environ["ONELANE_BACKOFF_MAX"] = "1"
# the fragile API listens on 127.0.0.1, which onelane refuses by default
os.environ["ONELANE_ALLOW_PRIVATE_NETWORKS"] = "1"


TIERS = ("unit", "redis", "e2e", "soak")


def pytest_collection_modifyitems(config, items):
    """Every test belongs to exactly one tier, so `make test-fast` (unit + redis) is honest."""
    bad = [item.nodeid for item in items
           if len({m.name for m in item.iter_markers() if m.name in TIERS}) != 1]
    if bad:
        raise pytest.UsageError(f"tests without exactly one tier marker ({', '.join(TIERS)}): {', '.join(bad)}")


def pytest_sessionfinish(session, exitstatus):
    _SESSION_REDIS.close()


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    return _SESSION_REDIS


@pytest.fixture
def redis_client(redis_server):
    """A client of the session's private server, emptied before each test."""
    import redis

    c = redis.Redis.from_url(redis_server.url)
    c.flushdb()
    yield c
    c.close()


@pytest.fixture
def api():
    with FragileAPI() as server:
        yield server


@pytest.fixture
def base_env(redis_server) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONELANE_")}
    env.update(REDIS_URL=redis_server.url, PYTHONPATH=str(ROOT), ONELANE_BACKOFF_BASE="0.2",
               ONELANE_BACKOFF_MAX="1", ONELANE_ALLOW_PRIVATE_NETWORKS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def start():
    """Start celery processes; every one is stopped (by pid) when the test ends."""
    started: list[procs.CeleryProcess] = []

    def _start(p: procs.CeleryProcess, **kw) -> procs.CeleryProcess:
        started.append(p)
        return p.start(**kw)

    yield _start
    procs.stop_all(started)


@pytest.fixture(scope="session")
def celery_app():
    """The in-process app (a producer), pointed at the session's Redis."""
    from tasks import app

    return app
