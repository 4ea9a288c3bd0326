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
    out = cli(base_env, "status", "serial", "--json")
    took = time.monotonic() - t0
    st = json.loads(out.stdout)
    assert st["schema"] == 2 and st["queue"] == "serial" and st["kind"] == "lane"
    assert [f["task_id"] for f in st["in_flight"]] == [r.id]
    assert st["in_flight"][0]["resource"] == "serial" and st["in_flight"][0]["attempt"] == 1
    assert st["guard"]["pid"] == w.pid
    assert [s["pid"] for s in st["standbys"]] == [sb.pid]
    assert st["depth"] == 3
    lease = [entry for entry in st["leases"] if entry["name"] == "resource:serial"][0]
    assert lease["held"] and lease["fence"] >= 1
    plain = cli({**base_env, "COLUMNS": "200"}, "status", "serial")
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
def test_watch_in_a_terminal_refreshes_says_idle_and_leaves_cleanly_on_ctrl_c(base_env, redis_client):
    import os
    import pty

    # Given watch running in a terminal (a pseudo-terminal) on an idle lane
    leader, follower = pty.openpty()
    p = subprocess.Popen([ONELANE, "watch", "--interval", "0.2"], env={**base_env, "COLUMNS": "120"},
                         stdin=follower, stdout=follower, stderr=follower, start_new_session=True,
                         preexec_fn=procs.sigint_as_a_terminal_starts_it)
    os.close(follower)
    out = b""
    try:
        give_up = time.monotonic() + 15
        while b"idle" not in out and time.monotonic() < give_up:
            import select

            if select.select([leader], [], [], 0.2)[0]:
                out += os.read(leader, 65536)
        assert b"idle" in out, out.decode(errors="replace")[-2000:]
        # When Ctrl-C arrives (the terminal keeps being read: a full one would block the watch)
        p.send_signal(signal.SIGINT)
        give_up = time.monotonic() + 10
        while time.monotonic() < give_up:
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the watch has gone and its output is read
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
        p.wait(timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)
        os.close(leader)
    text = out.decode(errors="replace")
    # Then it showed the lane as idle (not "0% 0/1"), and left cleanly
    assert p.returncode == 0, text[-2000:]
    assert "idle" in text and "0/1" not in text
    assert "stopped watching" in text and "Traceback" not in text


@pytest.mark.redis
def test_watch_to_a_pipe_prints_plain_lines(base_env, redis_client):
    out = cli(base_env, "watch", "--interval", "0.1", "--count", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all("serial: idle, depth 0, in flight 0" in line for line in lines), lines
    assert "\x1b[" not in out.stdout  # no terminal control sequences
