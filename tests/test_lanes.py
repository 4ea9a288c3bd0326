"""Lanes: one serial queue per integration, each guarded, ordered and reaped, started with a plain
``-Q <lane>``. Two fragile APIs (one per lane) count overlaps per lane."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from celery.result import AsyncResult

from demo.fragile_api import FragileAPI, Reply
from onelane.core.keys import Keys
from onelane.delivery import flow
from tests import procs
from tests.procs import wait_for
from tests.producer_proc import Producers

pytestmark = pytest.mark.e2e

KEYS = Keys()
ONELANE = str(procs.VENV_BIN / "onelane")


def cli(env, *args):
    return subprocess.run([ONELANE, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def apis():
    """Two fragile APIs: the ERP's and the billing system's (each: 500 and an overlap on a second call)."""
    with FragileAPI() as erp, FragileAPI() as billing:
        yield {"erp": erp, "billing": billing}


def lane_worker(env, lane, name=None, **kw):
    return procs.worker(env, name or lane, queue=lane, **kw)


def send(app, lane, api, key, **extra):
    return app.send_task("tasks.callout", queue=lane,
                         kwargs={"url": f"{api.url}/{lane}", "json": {"key": key}, "idempotency_key": key, **extra})


def test_two_lanes_run_side_by_side_each_in_order_with_no_overlap(base_env, redis_client, apis, start, celery_app):
    # Given one worker per lane (nothing configured but -Q) and APIs that take 150 ms per call
    for api in apis.values():
        api.delay_s = 0.15
    start(lane_worker(base_env, "erp"))
    start(lane_worker(base_env, "billing"))
    # When 3 producer processes publish 8 callouts each to both lanes, interleaved
    t0 = time.time()
    with Producers(base_env["REDIS_URL"], "", processes=3, count=8, max_gap_s=0.01,
                   lanes={"erp": apis["erp"].url, "billing": apis["billing"].url}) as producers:
        published = producers.published(timeout_s=60)
    for ids in published.values():
        for tid in ids:
            assert AsyncResult(tid, app=celery_app).get(timeout=60)["status_code"] == 200
    wall = time.time() - t0
    # Then each lane saw its 24 calls one at a time, each producer's in the order it published them
    for lane, api in apis.items():
        calls = api.snapshot()
        assert len(calls) == 24 and api.overlaps == 0 and api.max_concurrency == 1, lane
        for producer in range(3):
            order = [c.json()["n"] for c in calls if c.json()["producer"] == producer]
            assert order == list(range(8)), (lane, producer, order)
        assert {c.json()["lane"] for c in calls} == {lane}
    # ... and the lanes ran side by side: about the time of one lane, not the sum of both
    busy = {lane: sum(c.end - c.start for c in api.snapshot()) for lane, api in apis.items()}
    longest, total = max(busy.values()), sum(busy.values())
    print(f"\ntwo lanes, 24 x 150 ms each: wall {wall:.2f} s; one lane's calls {longest:.2f} s, "
          f"both lanes one after the other {total:.2f} s")
    assert wall < total, (wall, busy)
    # and the result says which lane ran it
    any_id = published[0][0]
    assert AsyncResult(any_id, app=celery_app).get(timeout=5)["lane"] in ("erp", "billing")


def test_a_second_worker_on_a_lane_is_refused_a_standby_takes_over_the_other_lane_untouched(
        base_env, redis_client, apis, start, celery_app):
    env = {**base_env, "ONELANE_GUARD_TTL": "3"}
    erp1 = start(lane_worker(env, "erp", "erp1"))
    billing = start(lane_worker(env, "billing"))
    # A second worker on erp is refused, naming the holder's host and pid
    erp2 = lane_worker(env, "erp", "erp2")
    start(erp2, wait_ready=False)
    wait_for(lambda: erp2.proc.poll() is not None, 30, what="the second erp worker to exit")
    assert erp2.proc.returncode != 0
    assert "holds the guard of lane 'erp'" in erp2.log() and f"pid {erp1.pid}" in erp2.log()
    # A standby on erp waits; billing keeps flowing while erp's active worker is killed
    standby = start(lane_worker({**env, "ONELANE_STANDBY": "1"}, "erp", "erp3"), wait_ready=False)
    standby.wait_log("standby", 30)
    billing_results = [send(celery_app, "billing", apis["billing"], f"b{i}") for i in range(20)]
    erp1.kill9()
    killed_at = time.time()
    standby.wait_log("standby took over", 30)
    took = time.time() - killed_at
    assert send(celery_app, "erp", apis["erp"], "after-takeover").get(timeout=30)["status_code"] == 200
    assert all(r.get(timeout=30)["status_code"] == 200 for r in billing_results)
    assert apis["billing"].overlaps == 0 and apis["erp"].overlaps == 0
    assert billing.proc.poll() is None  # untouched throughout
    print(f"\nerp standby took over {took:.1f} s after the active worker was killed (guard TTL 3 s)")


def test_a_killed_lanes_orphan_is_requeued_at_the_head_of_its_lane_by_beat(base_env, redis_client, apis, start,
                                                                          celery_app):
    # Given a 2 s deadline on both lanes, beat, and an erp call the API works on for 1.5 s
    env = {**base_env, "ONELANE_CALLOUT_TIMEOUT": "2", "ONELANE_REAP_INTERVAL": "0.5"}
    erp = start(lane_worker(env, "erp"))
    start(lane_worker(env, "billing"))
    start(procs.beat(env))
    apis["erp"].script("e1", [Reply(200, {"ok": 1}, delay_s=1.5)])
    first = send(celery_app, "erp", apis["erp"], "e1")
    later = [send(celery_app, "erp", apis["erp"], f"e{i}") for i in (2, 3)]
    wait_for(lambda: apis["erp"].calls_for("e1"), 20, what="the first erp call")
    # When the erp worker is killed mid-call, while billing keeps flowing
    erp.kill9()
    killed_at = time.time()
    billing = [send(celery_app, "billing", apis["billing"], f"b{i}") for i in range(10)]
    assert all(r.get(timeout=30)["status_code"] == 200 for r in billing)
    # Then beat (no per-lane setting) puts the orphan back at the head of erp after its deadline
    def head_id():  # the head of the lane: its ready list's, else kombu's list's
        raw = flow.head(redis_client, KEYS, "erp")
        return raw and json.loads(raw)["headers"]["id"]

    wait_for(lambda: head_id() == first.id, 30, what="the orphan back at the head of erp")
    requeued_after = time.time() - killed_at
    assert requeued_after >= 2 - 1.5 - 0.2  # not before the killed attempt's deadline (it started 1.5 s ago+)
    start(lane_worker(env, "erp", "erp-again"))
    assert first.get(timeout=30)["status_code"] == 200
    assert [r.get(timeout=30)["status_code"] for r in later] == [200, 200]
    keys = [c.key for c in apis["erp"].snapshot()]
    assert keys.index("e1") < keys.index("e2") < keys.index("e3")  # order kept
    assert keys.count("e1") == 2  # the killed attempt and its retry, same idempotency key
    assert apis["erp"].overlaps == 0 and apis["billing"].overlaps == 0


def test_pausing_one_lane_leaves_the_other_running_and_resume_keeps_order(base_env, redis_client, apis, start,
                                                                         celery_app):
    start(lane_worker(base_env, "erp"))
    start(lane_worker(base_env, "billing"))
    assert cli(base_env, "pause", "erp").returncode == 0
    paused_at = time.time()
    erp = [send(celery_app, "erp", apis["erp"], f"e{i}") for i in range(4)]
    billing = [send(celery_app, "billing", apis["billing"], f"b{i}") for i in range(4)]
    assert all(r.get(timeout=30)["status_code"] == 200 for r in billing)
    time.sleep(0.5)
    assert [c for c in apis["erp"].snapshot() if c.start > paused_at] == []
    st = json.loads(cli(base_env, "status", "erp", "--json").stdout)
    assert st["paused"] is not None and st["depth"] + len(st["in_flight"]) >= 3
    assert cli(base_env, "resume", "erp").returncode == 0
    assert all(r.get(timeout=30)["status_code"] == 200 for r in erp)
    assert [c.key for c in apis["erp"].snapshot()] == ["e0", "e1", "e2", "e3"]


def test_status_lists_every_lane_and_says_so_of_an_unknown_one(base_env, redis_client, apis, start, celery_app):
    start(lane_worker(base_env, "erp"))
    start(lane_worker(base_env, "billing"))
    send(celery_app, "erp", apis["erp"], "s1").get(timeout=20)
    data = json.loads(cli(base_env, "status", "--json").stdout)
    names = [line["name"] for line in data["lanes"]]
    assert {"erp", "billing", "serial"} <= set(names)
    erp = next(line for line in data["lanes"] if line["name"] == "erp")
    assert erp["holder"] is not None and erp["depth"] == 0 and erp["kind"] == "lane"
    serial = next(line for line in data["lanes"] if line["name"] == "serial")
    assert serial["holder"] is None  # the default lane is listed even with no worker
    plain = cli({**base_env, "COLUMNS": "100"}, "status")
    assert "erp" in plain.stdout and "billing" in plain.stdout
    unknown = cli(base_env, "status", "nosuchlane")
    assert "no worker has ever consumed a lane 'nosuchlane'" in unknown.stdout
    paused = cli(base_env, "pause", "nosuchlane")
    assert paused.returncode == 0 and "warning" in paused.stdout
    cli(base_env, "resume", "nosuchlane")


def test_a_worker_given_two_lanes_is_refused_with_the_per_lane_commands(base_env, redis_client, start):
    w = procs.worker(base_env, "both", queue="erp,billing")
    start(w, wait_ready=False)
    wait_for(lambda: w.proc.poll() is not None, 30, what="the two-lane worker to exit")
    assert w.proc.returncode != 0
    log = w.log()
    assert "one worker serves one queue" in log
    assert "celery -A tasks worker -Q erp" in log and "celery -A tasks worker -Q billing" in log
    assert "Traceback" not in log


def test_submit_picks_the_lane_and_the_lane_is_the_default_resource(base_env, redis_client, apis, start):
    import tasks

    start(lane_worker(base_env, "erp"))
    r = tasks.submit(f"{apis['erp'].url}/x", lane="erp", idempotency_key="by-submit")
    res = r.get(timeout=20)
    assert res["resource"] == "erp" and res["lane"] == "erp"
    with pytest.raises(ValueError) as info:
        tasks.submit(f"{apis['erp'].url}/x", lane="no spaces")
    assert "'lane'" in str(info.value)
    assert os.environ.get("ONELANE_QUEUE") is None  # nothing configured for the lane
