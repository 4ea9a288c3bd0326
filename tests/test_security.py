"""Security: where callouts may go, where secrets may appear, authenticated Redis, no pickle."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from celery import Celery

from demo.fragile_api import FragileAPI, Reply
from demo.redis_server import RedisServer
from onelane.callout import http
from onelane.callout.egress import EgressPolicy
from onelane.callout.ledger import Ledger
from onelane.core.errors import EgressRefused
from onelane.core.keys import Keys
from tests import procs
from tests.procs import wait_for

KEYS = Keys()


def everything_in_redis(client) -> str:
    """Every value of every key, as text, to search for secrets."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            out.append(client.get(key))
        elif kind == "hash":
            out += [v for kv in client.hgetall(key).items() for v in kv]
        elif kind == "list":
            out += client.lrange(key, 0, -1)
        elif kind == "zset":
            out += client.zrange(key, 0, -1)
        elif kind == "set":
            out += list(client.smembers(key))
    return "\n".join(v.decode("utf-8", "replace") for v in out)


def send(app, url, **kw):
    return app.send_task("tasks.callout", kwargs={"url": url, **kw}, queue="serial")


@pytest.mark.e2e
def test_allowlist_passes_listed_host_and_refuses_others_before_connecting(base_env, redis_client, api, start,
                                                                          celery_app):
    with FragileAPI() as other:
        start(procs.worker({**base_env, "ONELANE_ALLOWED_HOSTS": f"127.0.0.1:{api.port}"}))
        assert send(celery_app, f"{api.url}/ok").get(timeout=20)["status_code"] == 200
        r = send(celery_app, f"{other.url}/no")
        with pytest.raises(Exception) as info:
            r.get(timeout=20)
        assert "not in ONELANE_ALLOWED_HOSTS" in str(info.value)
        assert other.snapshot() == []
        [entry] = Ledger(redis_client, KEYS, window_s=60).dead_letters("serial")
        assert len(entry["attempts"]) == 1  # not retried


@pytest.mark.parametrize("url_of", [
    lambda api: f"{api.url}/loopback",
    lambda api: f"http://localhost:{api.port}/name-resolving-to-loopback",
    lambda api: "http://169.254.169.254/latest/meta-data/",
    lambda api: "http://10.1.2.3/private",
])
@pytest.mark.e2e
def test_private_addresses_refused_unless_allowed(base_env, redis_client, api, start, celery_app, url_of):
    env = {**base_env, "ONELANE_ALLOW_PRIVATE_NETWORKS": "0"}
    start(procs.worker(env))
    r = send(celery_app, url_of(api), timeout=5)
    with pytest.raises(Exception) as info:
        r.get(timeout=30)
    assert "loopback, private or link-local" in str(info.value)
    assert api.snapshot() == []


@pytest.mark.unit
def test_a_redirect_cannot_reach_a_refused_address(api):
    # Given a policy that treats the first server as public and everything else as private
    with FragileAPI() as inner:
        class Policy(EgressPolicy):
            def pick_address(self, host, port):
                if port != api.port:
                    raise EgressRefused(f"{host}:{port} resolves to a private address")
                return "127.0.0.1"

        api.script("r", [Reply(302, headers={"Location": f"{inner.url}/secret"})])
        # When the allowed server redirects to the refused one
        with pytest.raises(EgressRefused):
            http.attempt("GET", f"{api.url}/start", timeout_s=5, headers={"Idempotency-Key": "r"},
                         redirects="any", egress=Policy())
        # Then the second hop is checked at connect time and never made
        assert inner.snapshot() == []


@pytest.mark.e2e
def test_worker_side_credentials_reach_the_api_and_nothing_else(base_env, redis_client, api, start, celery_app,
                                                                tmp_path):
    secret = "Bearer s3cret-worker-token"
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"acme": {"Authorization": secret}}))
    w = start(procs.worker({**base_env, "ONELANE_CREDENTIALS_FILE": str(creds)}))
    ok = send(celery_app, f"{api.url}/ok", resource="acme").get(timeout=20)
    api.script("nope", [Reply(400, "bad")])
    bad = send(celery_app, f"{api.url}/bad", resource="acme", idempotency_key="nope")
    with pytest.raises(Exception):
        bad.get(timeout=20)
    # the API got the credential
    assert [c.headers.get("authorization") for c in api.snapshot()] == [secret, secret]
    # and it is nowhere else: not in any Redis key (messages, results, records, dead letters),
    # not in the result, not in the worker log
    assert "s3cret-worker-token" not in everything_in_redis(redis_client)
    assert "s3cret-worker-token" not in json.dumps(ok)
    assert "s3cret-worker-token" not in w.log()


@pytest.mark.e2e
def test_caller_supplied_authorization_is_masked_where_shown_or_stored(base_env, redis_client, api, start,
                                                                      celery_app):
    import tasks

    w = start(procs.worker(base_env))
    api.script("dl", [Reply(401, "who are you")])
    r = tasks.submit(f"{api.url}/x", headers={"Authorization": "Bearer caller-secret"}, idempotency_key="dl",
                     resource="partner")
    with pytest.raises(Exception):
        r.get(timeout=20)
    assert api.snapshot()[0].headers["authorization"] == "Bearer caller-secret"
    [entry] = Ledger(redis_client, KEYS, window_s=60).dead_letters("serial")
    assert entry["request"]["headers"]["Authorization"] == "***"
    assert "caller-secret" not in w.log()
    shown = subprocess.run([str(procs.VENV_BIN / "onelane"), "dlq", "show", r.id], env=base_env,
                           capture_output=True, text=True, timeout=30).stdout
    assert "caller-secret" not in shown and "***" in shown
    # Set-Cookie in a response is masked in the result
    api.script("ck", [Reply(200, "ok", headers={"Set-Cookie": "session=abc123"})])
    res = tasks.submit(f"{api.url}/c", idempotency_key="ck").get(timeout=20)
    assert res["headers"]["Set-Cookie"] == "***"


@pytest.mark.e2e
def test_kwargsrepr_shown_by_events_is_masked(base_env, redis_client, api, start, celery_app):
    # a plain send_task producer puts the raw header in kwargsrepr; the worker's events mask it
    start(procs.worker(base_env))
    events = []
    import threading

    def listen():
        with celery_app.connection() as conn:
            def on_event(event):
                if event.get("type") == "task-received":
                    events.append(event)
                    recv.should_stop = True

            recv = celery_app.events.Receiver(conn, handlers={"*": on_event})
            try:
                recv.capture(limit=None, timeout=20)
            except Exception:
                pass

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    import time
    time.sleep(1)
    send(celery_app, f"{api.url}/e", headers={"X-Api-Key": "k-e-y-secret"}).get(timeout=20)
    t.join(timeout=25)
    assert events, "no task-received event seen"
    assert "k-e-y-secret" not in events[0]["kwargs"] and "***" in events[0]["kwargs"]


@pytest.mark.e2e
def test_password_protected_redis_works_and_a_wrong_password_is_named(base_env, api, start, tmp_path):
    with RedisServer(password="pw-123") as server:
        env = {**base_env, "REDIS_URL": server.url}
        start(procs.worker(env, "auth"))
        app = Celery(broker=server.url, backend=server.url)
        assert send(app, f"{api.url}/a").get(timeout=20)["status_code"] == 200
        wrong = server.url.replace("pw-123", "nope")
        w = procs.worker({**base_env, "REDIS_URL": wrong}, "wrong")
        start(w, wait_ready=False)
        wait_for(lambda: w.proc.poll() is not None, 60, what="the worker with a wrong password to exit")
        assert w.proc.returncode != 0
        assert "refused the password" in w.log() and "nope" not in w.log()
        code = "import tasks\ntry:\n    tasks.submit('http://127.0.0.1:9/x')\nexcept Exception as e:\n    print(e)\n"
        out = subprocess.run([sys.executable, "-c", code], env={**base_env, "REDIS_URL": wrong},
                             capture_output=True, text=True, timeout=60)
        assert "refused the password" in out.stdout and "nope" not in out.stdout


@pytest.mark.e2e
def test_pickle_message_is_rejected_and_never_runs(base_env, redis_client, api, start, celery_app):
    w = start(procs.worker(base_env))
    evil = Celery(broker=base_env["REDIS_URL"])
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    evil.send_task("tasks.callout", kwargs={"url": f"{api.url}/pickled"}, queue="serial", serializer="pickle")
    assert send(celery_app, f"{api.url}/after").get(timeout=20)["status_code"] == 200
    assert [c.path for c in api.snapshot()] == ["/after"]
    wait_for(lambda: "pickle" in w.log().lower(), 10, what="the refusal in the worker log")


@pytest.mark.e2e
def test_oversized_message_refused_by_submit_and_failed_fast_by_the_worker(base_env, redis_client, api, start,
                                                                          celery_app):
    import tasks

    big = {"blob": "x" * (1 << 20)}
    with pytest.raises(ValueError) as info:
        tasks.submit(f"{api.url}/big", json=big)
    assert info.value.field == "payload" and "ONELANE_MAX_MESSAGE_BYTES" in str(info.value)
    with pytest.raises(ValueError) as info:
        tasks.submit(f"{api.url}/h", headers={f"X-H{i}": "v" for i in range(51)})
    assert info.value.field == "headers"
    start(procs.worker(base_env))
    r = send(celery_app, f"{api.url}/big", json=big)
    with pytest.raises(Exception) as info:
        r.get(timeout=30)
    assert "ONELANE_MAX_MESSAGE_BYTES" in str(info.value)
    assert api.snapshot() == []
    [entry] = Ledger(redis_client, KEYS, window_s=60).dead_letters("serial")
    assert len(json.dumps(entry)) < 10_000


@pytest.mark.e2e
def test_tls_redis_carries_broker_results_and_leases(base_env, api, start, tmp_path):
    from demo.redis_server import TLSFiles

    tls = TLSFiles.self_signed(str(tmp_path))
    with RedisServer(tls=tls) as server:
        assert server.url.startswith("rediss://")
        env = {**base_env, "REDIS_URL": server.url, "ONELANE_REDIS_CA_CERTS": tls.ca}
        w = start(procs.worker(env, "tls"))
        # a producer publishes and waits for the result over TLS; the worker fetched it and
        # took the resource lease over TLS
        code = (f"import tasks\nr = tasks.submit({api.url + '/tls'!r}, idempotency_key='over-tls')\n"
                "print(r.get(timeout=30)['fencing_token'])\n")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        [call] = api.snapshot()
        assert call.key == "over-tls" and int(out.stdout.strip()) == call.fence >= 1
        status = subprocess.run([str(procs.VENV_BIN / "onelane"), "status", "serial", "--json"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert json.loads(status.stdout)["guard"]["pid"] == w.pid
        # without the CA the server's certificate cannot be verified, and the error says so
        no_ca = {k: v for k, v in env.items() if k != "ONELANE_REDIS_CA_CERTS"}
        refused = subprocess.run([str(procs.VENV_BIN / "onelane"), "status"], env=no_ca, capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode != 0
        said = refused.stdout + refused.stderr
        assert "certificate" in said.lower() and "ONELANE_REDIS_CA_CERTS" in said
        # and a worker without it stops at once (a certificate does not heal by waiting)
        lost = procs.worker(no_ca, "no-ca")
        start(lost, wait_ready=False)
        wait_for(lambda: lost.proc.poll() is not None, 20, what="the worker without the CA to exit")
        assert lost.proc.returncode != 0 and "ONELANE_REDIS_CA_CERTS" in lost.log()
