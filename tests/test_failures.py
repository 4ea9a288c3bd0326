"""Failure handling with a real worker and scripted failures of the fragile API."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from demo.fragile_api import Reply
from onelane.callout.ledger import Ledger
from onelane.core.keys import Keys
from tests import procs
from tests.procs import wait_for

pytestmark = pytest.mark.e2e

KEYS = Keys()
ONELANE = str(procs.VENV_BIN / "onelane")


def publish(app, api, key, path="/f", **extra):
    kwargs = {"url": f"{api.url}{path}", "json": {"key": key}, "idempotency_key": key, **extra}
    return app.send_task("tasks.callout", kwargs=kwargs, queue="serial")


def cli(env, *args, input=None):
    return subprocess.run([ONELANE, *args], env=env, capture_output=True, text=True, timeout=60, input=input)


def gaps(calls):
    return [b.start - a.end for a, b in zip(calls, calls[1:])]


def attempts_of(client, task_id):
    return Ledger(client, KEYS, window_s=60).attempts(task_id)


def dead_letters(client):
    return Ledger(client, KEYS, window_s=60).dead_letters("serial")


def test_three_503s_then_200_backs_off_with_full_jitter(base_env, redis_client, api, start, celery_app):
    start(procs.worker(base_env))  # backoff base 0.2 s, cap 1 s
    api.script("b", [Reply(503), Reply(503), Reply(503), Reply(200, {"ok": 1})])
    result = publish(celery_app, api, "b").get(timeout=30)
    calls = api.calls_for("b")
    assert [c.status for c in calls] == [503, 503, 503, 200]
    assert result["attempts"] == 4 and result["status_code"] == 200
    recorded = attempts_of(redis_client, result["task_id"])
    for n, (gap, info) in enumerate(zip(gaps(calls), recorded), start=1):
        ceiling = min(1.0, 0.2 * 2 ** (n - 1))
        assert 0 <= info["retry_in_s"] <= ceiling
        assert info["retry_in_s"] - 0.02 <= gap <= ceiling + 0.5, (n, gap, info)
    print("\n3x503 then 200: gaps", [round(g, 3) for g in gaps(calls)],
          "planned", [i["retry_in_s"] for i in recorded[:3]], "ceilings 0.2/0.4/0.8")


def test_429_with_retry_after_waits_at_least_that_long(base_env, redis_client, api, start, celery_app):
    start(procs.worker(base_env))
    api.script("ra", [Reply(429, "slow down", headers={"Retry-After": "2"}), Reply(200, {"ok": 1})])
    result = publish(celery_app, api, "ra").get(timeout=30)
    calls = api.calls_for("ra")
    assert result["attempts"] == 2
    assert gaps(calls)[0] >= 2.0, gaps(calls)
    print(f"\n429 Retry-After 2: next attempt {gaps(calls)[0]:.3f} s later")


def test_400_is_not_retried_and_dead_lettered_once(base_env, redis_client, api, start, celery_app):
    start(procs.worker(base_env))
    api.script("bad", [Reply(400, {"error": "no such customer"})])
    r = publish(celery_app, api, "bad")
    with pytest.raises(Exception) as info:
        r.get(timeout=20)
    assert "400" in str(info.value) and "not retryable" in str(info.value)
    assert r.state == "FAILURE"
    assert len(api.calls_for("bad")) == 1
    entries = [e for e in dead_letters(redis_client) if e["task_id"] == r.id]
    assert len(entries) == 1
    assert entries[0]["request"]["idempotency_key"] == "bad"
    assert entries[0]["attempts"][0]["status_code"] == 400


def test_endless_500_dead_lettered_then_replayed_once_the_api_recovers(base_env, redis_client, api, start,
                                                                       celery_app):
    env = {**base_env, "ONELANE_MAX_ATTEMPTS": "3"}
    start(procs.worker(env))
    api.script("down", [Reply(500, "boom")] * 3)
    r = publish(celery_app, api, "down")
    with pytest.raises(Exception) as info:
        r.get(timeout=30)
    assert "after 3 attempts" in str(info.value)
    assert len(api.calls_for("down")) == 3
    [entry] = dead_letters(redis_client)
    assert [a["status_code"] for a in entry["attempts"]] == [500, 500, 500]
    assert all("elapsed_ms" in a and "started" in a for a in entry["attempts"])
    listing = cli(env, "dlq", "list", "--json")
    assert json.loads(listing.stdout)[0]["id"] == r.id
    shown = cli(env, "dlq", "show", r.id)
    assert json.loads(shown.stdout)["reason"].startswith("POST")
    # When the API has recovered, a replay succeeds once, with the same idempotency key
    out = cli(env, "dlq", "replay", r.id)
    assert out.returncode == 0, out.stderr
    new_id = out.stdout.split(" as task ")[1].split()[0]
    result = celery_app.AsyncResult(new_id).get(timeout=20)
    assert result["status_code"] == 200 and result["idempotency_key"] == "down"
    assert [c.status for c in api.calls_for("down")] == [500, 500, 500, 200]
    assert dead_letters(redis_client) == []


def test_dlq_purge_asks_unless_yes(base_env, redis_client, api, start, celery_app):
    start(procs.worker(base_env))
    api.script("p", [Reply(404)])
    r = publish(celery_app, api, "p")
    with pytest.raises(Exception):
        r.get(timeout=20)
    refused = cli(base_env, "dlq", "purge", input="n\n")
    assert refused.returncode != 0 and len(dead_letters(redis_client)) == 1
    done = cli(base_env, "dlq", "purge", "--yes")
    assert done.returncode == 0 and dead_letters(redis_client) == []


def test_strict_order_holds_behind_a_retrying_task(base_env, redis_client, api, start, celery_app):
    start(procs.worker(base_env))
    api.script("a", [Reply(503), Reply(503), Reply(200, {"ok": 1})])
    rs = [publish(celery_app, api, k) for k in ("a", "b", "c")]
    for r in rs:
        r.get(timeout=30)
    assert [c.key for c in api.snapshot()] == ["a", "a", "a", "b", "c"]


def test_relaxed_order_lets_later_tasks_pass(base_env, redis_client, api, start, celery_app):
    start(procs.worker({**base_env, "ONELANE_ORDERING": "relaxed"}))
    api.script("a", [Reply(503, headers={"Retry-After": "1"}), Reply(200, {"ok": 1})])
    rs = [publish(celery_app, api, k) for k in ("a", "b", "c")]
    results = [r.get(timeout=30) for r in rs]
    assert [c.key for c in api.snapshot()] == ["a", "b", "c", "a"]
    assert results[0]["attempts"] == 2 and results[0]["status_code"] == 200
    assert redis_client.zcard(KEYS.delayed("serial")) == 0
    assert api.overlaps == 0


def test_pause_stops_new_callouts_survives_restart_and_resume_continues_in_order(
        base_env, redis_client, api, start, celery_app):
    w1 = start(procs.worker(base_env, "w1"))
    api.delay_s = 0.3
    rs = [publish(celery_app, api, f"k{i}") for i in range(6)]
    wait_for(lambda: api.calls_for("k0"), 20, what="the first call")
    assert cli(base_env, "pause").returncode == 0
    paused_at = time.time()
    time.sleep(2)
    started_late = [c for c in api.snapshot() if c.start > paused_at + 0.05]
    assert started_late == [], [c.key for c in started_late]
    seen = len(api.snapshot())
    # the pause survives a worker restart
    w1.stop()
    start(procs.worker(base_env, "w2"))
    time.sleep(2)
    assert len(api.snapshot()) == seen
    status = json.loads(cli(base_env, "status", "serial", "--json").stdout)
    assert status["paused"] is not None and status["depth"] + status["delayed"] >= 6 - seen - 1
    assert cli(base_env, "resume").returncode == 0
    for r in rs:
        assert r.get(timeout=30)["status_code"] == 200
    keys = [c.key for c in api.snapshot()]
    assert keys == [f"k{i}" for i in range(6)], keys
    assert api.overlaps == 0


def test_circuit_opens_after_k_failing_callouts_and_closes_on_success(base_env, redis_client, api, start,
                                                                      celery_app):
    # Given a circuit that opens after 2 failing callouts, and callouts with 2 attempts each
    env = {**base_env, "ONELANE_CIRCUIT_THRESHOLD": "2", "ONELANE_CIRCUIT_COOLDOWN": "1.5",
           "ONELANE_MAX_ATTEMPTS": "2"}
    start(procs.worker(env))
    api.script("cb1", [Reply(503), Reply(503)])
    api.script("cb2", [Reply(503), Reply(200, {"ok": 1})])
    # When the first callout fails for good and the second fails once
    r1 = publish(celery_app, api, "cb1", resource="acme")
    r2 = publish(celery_app, api, "cb2", resource="acme")

    def circuit_open():
        st = json.loads(cli(env, "status", "--json").stdout)
        return [c for c in st["circuits"] if c["resource"] == "acme" and c["state"] == "open"]

    # Then the circuit opens (two callouts failed in a row), and no callout starts during the cool-down
    wait_for(circuit_open, 15, interval_s=0.1, what="the circuit of acme to open")
    r1.get(timeout=30, propagate=False)
    assert r1.state == "FAILURE"
    assert r2.get(timeout=30)["attempts"] == 2
    calls = api.calls_for("cb2")
    assert gaps(calls)[0] >= 1.5 - 0.05, gaps(calls)
    st = json.loads(cli(env, "status", "--json").stdout)
    assert [c["state"] for c in st["circuits"] if c["resource"] == "acme"] == ["closed"]


def test_one_failing_callout_does_not_open_the_circuit_for_the_next(base_env, redis_client, api, start,
                                                                   celery_app):
    # Given the default circuit threshold (5) and attempts (5), and a callout that always fails
    start(procs.worker(base_env))
    api.script("always-500", [Reply(500)] * 5)
    bad = publish(celery_app, api, "always-500", resource="acme")
    good = publish(celery_app, api, "unrelated", resource="acme")
    # When the bad one has used its 5 attempts and is dead-lettered
    bad.get(timeout=60, propagate=False)
    assert bad.state == "FAILURE" and len(api.calls_for("always-500")) == 5
    # Then the circuit is still closed and the next callout starts at once (not after a 30 s cool-down)
    assert good.get(timeout=10)["status_code"] == 200
    gap = api.calls_for("unrelated")[0].start - api.calls_for("always-500")[-1].end
    assert gap < 2.0, gap
    st = json.loads(cli(base_env, "status", "--json").stdout)
    assert [c["state"] for c in st["circuits"] if c["resource"] == "acme"] == ["closed"]


def test_oversized_and_garbage_responses(base_env, redis_client, api, start, celery_app):
    start(procs.worker({**base_env, "ONELANE_MAX_RESPONSE_BYTES": "1000"}))
    api.script("big", [Reply(200, "x" * 5000)])
    api.script("junk", [Reply(200, "{not json", headers={"Content-Type": "application/json"})])
    big = publish(celery_app, api, "big").get(timeout=20)
    junk = publish(celery_app, api, "junk").get(timeout=20)
    assert big["truncated"] is True and len(big["body"]) == 1000
    assert junk["body"] == "{not json" and "json" not in junk and "json_error" in junk


def test_redirects_followed_on_the_same_host_only(base_env, redis_client, api, start, celery_app):
    start(procs.worker(base_env))
    api.script("same", [Reply(302, headers={"Location": "/moved"}), Reply(200, {"ok": 1})])
    other = f"http://localhost:{api.port}/elsewhere"
    api.script("other", [Reply(302, headers={"Location": other})])
    same = publish(celery_app, api, "same").get(timeout=20)
    assert same["status_code"] == 200 and [c.path for c in api.calls_for("same")] == ["/f", "/moved"]
    r = publish(celery_app, api, "other")
    with pytest.raises(Exception) as info:
        r.get(timeout=20)
    assert "another host" in str(info.value) and "ONELANE_REDIRECTS=any" in str(info.value)
    assert len(api.calls_for("other")) == 1


def test_unresolvable_host_fails_after_one_attempt(base_env, redis_client, start, celery_app):
    start(procs.worker(base_env))
    r = celery_app.send_task("tasks.callout", kwargs={"url": "http://no-such-host.invalid/x"}, queue="serial")
    with pytest.raises(Exception) as info:
        r.get(timeout=30)
    assert "does not resolve" in str(info.value)
    [entry] = dead_letters(redis_client)
    assert len(entry["attempts"]) == 1
