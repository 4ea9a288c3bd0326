"""The onelane command against a real worker: status, watch, reap."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from demo.fragile_api import Reply
from onelane.coordination.lease import Lease
from onelane.core.keys import Keys
from tests import procs
from tests.procs import wait_for

ONELANE = str(procs.VENV_BIN / "onelane")


def cli(env, *args):
    return subprocess.run([ONELANE, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.e2e
def test_status_shows_the_callout_in_flight_guard_standby_and_leases(base_env, redis_client, api, start,
                                                                    celery_app):
    w = start(procs.worker(base_env, "w1"))
    sb = start(procs.worker({**base_env, "ONELANE_STANDBY": "1"}, "w2"), wait_ready=False)
    sb.wait_log("standby", 30)
    api.script("slow", [Reply(200, {"ok": 1}, delay_s=2)])
    r = celery_app.send_task("tasks.callout", queue="serial",
                             kwargs={"url": f"{api.url}/s", "idempotency_key": "slow"})
    for i in range(3):
        celery_app.send_task("tasks.callout", queue="serial", kwargs={"url": f"{api.url}/q{i}"})
    wait_for(lambda: api.calls_for("slow"), 20, what="the slow call")
    t0 = time.monotonic()
    out = cli(base_env, "status", "--json")
    took = time.monotonic() - t0
    st = json.loads(out.stdout)
    assert st["schema"] == 1 and st["queue"] == "serial"
    assert [f["task_id"] for f in st["in_flight"]] == [r.id]
    assert st["in_flight"][0]["resource"] == "serial" and st["in_flight"][0]["attempt"] == 1
    assert st["guard"]["pid"] == w.pid
    assert [s["pid"] for s in st["standbys"]] == [sb.pid]
    assert st["depth"] == 3
    lease = [entry for entry in st["leases"] if entry["name"] == "resource:serial"][0]
    assert lease["held"] and lease["fence"] >= 1
    plain = cli({**base_env, "COLUMNS": "200"}, "status")
    assert r.id in plain.stdout and "resource:serial" in plain.stdout
    print(f"\nonelane status --json answered in {took * 1000:.0f} ms (process start included)")
    r.get(timeout=20)


@pytest.mark.redis
def test_reap_says_what_it_cleared(base_env, redis_client):
    keys = Keys()
    Lease(redis_client, "resource:gone", keys=keys).try_acquire("dead", ttl_ms=50)
    time.sleep(0.2)
    out = cli(base_env, "reap")
    assert out.returncode == 0
    assert "1 zombie lease(s) cleared" in out.stdout and "resource:gone" in out.stdout
    again = cli(base_env, "reap")
    assert "0 zombie lease(s) cleared" in again.stdout


@pytest.mark.redis
def test_watch_refreshes_and_leaves_cleanly_on_ctrl_c(base_env, redis_client):
    p = subprocess.Popen([ONELANE, "watch", "--interval", "0.2"], env=base_env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(1.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)
    assert p.returncode == 0, err
    assert "queued work" in out and "stopped watching" in out
    assert "Traceback" not in err
