"""Redis as it really fails, short of a clean restart: an evicting policy, out of memory, loading,
and data loss. Each case has a private redis-server of its own; real workers, standby and beat."""
from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
import redis
from celery import Celery

from demo.redis_server import RedisServer
from tests import procs
from tests.procs import wait_for

pytestmark = pytest.mark.e2e

ONELANE = str(procs.VENV_BIN / "onelane")


def cli(env, *args):
    return subprocess.run([ONELANE, *args], env=env, capture_output=True, text=True, timeout=60)


def producer(url: str) -> Celery:
    app = Celery(broker=url, backend=url)
    app.conf.task_serializer = "json"
    return app


def publish(app, api, key: str):
    return app.send_task("tasks.callout", queue="serial",
                         kwargs={"url": f"{api.url}/{key}", "json": {"key": key}, "idempotency_key": key})


def refused_worker(start, env, name):
    w = procs.worker(env, name)
    start(w, wait_ready=False)
    wait_for(lambda: w.proc.poll() is not None, 60, what=f"worker {name} to exit")
    return w


def test_an_evicting_redis_is_refused_unless_allowed(base_env, start):
    with RedisServer(extra_args=("--maxmemory-policy", "volatile-lru")) as server:
        env = {**base_env, "REDIS_URL": server.url}
        # Given a Redis that evicts keys with an expiry (leases) under memory pressure
        # When a worker starts: it refuses, naming the policy, why, and the fix
        w = refused_worker(start, env, "evict")
        log = w.log()
        assert w.proc.returncode != 0, log[-2000:]
        assert "'volatile-lru'" in log and "noeviction" in log and "ONELANE_ALLOW_EVICTION=1" in log
        assert "Traceback" not in log and "ready." not in log
        # ... and so does beat
        b = procs.beat(env)
        start(b, wait_ready=False)
        wait_for(lambda: b.proc.poll() is not None, 60, what="beat to exit")
        assert b.proc.returncode != 0 and "'volatile-lru'" in b.log()
        # With ONELANE_ALLOW_EVICTION=1 it starts, and warns
        ok = start(procs.worker({**env, "ONELANE_ALLOW_EVICTION": "1"}, "evict-ok"))
        assert "starting anyway: ONELANE_ALLOW_EVICTION=1" in ok.log()
        # onelane status shows the policy (and the memory)
        st = json.loads(cli(env, "status", "--json").stdout)
        assert st["redis"]["maxmemory_policy"] == "volatile-lru" and st["redis"]["eviction_safe"] is False
        assert st["redis"]["used_memory"] > 0
        assert "may evict leases" in cli({**env, "COLUMNS": "160"}, "status").stdout


def test_out_of_memory_for_5_s_loses_nothing_doubles_nothing_and_stops_no_worker(base_env, start, api):
    with RedisServer() as server:
        env = {**base_env, "REDIS_URL": server.url}
        client = redis.Redis.from_url(server.url)
        api.delay_s = 0.2
        # Given an active worker, a hot standby, beat, and 30 callouts of 200 ms queued
        active = start(procs.worker(env, "active"))
        standby = start(procs.worker({**env, "ONELANE_STANDBY": "1"}, "standby"), wait_ready=False)
        standby.wait_log("standby", 30)
        beat = start(procs.beat(env))
        app = producer(server.url)
        results = [publish(app, api, f"o{i:02d}") for i in range(30)]
        wait_for(lambda: len(api.snapshot()) >= 5, 30, what="the first five calls")
        # When Redis is at maxmemory (noeviction) for 5 s: every write refused with OOM
        client.config_set("maxmemory", "1")
        oom_from = time.time()
        time.sleep(5)
        client.config_set("maxmemory", "0")
        freed_at = time.time()
        # Then every callout completes, exactly once, in order, with no overlap
        for r in results:
            assert r.get(timeout=120)["status_code"] == 200
        keys = [c.key for c in api.snapshot()]
        assert keys == [f"o{i:02d}" for i in range(30)], keys
        assert api.overlaps == 0
        # ... both workers still run, and the lane flowed again soon after memory was freed
        assert active.proc.poll() is None and standby.proc.poll() is None
        during = [c for c in api.snapshot() if oom_from < c.start < freed_at]
        after = [c for c in api.snapshot() if c.start >= freed_at]
        resumed_s = (after[0].start - freed_at) if after else 0.0
        assert resumed_s < 10, resumed_s
        assert "out of memory" in active.log()
        procs.stop_all([active, standby, beat])  # while Redis still answers: a warm shutdown needs it
        print(f"\nOOM 5 s: 30/30 completed, {len(keys)} calls at the API, {api.overlaps} overlaps, "
              f"{len(during)} call(s) started during the spell, flowing again {resumed_s:.1f} s after memory "
              "was freed; both workers still running")


def _answers_loading(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"EXISTS any\r\n")  # PING answers even while loading; data commands do not
            return s.recv(64).startswith(b"-LOADING")
    except OSError:
        return False


def test_a_worker_started_while_redis_loads_its_data_waits_then_consumes(base_env, start, api):
    with RedisServer(appendonly=False) as server:
        env = {**base_env, "REDIS_URL": server.url}
        client = redis.Redis.from_url(server.url)
        # Given a callout queued and a data set that takes a few seconds to load after a restart
        r = publish(producer(server.url), api, "loaded")
        pipe = client.pipeline(transaction=False)
        for i in range(4000):
            pipe.set(f"filler:{i}", "x")
        pipe.execute()
        client.save()
        # ~10 s of LOADING (Redis answers clients every 1 KiB loaded, LOADING until it is done)
        server.restart(extra_args=("--key-load-delay", "2500", "--loading-process-events-interval-bytes", "1024"),
                       wait=False)
        wait_for(lambda: _answers_loading(server.port), 10, what="Redis to answer LOADING")
        # When a worker starts meanwhile
        w = procs.worker(env, "loading")
        start(w, wait_ready=False)
        # Then it waits for the data set, says so, and then consumes
        w.wait_log("is loading its data", 30)
        w.wait_log("ready.", 90)
        assert w.proc.poll() is None
        assert r.get(timeout=60)["status_code"] == 200
        assert len(api.calls_for("loaded")) == 1


def test_redis_restarted_empty_tokens_keep_growing_and_the_loss_is_told(base_env, start, api):
    with RedisServer(appendonly=False) as server:
        env = {**base_env, "REDIS_URL": server.url, "ONELANE_GUARD_TTL": "2"}
        w = start(procs.worker(env))
        app = producer(server.url)
        first = [publish(app, api, f"before{i}") for i in range(5)]
        for r in first:
            r.get(timeout=30)
        # When Redis comes back without its data (no persistence)
        server.restart(kill=True, empty=True)
        # Then the worker notices and says what was lost
        w.wait_log("Redis lost its data", 30)
        assert "dedupe history" in w.log()
        time.sleep(3)  # the worker reconnects and declares its queue again
        app = producer(server.url)
        second = [publish(app, api, f"after{i}") for i in range(5)]
        for r in second:
            assert r.get(timeout=60)["status_code"] == 200
        # ... the fencing tokens the API saw never went backwards
        fences = [c.fence for c in api.snapshot()]
        assert len(fences) == 10 and all(a < b for a, b in zip(fences, fences[1:])), fences
        # ... and onelane status shows the loss
        st = json.loads(cli(env, "status", "--json").stdout)
        [loss] = st["redis"]["data_losses"]
        assert loss["detected_by"].startswith("worker")
        print(f"\nfencing tokens across an empty restart: {fences[:5]} then {fences[5:]}")
