"""What a new user hit in the first hour: secrets that leaked, messages that silently never ran,
and the rough edges around them. Real worker processes, the real fragile API, the private Redis."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from celery import Celery
from celery.result import AsyncResult

from demo.fragile_api import Reply
from demo.redis_server import free_port
from onelane.core.keys import Keys
from tests import procs
from tests.procs import wait_for

KEYS = Keys()
ONELANE = str(procs.VENV_BIN / "onelane")


def cli(env, *args, timeout=60):
    return subprocess.run([ONELANE, *args], env=env, capture_output=True, text=True, timeout=timeout)


def plain_producer(url: str, **conf) -> Celery:
    """A producer with nothing of onelane: plain Celery and the broker URL."""
    app = Celery(broker=url, backend=url)
    app.conf.update({"task_serializer": "json", **conf})
    return app


def dead_letter(client, task_id: str, queue: str = "serial") -> dict | None:
    raw = client.hget(KEYS.dead_letters(queue), task_id)
    return json.loads(raw) if raw is not None else None


def log_time(log: str, marker: str) -> float:
    """The epoch time of the first log line holding ``marker`` (Celery's "[YYYY-mm-dd HH:MM:SS,mmm: ...")."""
    for line in log.splitlines():
        if marker in line and line.startswith("["):
            stamp = line[1:24]
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"{marker!r} not in the log:\n{log[-3000:]}")


# -- secrets ------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_replay_never_sends_a_masked_secret(base_env, redis_client, api, start, tmp_path):
    import tasks

    start(procs.worker(base_env))
    # Given two dead letters: one with a caller's Authorization header (masked when stored), one without
    with_secret = tasks.submit(f"{api.url}/x?status=400", headers={"Authorization": "Bearer X-caller"},
                               idempotency_key="rp-secret")
    plain = tasks.submit(f"{api.url}/y?status=400", idempotency_key="rp-plain")
    for r in (with_secret, plain):
        r.get(timeout=30, propagate=False)
        assert r.state == "FAILURE"
    assert dead_letter(redis_client, with_secret.id)["request"]["headers"] == {"Authorization": "***"}
    api.reset()

    # When it is replayed with nothing to supply the header: it is refused, naming it and the ways out
    out = cli(base_env, "dlq", "replay", with_secret.id)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Authorization" in out.stdout and "--header" in out.stdout and "ONELANE_CREDENTIALS_FILE" in out.stdout
    assert dead_letter(redis_client, with_secret.id) is not None  # still there
    # ... and --all reports the refused one and goes on with the other
    out = cli(base_env, "dlq", "replay", "--all")
    assert out.returncode == 1 and "1 dead letter(s) replayed" in out.stdout and "1 not replayed" in out.stdout
    wait_for(lambda: api.calls_for("rp-plain"), 20, what="the replayed plain callout")
    # When the operator supplies the header, that value (never the mask) reaches the API
    out = cli(base_env, "dlq", "replay", with_secret.id, "--header", "Authorization: Bearer X-operator")
    assert out.returncode == 0, out.stdout + out.stderr
    call = wait_for(lambda: (api.calls_for("rp-secret") or [None])[0], 20, what="the replayed callout")
    assert call.headers["authorization"] == "Bearer X-operator"
    # (the worker's credentials file as the source: the next test)


@pytest.mark.e2e
def test_replay_takes_a_masked_header_from_the_workers_credentials(base_env, redis_client, api, start, tmp_path):
    import tasks

    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"acme": {"Authorization": "Bearer from-the-worker"}}))
    env = {**base_env, "ONELANE_CREDENTIALS_FILE": str(creds)}
    start(procs.worker(env))
    r = tasks.submit(f"{api.url}/x?status=400", resource="acme", headers={"Authorization": "Bearer caller"},
                     idempotency_key="rp-creds")
    r.get(timeout=30, propagate=False)
    api.reset()
    out = cli(env, "dlq", "replay", r.id)
    assert out.returncode == 0, out.stdout + out.stderr
    call = wait_for(lambda: (api.calls_for("rp-creds") or [None])[0], 20, what="the replayed callout")
    assert call.headers["authorization"] == "Bearer from-the-worker"


@pytest.mark.e2e
def test_no_cookie_rides_from_one_callout_to_the_next(base_env, redis_client, api, start, celery_app):
    import tasks

    start(procs.worker(base_env))
    # Given an API that sets a cookie on one response
    api.script("c1", [Reply(200, {"ok": 1}, headers={"Set-Cookie": "session=abc123; Path=/"})])
    first = tasks.submit(f"{api.url}/login", idempotency_key="c1", resource="acme").get(timeout=20)
    assert first["headers"]["Set-Cookie"] == "***"  # masked in the result
    # When later callouts go out, to the same resource and another
    tasks.submit(f"{api.url}/next", idempotency_key="c2", resource="acme").get(timeout=20)
    tasks.submit(f"{api.url}/other", idempotency_key="c3", resource="billing").get(timeout=20)
    # Then none of them carries the cookie
    for key in ("c2", "c3"):
        [call] = api.calls_for(key)
        assert "cookie" not in call.headers, call.headers


@pytest.mark.e2e
def test_a_url_password_is_refused_and_never_shown(base_env, redis_client, api, start, celery_app):
    import tasks

    w = start(procs.worker(base_env))
    secret_url = f"http://user:PASSWORD@127.0.0.1:{api.port}/x"
    with pytest.raises(ValueError) as info:
        tasks.submit(secret_url)
    assert "'url'" in str(info.value) and "ONELANE_CREDENTIALS_FILE" in str(info.value)
    assert "PASSWORD" not in str(info.value)
    r = celery_app.send_task("tasks.callout", kwargs={"url": secret_url}, queue="serial")
    r.get(timeout=20, propagate=False)
    assert r.state == "FAILURE" and "PASSWORD" not in str(r.result) and "***@" in str(r.result)
    entry = dead_letter(redis_client, r.id)
    assert entry["kind"] == "invalid" and "PASSWORD" not in json.dumps(entry)
    assert api.snapshot() == []
    time.sleep(0.3)
    assert "PASSWORD" not in w.log()


# -- messages that never ran ------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_message_published_with_a_priority_runs_and_is_counted(base_env, redis_client, api, start):
    # Given a plain producer (kombu's default priority steps) and no worker yet
    producer = plain_producer(base_env["REDIS_URL"])
    r = producer.send_task("tasks.callout", kwargs={"url": f"{api.url}/p", "idempotency_key": "prio"},
                           queue="serial", priority=5)
    # Then it sits in kombu's priority sub-list, not the lane's own list, and status counts it
    assert redis_client.llen("serial") == 0
    assert sum(redis_client.llen(KEYS.priority_list("serial", p)) for p in range(1, 10)) == 1
    st = json.loads(cli(base_env, "status", "serial", "--json").stdout)
    assert st["depth"] == 1
    # When a worker runs the lane, it runs
    start(procs.worker(base_env))
    assert r.get(timeout=20)["status_code"] == 200
    assert len(api.calls_for("prio")) == 1


def _raw_message(task_id: str, name: str, body: bytes, content_type: str, queue: str = "serial") -> str:
    """A task message as kombu's Redis transport stores it (protocol 2 headers)."""
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8", "content-type": content_type,
        "headers": {"lang": "py", "task": name, "id": task_id, "root_id": task_id, "parent_id": None,
                    "group": None, "retries": 0, "eta": None, "expires": None, "argsrepr": "()",
                    "kwargsrepr": "{}", "origin": "test"},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": queue, "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": f"tag-{task_id}"},
    })


@pytest.mark.e2e
def test_messages_the_worker_cannot_run_end_failed_and_dead_lettered(base_env, redis_client, api, start,
                                                                     celery_app):
    url = base_env["REDIS_URL"]
    # Given, published before any worker runs: a pickled message, one nested 50 000 deep,
    # one with a misspelt task name (and a secret header), then a good one
    pickler = plain_producer(url, task_serializer="pickle", accept_content=["pickle", "json"])
    pickled = pickler.send_task("tasks.callout", kwargs={"url": f"{api.url}/pickled"}, queue="serial")
    deep_id = "deep-json-1"
    nested = b"[" * 50_000 + b"]" * 50_000
    redis_client.lpush("serial", _raw_message(deep_id, "tasks.callout",
                                               b'[[], {"url": "' + api.url.encode() + b'/deep", "json": '
                                               + nested + b"}, {}]", "application/json"))
    typo = celery_app.send_task("tasks.Callout", queue="serial", kwargs={
        "url": f"{api.url}/typo", "headers": {"Authorization": "Bearer typo-secret"}, "idempotency_key": "typo"})
    good = celery_app.send_task("tasks.callout", queue="serial", kwargs={"url": f"{api.url}/good"})
    # When a worker runs the lane
    w = start(procs.worker(base_env))
    # Then the good one runs, and each bad one ends FAILURE with a reason and a dead letter
    assert good.get(timeout=30)["status_code"] == 200
    for task_id, why in ((pickled.id, "cannot run"), (deep_id, "decoded"), (typo.id, "tasks.Callout")):
        res = AsyncResult(task_id, app=celery_app)
        wait_for(lambda: res.state == "FAILURE", 20, what=f"{task_id} to end FAILURE")
        entry = wait_for(lambda: dead_letter(redis_client, task_id), 10, what=f"the dead letter of {task_id}")
        assert entry["kind"] == "unrunnable" and why in entry["reason"], entry
        assert entry["headers"]["id"] == task_id
    assert len(json.dumps(dead_letter(redis_client, deep_id))) < 5000  # the undecodable body is not kept
    assert dead_letter(redis_client, pickled.id)["request"] == {"omitted": "the body could not be read; it is "
                                                                           "not kept"}
    typo_entry = dead_letter(redis_client, typo.id)
    assert typo_entry["task"] == "tasks.Callout"
    assert typo_entry["request"]["url"] == f"{api.url}/typo"
    assert typo_entry["request"]["headers"] == {"Authorization": "***"}
    assert "typo-secret" not in json.dumps(typo_entry)
    # ... and none of them reached the API
    assert {c.path for c in api.snapshot()} == {"/good"}
    # And the misspelt one, once replayed (as tasks.callout, the header supplied again), runs
    out = cli(base_env, "dlq", "replay", typo.id, "--header", "Authorization: Bearer typo-secret")
    assert out.returncode == 0, out.stdout + out.stderr
    call = wait_for(lambda: (api.calls_for("typo") or [None])[0], 20, what="the replayed misspelt callout")
    assert call.path == "/typo" and call.headers["authorization"] == "Bearer typo-secret"
    assert "typo-secret" not in w.log()


# -- the worker's start and stop --------------------------------------------------------------------

@pytest.mark.e2e
def test_warm_shutdown_keeps_the_guard_until_the_callout_in_flight_is_recorded(base_env, redis_client, api,
                                                                              start, celery_app):
    # Given an active worker, a hot standby, and a 3 s callout in flight
    env = {**base_env, "ONELANE_GUARD_TTL": "2"}
    w1 = start(procs.worker(env, "w1"))
    standby = start(procs.worker({**env, "ONELANE_STANDBY": "1"}, "w2"), wait_ready=False)
    standby.wait_log("standby", 30)
    api.script("long", [Reply(200, {"ok": 1}, delay_s=3)])
    r = celery_app.send_task("tasks.callout", queue="serial",
                             kwargs={"url": f"{api.url}/long", "idempotency_key": "long"})
    wait_for(lambda: api.calls_for("long"), 20, what="the long call to start")
    # When the active worker gets a warm shutdown (SIGTERM) mid-call
    os.kill(w1.pid, signal.SIGTERM)
    standby.wait_log("standby took over", 30)
    # Then the standby took the guard only after the call had ended and its outcome was recorded
    took_at = log_time(standby.log(), "standby took over")
    [call] = api.calls_for("long")
    assert call.end is not None and took_at >= call.end - 0.05, (took_at, call.end)
    assert r.get(timeout=20)["status_code"] == 200
    # ... and found nothing to requeue: the API saw the call once
    time.sleep(1)
    assert len(api.calls_for("long")) == 1
    assert "requeued" not in standby.log()
    assert "keeping the guard of 'serial'" in w1.log()
    assert w1.proc.wait(timeout=20) == 0


@pytest.mark.e2e
def test_a_bulk_workers_warm_shutdown_keeps_its_presence_till_its_callouts_are_done(base_env, redis_client, api,
                                                                                   start, celery_app):
    # Given a bulk worker running a 5 s callout on a resource capped at 1, and a second callout it
    # took that waits for the slot, and the reaper every 0.5 s
    env = {**base_env, "ONELANE_GUARD_TTL": "2", "ONELANE_REAP_INTERVAL": "0.5",
           "ONELANE_LIMITS": json.dumps({"acme": {"concurrency": 1}})}
    w1 = start(procs.worker(env, "b1", queue="bulk", extra=["--pool", "threads", "-c", "2"]))
    start(procs.beat(env))
    api.script("long", [Reply(200, {"ok": 1}, delay_s=5)])
    results = [celery_app.send_task("tasks.callout", queue="bulk",
                                    kwargs={"url": f"{api.url}/{k}", "idempotency_key": k, "resource": "acme"})
               for k in ("long", "next")]
    wait_for(lambda: api.calls_for("long"), 20, what="the long call to start")
    keys = Keys()
    wait_for(lambda: redis_client.llen("bulk") + redis_client.llen(keys.ready("bulk")) == 0, 10,
             what="the second callout to be taken")

    def present() -> list:
        return [k for k in redis_client.scan_iter(match=keys.lease(keys.presence("*"))) if not k.endswith(b":holder")]

    assert len(present()) == 1
    # When the worker gets a warm shutdown (SIGTERM) mid-call
    os.kill(w1.pid, signal.SIGTERM)
    time.sleep(1.5)
    # Then it is still present while its callouts run (the reaper gives back nothing it still runs)
    assert not api.calls_for("long")[0].end and len(present()) == 1
    # and, another bulk worker ready to take whatever would come back, both callouts end once,
    # each called once; the worker withdraws when it has finished them
    start(procs.worker(env, "b2", queue="bulk", extra=["--pool", "threads", "-c", "2"]))
    assert [r.get(timeout=30)["status_code"] for r in results] == [200, 200]
    assert w1.proc.wait(timeout=20) == 0
    assert (len(api.calls_for("long")), len(api.calls_for("next"))) == (1, 1)


class NotRedis:
    """A TCP server that answers every connection like an HTTP server and keeps it open."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @staticmethod
    def _answer(conn):
        try:
            while conn.recv(65536):
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self._conns:
            c.close()


@pytest.mark.e2e
def test_a_redis_url_that_is_not_redis_gets_one_clear_line_everywhere(base_env, start):
    server = NotRedis()
    try:
        env = {**base_env, "REDIS_URL": f"redis://127.0.0.1:{server.port}/0"}
        expected = "answered, but not as Redis"
        out = cli(env, "status")
        assert out.returncode == 1 and expected in out.stderr and "Traceback" not in out.stderr, out.stderr
        out = cli(env, "dlq", "list")
        assert out.returncode == 1 and expected in out.stderr and "Traceback" not in out.stderr, out.stderr
        code = "import tasks\ntry:\n    tasks.submit('http://api.example/x')\nexcept Exception as e:\n" \
               "    print(type(e).__name__, e)\n"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert done.stdout.startswith("BrokerUnavailable") and expected in done.stdout, done.stdout + done.stderr
        w = procs.worker(env, "nr")
        start(w, wait_ready=False)
        wait_for(lambda: w.proc.poll() is not None, 60, what="the worker to exit")
        assert w.proc.returncode != 0 and expected in w.log()
        assert "Traceback" not in w.log() and "Unrecoverable error" not in w.log(), w.log()[-3000:]
    finally:
        server.close()


@pytest.mark.e2e
def test_make_up_stops_all_three_cleanly_on_ctrl_c_after_the_callout_in_flight(base_env, redis_client, api,
                                                                              celery_app):
    import fcntl
    import pty
    import select
    import termios

    # Given `make up` in a terminal of its own (its own Flower port), and a 3 s callout in flight
    venv = Path(sys.executable).parent.parent
    env = {**base_env, "FLOWER_BASIC_AUTH": "ops:pw"}
    leader, follower = pty.openpty()

    def in_the_terminal():
        os.setsid()
        fcntl.ioctl(follower, termios.TIOCSCTTY, 0)
        procs.sigint_as_a_terminal_starts_it()

    p = subprocess.Popen(["make", "-s", "-o", f"{venv}/.installed", "up", f"VENV={venv}",
                          f"FLOWER_PORT={free_port()}"], cwd=str(procs.ROOT), env=env, stdin=follower,
                         stdout=follower, stderr=follower, preexec_fn=in_the_terminal)
    os.close(follower)
    out = bytearray()

    def read_until(pred, timeout_s):
        give_up = time.monotonic() + timeout_s
        while not pred() and time.monotonic() < give_up:
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                out.extend(chunk)

    group = []
    try:
        read_until(lambda: b"ready." in out, 60)
        assert b"ready." in out, out.decode(errors="replace")[-3000:]
        group = [pid for pid in procs.descendants(p.pid)]
        api.script("up-long", [Reply(200, {"ok": 1}, delay_s=3)])
        r = celery_app.send_task("tasks.callout", queue="serial",
                                 kwargs={"url": f"{api.url}/up", "idempotency_key": "up-long"})
        wait_for(lambda: api.calls_for("up-long"), 20, what="the callout to start")
        # When Ctrl-C is typed
        os.write(leader, b"\x03")
        read_until(lambda: p.poll() is not None, 40)
        p.wait(timeout=10)
        ended = time.time()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        for pid in procs.descendants(p.pid) + group:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.close(leader)
    text = out.decode(errors="replace")
    # Then the prompt came back only after the callout had finished, and every process is gone
    [call] = api.calls_for("up-long")
    assert call.end is not None and call.end <= ended
    assert r.get(timeout=10)["status_code"] == 200
    assert len(group) >= 3 and not [pid for pid in group if procs.alive(pid)]
    assert "Segmentation fault" not in text
    assert text.count("Warm shutdown") <= 2, text[-3000:]
