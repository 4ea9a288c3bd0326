"""Fault injection with real processes: killed pool children and workers, duplicate workers,
zombie leases, killed and doubled beats, a restarted redis-server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from celery import Celery

from demo.fragile_api import Reply
from demo.redis_server import RedisServer
from onelane.coordination.lease import Lease
from onelane.core.keys import Keys
from onelane.delivery import flow
from tests import procs
from tests.procs import wait_for

pytestmark = pytest.mark.e2e

KEYS = Keys()


def producer_app(url: str) -> Celery:
    app = Celery(broker=url, backend=url)
    app.conf.task_serializer = "json"
    return app


def publish(app, api, key: str, **extra):
    kwargs = {"url": f"{api.url}/f", "json": {"key": key}, "idempotency_key": key, **extra}
    return app.send_task("tasks.callout", kwargs=kwargs, queue="serial")


def first_call(api, key, timeout_s=30):
    return wait_for(lambda: (api.calls_for(key) or [None])[0], timeout_s, what=f"a call with key {key}")


def recorded_outcomes(client, task_ids):
    return {tid: client.get(KEYS.done(tid)) for tid in task_ids}


def test_killed_pool_child_retries_after_the_deadline_at_the_head(base_env, redis_client, api, start, celery_app):
    # Given a worker with a 3 s deadline and an API that works 2.5 s on the first call
    env = {**base_env, "ONELANE_CALLOUT_TIMEOUT": "3"}
    w = start(procs.worker(env))
    api.script("k1", [Reply(200, {"ok": 1}, delay_s=2.5)])
    r1 = publish(celery_app, api, "k1")
    later = [publish(celery_app, api, f"k{i}") for i in (2, 3)]
    first = first_call(api, "k1")
    # When the pool child is killed mid-callout (the API keeps working on that request)
    kids = w.pool_children()
    assert kids, "the worker has no pool child"
    os.kill(kids[0], signal.SIGKILL)
    killed_at = time.time()
    # Then the callout is retried and completes, exactly once recorded
    result = r1.get(timeout=30)
    for r in later:
        r.get(timeout=30)
    calls = api.calls_for("k1")
    assert len(calls) == 2, [c.start for c in calls]
    retry = calls[1]
    deadline = first.start + 3.0
    assert api.overlaps == 0
    assert first.end > killed_at, "the API was meant to keep working after the client died"
    # the retry reaches the API after the killed attempt's deadline, and within 5 s of it
    assert retry.start >= deadline - 0.05, (retry.start - first.start)
    assert retry.start <= deadline + 5.0, (retry.start - first.start)
    assert retry.fence > first.fence
    assert result["fencing_token"] == retry.fence
    # it was requeued at the head: it runs before the callouts published after it
    order = [c.key for c in api.snapshot()]
    assert order == ["k1", "k1", "k2", "k3"], order
    assert json.loads(redis_client.get(KEYS.done(r1.id)))["status"] == "success"
    print(f"\nrecovery (killed child): retry reached the API {retry.start - killed_at:.2f} s after the kill, "
          f"{retry.start - deadline:.2f} s after the 3 s deadline (lease grace 1 s)")


def test_killed_worker_orphan_requeued_at_head_by_next_worker(base_env, redis_client, api, start, celery_app):
    # Given worker + beat, a 5 s deadline, and an API that works 3 s on the first call
    env = {**base_env, "ONELANE_CALLOUT_TIMEOUT": "5"}
    w1 = start(procs.worker(env, "w1"))
    start(procs.beat(env))
    api.script("k1", [Reply(200, {"ok": 1}, delay_s=3)])
    r1 = publish(celery_app, api, "k1")
    later = [publish(celery_app, api, f"k{i}") for i in (2, 3, 4)]
    first = first_call(api, "k1")
    # When the whole worker (parent and child) is killed mid-callout, then a new one starts
    w1.kill9(whole=True)
    killed_at = time.time()
    start(procs.worker(env, "w2"))
    # Then the orphan runs first, after its deadline, within 30 s of the kill, exactly once
    r1.get(timeout=40)
    for r in later:
        r.get(timeout=30)
    calls = api.calls_for("k1")
    assert len(calls) == 2
    retry = calls[1]
    assert api.overlaps == 0
    assert retry.start >= first.start + 5.0 - 0.05
    assert retry.start - killed_at <= 30
    order = [c.key for c in api.snapshot()]
    assert order == ["k1", "k1", "k2", "k3", "k4"], order
    outcomes = recorded_outcomes(redis_client, [r1.id] + [r.id for r in later])
    assert all(v is not None for v in outcomes.values())
    # kombu's unacked copy went in the same step: nothing left to be restored an hour later
    # (the last message is acked just after its result is stored, hence the short wait)
    wait_for(lambda: redis_client.hlen("unacked") == 0, 5,
             what=f"no unacked message left, found {redis_client.hgetall('unacked')}")
    print(f"\nrecovery (killed worker): retry reached the API {retry.start - killed_at:.2f} s after the kill, "
          f"{retry.start - (first.start + 5):.2f} s after the 5 s deadline")


def test_second_worker_refused_and_standby_takes_over(base_env, redis_client, api, start, celery_app):
    env = {**base_env, "ONELANE_GUARD_TTL": "3"}
    w1 = start(procs.worker(env, "w1"))
    # A second worker on the same queue is refused, naming the holder
    w2 = procs.worker(env, "w2")
    start(w2, wait_ready=False)
    wait_for(lambda: w2.proc.poll() is not None, 30, what="the second worker to exit")
    assert w2.proc.returncode != 0
    log = w2.log()
    assert "holds the guard of lane 'serial'" in log
    assert f"pid {w1.pid}" in log and "ONELANE_STANDBY=1" in log
    # ... in one line: no "Unrecoverable error", no traceback, and nothing left behind for the reaper
    assert "Unrecoverable error" not in log and "Traceback" not in log, log[-3000:]
    worker_leases = [m for m in redis_client.zrange(KEYS.lease_index, 0, -1) if m.startswith(b"worker:")]
    assert len(worker_leases) == 1, worker_leases  # w1's presence only
    # A standby waits without consuming
    standby = procs.worker({**env, "ONELANE_STANDBY": "1"}, "w3")
    start(standby, wait_ready=False)
    standby.wait_log("standby", 30)
    time.sleep(1)
    assert "ready." not in standby.log()
    assert publish(celery_app, api, "before").get(timeout=20)["status_code"] == 200
    # When the active worker is killed with -9, the standby takes over within one guard TTL
    w1.kill9(whole=True)
    killed_at = time.time()
    standby.wait_log("ready.", 3 + 10)
    took_over = time.time() - killed_at
    r = publish(celery_app, api, "after")
    assert r.get(timeout=20)["status_code"] == 200
    assert api.overlaps == 0
    assert took_over <= 3.0 + 1.0, took_over
    print(f"\nstandby took over {took_over:.2f} s after the kill (guard TTL 3 s)")


_HOLDER = """
import sys, time, redis
from onelane.core.keys import Keys
from onelane.delivery import flow
from onelane.coordination.lease import Lease
c = redis.Redis.from_url(sys.argv[1])
g = Lease(c, sys.argv[2], keys=Keys()).try_acquire("zombie-token", ttl_ms=int(sys.argv[3]))
print("held", g.fence, flush=True)
time.sleep(600)
"""


def test_zombie_lease_reaped_after_deadline_live_and_early_ones_never(base_env, redis_client, start):
    # Given a lease whose holder process is killed, a live holder that renews, and one not yet due
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, base_env["REDIS_URL"], "resource:z", "1500"],
                              env=base_env, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert holder.stdout.readline().startswith(b"held")
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    live = Lease(redis_client, "resource:live", keys=KEYS)
    live.try_acquire("live-token", ttl_ms=1000)
    early = Lease(redis_client, "resource:early", keys=KEYS)
    early.try_acquire("early-token", ttl_ms=60_000)
    # When beat runs its reaper every 0.3 s
    b = start(procs.beat({**base_env, "ONELANE_REAP_INTERVAL": "0.3"}))
    t_end = time.time() + 4
    while time.time() < t_end:
        live.renew("live-token", ttl_ms=1000)
        time.sleep(0.2)
    # Then the zombie is gone from the index (and the key), the live and early ones are intact
    index = {m.decode() for m in redis_client.zrange(KEYS.lease_index, 0, -1)}
    assert "resource:z" not in index
    assert redis_client.get(KEYS.lease("resource:z")) is None
    assert "zombie lease 'resource:z'" in b.log()
    assert {"resource:live", "resource:early"} <= index
    assert live.holder().token == "live-token"
    assert early.holder().token == "early-token"


def test_beat_killed_and_doubled_requeues_once_loses_nothing(base_env, redis_client, api, start, celery_app):
    env = {**base_env, "ONELANE_CALLOUT_TIMEOUT": "2", "ONELANE_GUARD_TTL": "2", "ONELANE_REAP_INTERVAL": "0.2"}
    b1 = start(procs.beat(env, "beat1"))
    w1 = start(procs.worker(env, "w1"))
    api.script("k1", [Reply(200, {"ok": 1}, delay_s=1.5)])
    r1 = publish(celery_app, api, "k1")
    later = [publish(celery_app, api, f"k{i}") for i in range(2, 7)]
    first_call(api, "k1")
    # kill -9 beat and the worker mid-callout (k1 takes 1.5 s: both die before it ends, however
    # slow the machine), and leave the queue without a worker: only the beats act
    b1.kill9(whole=True)
    w1.kill9(whole=True)
    assert api.calls_for("k1")[0].end is None, "k1 ended before the worker was killed: the test needs it in flight"
    # beat started again, with a second beat beside it
    start(procs.beat(env, "beat2"))
    start(procs.beat(env, "beat3"))

    def waiting_ids():  # the queue, head first: its ready list, then kombu's list
        return [json.loads(i)["headers"]["id"] for i in flow.waiting(redis_client, KEYS, "serial")]

    wait_for(lambda: r1.id in waiting_ids(), 30, what="the orphan to be requeued by a beat")
    time.sleep(1.5)  # both beats get several more passes
    ids = waiting_ids()
    assert ids.count(r1.id) == 1, "requeued twice"
    assert ids[0] == r1.id, "not at the head"
    assert redis_client.hlen("unacked") == 0
    start(procs.worker(env, "w2"))
    for r in [r1, *later]:
        assert r.get(timeout=30)["status_code"] == 200
    order = [c.key for c in api.snapshot()]
    assert order == ["k1", "k1"] + [f"k{i}" for i in range(2, 7)], order
    assert api.overlaps == 0


def test_redis_restart_loses_nothing_and_worker_resumes(base_env, api, start):
    with RedisServer(appendonly=True) as server:
        env = {**base_env, "REDIS_URL": server.url}
        client = redis.Redis.from_url(server.url)
        app = producer_app(server.url)
        start(procs.worker(env, "w1"))
        api.delay_s = 0.4
        results = [publish(app, api, f"r{i}") for i in range(8)]
        first_call(api, "r0")
        # When redis-server restarts (AOF on) with one callout in flight and the rest queued
        server.restart()
        # Then nothing queued is lost, nothing overlaps, and the same worker resumes
        for r in results:
            assert r.get(timeout=60)["status_code"] == 200
        assert api.overlaps == 0
        keys = [c.key for c in api.snapshot()]
        assert set(keys) == {f"r{i}" for i in range(8)}
        done = recorded_outcomes(client, [r.id for r in results])
        assert all(v is not None for v in done.values())
        client.close()


@pytest.mark.parametrize("extra, why", [(["-c", "2"], "concurrency is 2"),
                                        (["--prefetch-multiplier", "4"], "prefetch multiplier is 4"),
                                        (["--autoscale", "4,1"], "autoscale is 4,1")])
def test_worker_that_would_run_two_at_once_refuses(base_env, redis_client, start, extra, why):
    w = procs.worker(base_env, "wide", extra=extra)
    start(w, wait_ready=False)
    wait_for(lambda: w.proc.poll() is not None, 30, what="the misconfigured worker to exit")
    assert w.proc.returncode != 0
    assert why in w.log() and "one message at a time" in w.log()
    assert "Traceback" not in w.log() and "ready." not in w.log()


def test_release_dead_holder_setting_retries_at_once(base_env, redis_client, api, start, celery_app):
    # Given an API that aborts work on disconnect, declared with ONELANE_RELEASE_DEAD_HOLDER=1
    env = {**base_env, "ONELANE_CALLOUT_TIMEOUT": "20", "ONELANE_RELEASE_DEAD_HOLDER": "1"}
    w = start(procs.worker(env))
    api.script("k1", [Reply(200, {"ok": 1}, delay_s=5, abort_on_disconnect=True)])
    r1 = publish(celery_app, api, "k1")
    first = first_call(api, "k1")
    os.kill(w.pool_children()[0], signal.SIGKILL)
    killed_at = time.time()
    assert r1.get(timeout=30)["status_code"] == 200
    retry = api.calls_for("k1")[1]
    # Then the retry does not wait for the 20 s deadline
    assert retry.start - killed_at < 10, retry.start - killed_at
    assert retry.start < first.start + 20
    assert first.client_gone and first.end < retry.start
    assert api.overlaps == 0


def test_redelivered_completed_task_is_not_called_again(base_env, redis_client, api, start, celery_app):
    start(procs.worker(base_env))
    r1 = publish(celery_app, api, "once")
    first = r1.get(timeout=20)
    # When the same message (same task id) is delivered again
    again = celery_app.send_task("tasks.callout", task_id=r1.id, queue="serial",
                                 kwargs={"url": f"{api.url}/f", "json": {"key": "once"}, "idempotency_key": "once"})
    # and another task reuses the idempotency key of a success
    same_key = publish(celery_app, api, "once")
    assert again.get(timeout=20) == first
    assert same_key.get(timeout=20)["fencing_token"] == first["fencing_token"]
    assert len(api.calls_for("once")) == 1


def test_producer_with_redis_down_gets_a_clear_error_fast(base_env):
    dead = RedisServer(appendonly=False).start()
    dead.close()
    env = {**base_env, "REDIS_URL": dead.url}
    code = ("import tasks\n"
            "try:\n    tasks.submit('http://127.0.0.1:9/x')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert "BrokerUnavailable" in out.stdout and "REDIS_URL" in out.stdout, out.stdout + out.stderr
    assert took < 30, took


@pytest.mark.parametrize("queue", ["serial", "bulk"])
def test_worker_killed_while_fetching_loses_nothing(base_env, redis_client, api, start, celery_app, queue):
    # Given a worker that consumes the queue and is idle, blocked in its fetch
    env = {**base_env, "ONELANE_GUARD_TTL": "2", "ONELANE_REAP_INTERVAL": "0.5"}
    extra = ["--pool", "threads", "-c", "2"] if queue == "bulk" else None
    w1 = start(procs.worker(env, "w1", queue=queue, extra=extra))
    celery_app.send_task("tasks.callout", kwargs={"url": f"{api.url}/warm", "idempotency_key": "warm"},
                         queue=queue).get(timeout=30)
    [(fetch_list, owner)] = redis_client.hgetall(KEYS.fetch_lists).items()
    assert json.loads(owner)["queue"] == queue
    # When it is frozen, a callout arrives (Redis answers the worker's blocked fetch at once), and
    # the worker is killed before it ever reads the answer: with kombu's own BRPOP fetch this
    # message would be gone from Redis for good; onelane's blocked fetch only says "something
    # came" (BLMOVE q q, a rotation of one), the message stays where it is
    def idle_in_fetch():
        blocked = [c for c in redis_client.client_list() if c["cmd"] == "blmove" and "b" in c["flags"]]
        return blocked and redis_client.hlen("unacked") == 0
    wait_for(idle_in_fetch, 10, what="the worker to wait in its fetch with nothing unacked")
    os.killpg(w1.pid, signal.SIGSTOP)
    r = celery_app.send_task("tasks.callout", kwargs={"url": f"{api.url}/x", "idempotency_key": "x"},
                             queue=queue)
    wait_for(lambda: not idle_in_fetch(), 10, what="Redis to answer the worker's blocked fetch")
    assert redis_client.llen(queue) == 1 and redis_client.hlen("unacked") == 0
    w1.kill9(whole=True)
    killed_at = time.time()
    # Then the next worker takes it, and it runs exactly once
    start(procs.worker(env, "w2", queue=queue, extra=extra))
    if queue == "bulk":
        start(procs.beat(env))
    result = r.get(timeout=30)
    assert result["status_code"] == 200
    assert len(api.calls_for("x")) == 1 and api.overlaps == 0
    assert redis_client.llen(fetch_list) == 0
    print(f"\nworker killed while fetching ({queue}): the callout ran {time.time() - killed_at:.2f} s after the kill")
