"""High availability: Redis behind Sentinel, failovers with nothing lost, doubled or overlapped.

Real servers on free ports: a master, two replicas (so that one remains to confirm writes
after the master dies) and three sentinels (``redis-server --sentinel``), with
``down-after-milliseconds 1000``. Workers, beat and the CLI use the sentinel:// URL.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import redis
from celery import Celery

from demo.redis_server import SentinelCluster
from onelane.core.keys import Keys
from tests import procs
from tests.procs import wait_for

pytestmark = pytest.mark.e2e

KEYS = Keys()
ONELANE = str(procs.VENV_BIN / "onelane")


@pytest.fixture
def cluster():
    with SentinelCluster(replicas=2) as c:
        yield c


def sentinel_env(base_env, cluster, **extra) -> dict:
    return {**base_env, "REDIS_URL": cluster.url, "ONELANE_SENTINEL_MASTER": cluster.master_name, **extra}


def producer(cluster) -> Celery:
    app = Celery(broker=cluster.url, backend=cluster.url)
    app.conf.update(task_serializer="json", broker_transport_options={"master_name": cluster.master_name},
                    result_backend_transport_options={"master_name": cluster.master_name})
    return app


def publish(app, api, key: str, queue: str = "serial", **extra):
    return app.send_task("tasks.callout", queue=queue,
                         kwargs={"url": f"{api.url}/{key}", "json": {"key": key}, "idempotency_key": key, **extra})


def result_of(r, cluster, timeout_s: float = 120):
    """r.get(), asked again from a fresh producer when the producer's own result connection breaks
    during the failover (Celery's result consumer raises when the sentinels briefly name no master,
    or on its closed socket)."""
    from celery.result import AsyncResult

    give_up = time.monotonic() + timeout_s
    while True:
        try:
            return r.get(timeout=max(1.0, give_up - time.monotonic()))
        except (redis.ConnectionError, ValueError, OSError):
            if time.monotonic() > give_up:
                raise
            time.sleep(0.5)
            r = AsyncResult(r.id, app=producer(cluster))


def master_client(cluster) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=cluster.current_master_port(), socket_timeout=5)


def flow_through(kind, base_env, cluster, api, start, n=24):
    """Callouts flowing on a lane while the master is killed (or handed over): the figures."""
    env = sentinel_env(base_env, cluster, ONELANE_GUARD_TTL="3")
    api.delay_s = 0.2
    w = start(procs.worker(env))
    start(procs.beat(env))
    app = producer(cluster)
    results = [publish(app, api, f"f{i:02d}") for i in range(n)]
    wait_for(lambda: len(api.snapshot()) >= 5, 60, what="the first five calls")
    old = cluster.current_master_port()
    if kind == "kill":
        cluster.current_master().stop(kill=True)
    else:
        cluster.failover()
    lost_at = time.time()
    cluster.wait_failover(old)
    try:
        for r in results:
            assert result_of(r, cluster)["status_code"] == 200
    except Exception:
        print("\nWORKER LOG", "\n".join(line for line in w.log().splitlines()
                                         if not line.startswith((" ", "Traceback")))[-6000:])
        c = master_client(cluster)
        print("\nREDIS", {k: c.type(k) for k in c.keys("*")}, "serial", c.llen("serial"), "ready",
              c.llen(KEYS.ready("serial")), "unacked", c.hlen("unacked"), c.hgetall(KEYS.coalesce_started("serial")))
        raise
    calls = api.snapshot()
    keys = [c.key for c in calls]
    # every callout reached the API exactly once (a call in flight at the failover is not
    # repeated: its outcome is recorded on the new master), in order, never two at once
    if keys != [f"f{i:02d}" for i in range(n)]:
        print("\nCALLS", [(c.key, c.fence % 100000, round(c.start - lost_at, 2), c.status) for c in calls])
    assert keys == [f"f{i:02d}" for i in range(n)]
    assert api.overlaps == 0
    fences = [c.fence for c in calls]
    assert all(a < b for a, b in zip(fences, fences[1:])), fences
    after = [c for c in calls if c.start > lost_at]
    resumed_s = after[0].start - lost_at if after else 0.0
    assert w.proc.poll() is None
    if resumed_s >= 10:
        print("\nWORKER LOG", "\n".join(line for line in w.log().splitlines() if "onelane" in line or "rror" in line
                                         or "onnect" in line)[-4000:])
    return resumed_s


def test_master_killed_mid_flow_nothing_lost_doubled_or_overlapped_and_resumes_within_10_s(
        base_env, cluster, api, start):
    resumed_s = flow_through("kill", base_env, cluster, api, start)
    assert resumed_s < 10, resumed_s
    print(f"\nmaster killed: 24/24 once each, 0 overlaps, order kept; consumption resumed {resumed_s:.1f} s "
          "after the kill")


def test_a_planned_failover_during_a_run_loses_and_doubles_nothing(base_env, cluster, api, start):
    resumed_s = flow_through("planned", base_env, cluster, api, start)
    assert resumed_s < 10, resumed_s
    print(f"\nSENTINEL FAILOVER: 24/24 once each, 0 overlaps; resumed {resumed_s:.1f} s after it was asked")


def test_a_lease_survives_a_failover_and_an_unconfirmed_grant_is_never_used(base_env, cluster, api, start):
    from onelane.coordination.lease import Lease
    from onelane.core.clients import get_client
    from onelane.core.replication import NotReplicated, Replicas

    # A lease granted (and confirmed by the replicas) is still held after a failover, with its fence
    client = get_client(cluster.url, sentinel_master=cluster.master_name)
    lease = Lease(client, "resource:ha", keys=KEYS, replicas=Replicas(2, 1000))
    grant = lease.acquire("holder-1", ttl_ms=60_000)
    old = cluster.current_master_port()
    cluster.failover()
    cluster.wait_failover(old)
    moved = wait_for(lambda: _holder_on_new_master(cluster), 30, what="the lease on the new master")
    assert moved["token"] == "holder-1" and int(moved["fence"]) == grant.fence
    cluster.wait_settled(60)
    # A grant the replicas do not confirm (both frozen) is released at once and never counts
    stopped = [r for r in cluster.servers if r.port != cluster.current_master_port()]
    for r in stopped:
        os.kill(r.proc.pid, signal.SIGSTOP)
    try:
        other = Lease(client, "resource:ha2", keys=KEYS, replicas=Replicas(1, 300))
        with pytest.raises(NotReplicated):
            other.try_acquire("holder-2", ttl_ms=60_000)
        assert other.holder() is None
        # ... and a worker waits instead of calling the API
        env = sentinel_env(base_env, cluster, ONELANE_REPLICA_TIMEOUT_MS="300")
        w = start(procs.worker(env), wait_ready=False)
        time.sleep(0.5)
        for r in stopped:  # let the worker start (its start-up writes wait for replicas too)
            os.kill(r.proc.pid, signal.SIGCONT)
        w.wait_log("ready.", 60)
        for r in stopped:
            os.kill(r.proc.pid, signal.SIGSTOP)
        app = producer(cluster)
        res = publish(app, api, "unconfirmed")
        time.sleep(2.5)
        assert api.calls_for("unconfirmed") == []
        assert "replica" in w.log() and "confirm" in w.log()
    finally:
        for r in stopped:
            os.kill(r.proc.pid, signal.SIGCONT)
    # once the replicas answer again, it runs, once
    assert result_of(res, cluster, 60)["status_code"] == 200
    assert len(api.calls_for("unconfirmed")) == 1


def _holder_on_new_master(cluster):
    c = redis.Redis(host="127.0.0.1", port=cluster.current_master_port(), socket_timeout=2, decode_responses=True)
    holder = c.hgetall(KEYS.lease_holder("resource:ha"))
    return holder if holder.get("token") else None


def test_bulk_slots_survive_a_failover_and_the_cap_holds(base_env, cluster, api, start):
    env = sentinel_env(base_env, cluster, ONELANE_LIMITS=json.dumps({"acme": {"concurrency": 3}}))
    api.capacity, api.delay_s = 3, 0.1
    workers = [start(procs.worker(env, f"bulk{i}", queue="bulk", extra=["--pool", "threads", "-c", "4"]))
               for i in range(2)]
    app = producer(cluster)
    results = [publish(app, api, f"b{i:02d}", queue="bulk", resource="acme") for i in range(40)]
    wait_for(lambda: len(api.snapshot()) >= 8, 60, what="the run to be under way")
    old = cluster.current_master_port()
    cluster.current_master().stop(kill=True)
    cluster.wait_failover(old)
    try:
        for r in results:
            assert result_of(r, cluster, 60)["status_code"] == 200
    except Exception:
        for w in workers:
            print("\nBULK LOG", w.name, "\n".join(line for line in w.log().splitlines()
                                                  if "onelane" in line or "rror" in line)[-3000:])
        print("CALLS", len(api.snapshot()), sorted(c.key for c in api.snapshot()))
        raise
    assert api.max_concurrency <= 3 and api.overlaps == 0
    assert {c.key for c in api.snapshot()} == {f"b{i:02d}" for i in range(40)}


def test_a_wrong_master_name_or_no_sentinel_fails_at_start_naming_the_setting(base_env, cluster, start):
    wrong = procs.worker(sentinel_env(base_env, cluster, ONELANE_SENTINEL_MASTER="nosuchmaster"), "wrong")
    start(wrong, wait_ready=False)
    wait_for(lambda: wrong.proc.poll() is not None, 60, what="the worker with a wrong master name to exit")
    assert wrong.proc.returncode != 0
    assert "ONELANE_SENTINEL_MASTER='nosuchmaster' is not known" in wrong.log()
    assert "mymaster" in wrong.log() and "Traceback" not in wrong.log()
    dead = f"sentinel://127.0.0.1:{procs_free_port()};sentinel://127.0.0.1:{procs_free_port()}"
    nobody = procs.worker({**base_env, "REDIS_URL": dead, "ONELANE_SENTINEL_MASTER": "mymaster",
                           "ONELANE_STARTUP_WAIT": "3"}, "nobody")
    start(nobody, wait_ready=False)
    wait_for(lambda: nobody.proc.poll() is not None, 90, what="the worker with no sentinel to exit")
    assert nobody.proc.returncode != 0 and "none of the sentinels in REDIS_URL" in nobody.log()
    out = subprocess.run([ONELANE, "status"], env={**base_env, "REDIS_URL": dead,
                                                   "ONELANE_SENTINEL_MASTER": "mymaster"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "none of the sentinels in REDIS_URL" in out.stderr, out.stderr


def procs_free_port() -> int:
    from demo.redis_server import free_port

    return free_port()


def test_status_names_the_master_and_the_replicas_with_their_lag(base_env, cluster):
    env = sentinel_env(base_env, cluster)
    out = subprocess.run([ONELANE, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)["redis"]
    assert r["master"] == f"127.0.0.1:{cluster.current_master_port()}"
    assert len(r["replicas"]) == 2 and all("lag" in x for x in r["replicas"])
    assert r["min_replicas"] == 1
