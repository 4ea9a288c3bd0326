"""Flower, a real process against the test Redis, shows every callout — behind a login.

The login comes from the environment (``FLOWER_BASIC_AUTH=user:password``), exactly as
``make flower`` and the compose file give it: Flower's ``apply_env_options`` maps every
``FLOWER_<OPTION>`` variable onto its option, here ``--basic-auth``.
"""
from __future__ import annotations

import ast
import socket

import pytest
import requests
from celery.result import AsyncResult

from demo.redis_server import free_port
from tests import procs
from tests.procs import wait_for

pytestmark = pytest.mark.e2e

AUTH = ("ops", "s3cret-flower")
SECRET = "Bearer not-for-flower"


def flower(env: dict, port: int) -> procs.CeleryProcess:
    p = procs.CeleryProcess(["flower", f"--port={port}", "--address=127.0.0.1"], env, "flower")
    p.ready_marker = "Visit me at"  # logged once the HTTP socket is bound
    return p


def test_flower_lists_callouts_with_name_state_worker_kwargs_and_runtime_behind_a_login(
        base_env, redis_client, api, start, celery_app):
    # Given a real worker and a real Flower on the test Redis, the login given only in the environment
    api.delay_s = 0.05
    port = free_port()
    env = {k: v for k, v in base_env.items() if not k.startswith("FLOWER_")}  # nothing inherited
    env["FLOWER_BASIC_AUTH"] = ":".join(AUTH)
    w = start(procs.worker(base_env))
    start(flower(env, port))
    base = f"http://127.0.0.1:{port}"
    # Events are Redis pub/sub: anything published before Flower subscribes is never seen. Flower's
    # event state knows the worker only from its events (heartbeats every 2 s), so wait for that.
    worker_name = f"w1@{socket.gethostname()}"
    def worker_seen():
        r = requests.get(f"{base}/api/workers", params={"status": "true"}, auth=AUTH, timeout=5)
        assert r.status_code == 200, (r.status_code, r.text)  # 401 here: the login was not applied
        return r.json().get(worker_name) is True

    wait_for(worker_seen, 30, 0.3, what=f"Flower to receive events from {worker_name}")

    # When three good callouts and one bad one run
    good_kwargs = [{"url": f"{api.url}/x/{i}", "json": {"order": i, "note": f"callout {i}"},
                    "headers": {"Authorization": SECRET}} for i in range(3)]
    good = [celery_app.send_task("tasks.callout", kwargs=kw, queue="serial") for kw in good_kwargs]
    bad = celery_app.send_task("tasks.callout", kwargs={"url": "ftp://nope"}, queue="serial")
    for r in good:
        assert r.get(timeout=30)["status_code"] == 200
    bad.get(timeout=30, propagate=False)
    assert bad.state == "FAILURE"

    # Then Flower's task list (events arrive asynchronously: bounded poll) has each of them, finished
    def listed():
        r = requests.get(f"{base}/api/tasks", auth=AUTH, timeout=5)
        assert r.status_code == 200, (r.status_code, r.text)
        tasks = r.json()
        found = [tasks.get(res.id) for res in [*good, bad]]
        done = all(t and t.get("state") in ("SUCCESS", "FAILURE") and t.get("worker") for t in found)
        return found if done and all(t.get("runtime") for t in found[:3]) else None

    found = wait_for(listed, 30, 0.5, what="the callouts, finished, in Flower's task list")
    for res, kw, t in zip(good, good_kwargs, found[:3]):
        assert t["uuid"] == res.id
        assert t["name"] == "tasks.callout"
        assert t["state"] == "SUCCESS"
        assert t["worker"] == worker_name
        assert t["routing_key"] == "serial"  # the lane it ran on
        assert t["received"] and t["started"] and t["succeeded"]
        # runtime is in seconds: at least the API's delay, and far below the bounded wait
        assert api.delay_s <= t["runtime"] < 30, t["runtime"]
        # the arguments are shown as the worker saw them, with the Authorization header masked
        shown = ast.literal_eval(t["kwargs"])
        assert shown == {**kw, "headers": {"Authorization": "***"}}, t["kwargs"]
        assert "not-for-flower" not in t["kwargs"] and "not-for-flower" not in (t.get("result") or "")
        assert "'status_code': 200" in t["result"]
    failed = found[3]
    assert failed["uuid"] == bad.id and failed["name"] == "tasks.callout"
    assert failed["state"] == "FAILURE"
    assert failed["worker"] == worker_name
    assert ast.literal_eval(failed["kwargs"]) == {"url": "ftp://nope"}
    assert "CalloutRejected" in failed["exception"] and "ftp" in failed["exception"]
    assert failed["received"] and failed["failed"]
    # (Celery's task-failed event carries no runtime, so Flower has none for a failure)
    assert not failed.get("runtime")

    # And nothing is shown without the login: no credentials, or wrong ones, get 401
    for auth in (None, ("ops", "wrong"), ("someone", AUTH[1])):
        for path in ("/api/tasks", f"/api/task/info/{good[0].id}", "/tasks", "/tasks/datatable", "/"):
            r = requests.get(base + path, auth=auth, timeout=5)
            assert r.status_code == 401, (path, auth, r.status_code)
            assert "not-for-flower" not in r.text and good[0].id not in r.text
    # the HTML pages answer 401 only when a login is configured (without one they are open),
    # so this proves FLOWER_BASIC_AUTH took effect; browsers get the Basic challenge
    page = requests.get(f"{base}/tasks", timeout=5)
    assert page.headers.get("WWW-Authenticate") == 'Basic realm="flower"'
    assert requests.get(f"{base}/tasks", auth=AUTH, timeout=5).status_code == 200
    assert SECRET not in w.log()
    assert AsyncResult(bad.id, app=celery_app).state == "FAILURE"
