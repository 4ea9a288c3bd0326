"""The HTTP intake (`onelane intake`): a real server process on a free port, a real worker, the fragile API."""
from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
import threading
import time
from urllib.parse import unquote

import pytest
import redis
import requests

from demo.fragile_api import Reply
from demo.redis_server import RedisServer
from onelane.core.errors import ConfigError
from onelane.core.settings import load_settings
from onelane.ops.intake.tokens import TokenBook, TokensFile, hash_token, parse_book
from onelane.core.keys import Keys
from tests import procs
from tests.intake_proc import ONELANE, IntakeProcess
from tests.procs import wait_for

LANE = "serial"  # the default lane: a worker on it needs no setting


@pytest.fixture
def tokens(tmp_path):
    """A tokens file with three tokens: 'main' (the lane), 'limited' (the lane, 2/s), 'other' (lane other)."""
    f = TokensFile(str(tmp_path / "tokens.json"))
    made = {name: f.add(lanes, rate=rate, name=name)[0]
            for name, lanes, rate in [("main", [LANE], None), ("limited", [LANE], "2/s"), ("other", ["other"], None)]}
    made["path"] = f.path
    return made


@pytest.fixture
def run_intake(base_env, redis_client):
    """Start `onelane intake` processes; each is stopped by pid when the test ends, and the session's Redis is
    emptied then too (no callout published here may reach a later test's worker)."""
    started: list[IntakeProcess] = []

    def _run(env_extra: dict | None = None, *, wait_ready: bool = True, **kw) -> IntakeProcess:
        p = IntakeProcess({**base_env, **(env_extra or {})}, **kw)
        started.append(p)
        return p.start(wait_ready=wait_ready)

    yield _run
    for p in started:
        p.stop()
    redis_client.flushdb()


def intake_env(tokens) -> dict:
    return {"ONELANE_INTAKE_TOKENS_FILE": tokens["path"]}


# -- unit: tokens, the document, the layering ---------------------------------------------------------
@pytest.mark.unit
def test_tokens_are_stored_hashed_and_found_only_by_the_whole_token(tmp_path):
    # Given a token made for lane erp
    f = TokensFile(str(tmp_path / "t.json"))
    token, entry = f.add(["erp"], rate="100/s", name="erp-prod")
    raw = (tmp_path / "t.json").read_text()
    # Then the file holds its hash and never the token, readable by its owner only
    assert token not in raw and hash_token(token) in raw
    assert stat.S_IMODE(os.stat(f.path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["t.json"]  # no temporary or lock file left behind
    # and only the whole token finds the entry
    book = TokenBook(parse_book(raw))
    assert book.find(token) == entry and entry.allows("erp") and not entry.allows("crm")
    assert entry.rate_per_s == 100 and entry.name == "erp-prod"
    assert book.find(token[:-1]) is None and book.find(token + "x") is None and book.find("") is None
    # and a revoked token is gone
    assert [e.name for e in f.revoke("erp-prod")] == ["erp-prod"]
    assert TokenBook(f.entries()).find(token) is None


@pytest.mark.unit
@pytest.mark.parametrize("text, says", [
    ("{", "not valid JSON"),
    ('{"olk_plaintext": {"lanes": ["erp"]}}', "never put a token"),
    ('{"sha256:' + "a" * 64 + '": {"lanes": []}}', "lanes must be a non-empty list"),
    ('{"sha256:' + "a" * 64 + '": {"lanes": ["a b"]}}', "lanes must be"),
    ('{"sha256:' + "a" * 64 + '": {"lanes": ["erp"], "rate": "fast"}}', "rate 'fast'"),
    ('{"sha256:' + "a" * 64 + '": {"lanes": ["erp"], "admin": true}}', "unknown field"),
])
def test_a_bad_tokens_file_is_refused_naming_the_setting_and_what_is_wrong(text, says):
    with pytest.raises(ConfigError) as err:
        parse_book(text)
    assert "ONELANE_INTAKE_TOKENS_FILE" in str(err.value) and says in str(err.value)


@pytest.mark.unit
def test_intake_settings_have_defaults_and_bad_values_name_the_variable():
    s = load_settings({})
    assert (s.intake_tokens_file, s.intake_max_batch, s.intake_max_batch_bytes) == ("", 500, 16 << 20)
    assert load_settings({"ONELANE_INTAKE_MAX_BATCH": "20"}).intake_max_batch == 20
    for name, value in [("ONELANE_INTAKE_MAX_BATCH", "0"), ("ONELANE_INTAKE_MAX_BATCH", "many"),
                        ("ONELANE_INTAKE_MAX_BATCH_BYTES", "12")]:
        with pytest.raises(ConfigError, match=name):
            load_settings({name: value})


@pytest.mark.unit
def test_token_add_prints_the_token_once_and_list_never_shows_it(base_env, tmp_path):
    path = str(tmp_path / "tokens.json")
    env = {**base_env, "ONELANE_INTAKE_TOKENS_FILE": path}
    add = subprocess.run([ONELANE, "intake", "token", "add", "--lane", "erp", "--rate", "100/s"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert add.returncode == 0, add.stderr
    token = add.stdout.strip()
    assert token.startswith("olk_") and len(token.splitlines()) == 1  # stdout is the token alone
    assert "shown only now" in add.stderr
    listed = subprocess.run([ONELANE, "intake", "token", "list"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0 and "erp" in listed.stdout and token not in listed.stdout + open(path).read()
    bad = subprocess.run([ONELANE, "intake", "token", "add", "--lane", "no/slash"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "not a lane name" in bad.stderr
    nofile = subprocess.run([ONELANE, "intake", "token", "add", "--lane", "erp"],
                            env={k: v for k, v in env.items() if k != "ONELANE_INTAKE_TOKENS_FILE"},
                            capture_output=True, text=True, timeout=60)
    assert nofile.returncode != 0 and "ONELANE_INTAKE_TOKENS_FILE" in nofile.stderr


@pytest.mark.unit
def test_the_openapi_document_describes_every_callout_argument_and_every_route():
    import schemathesis

    from onelane.callout.validation import ARGUMENTS
    from onelane.ops.intake.openapi import document

    doc = document(load_settings({}))
    assert set(doc["components"]["schemas"]["Callout"]["properties"]) == set(ARGUMENTS)
    assert set(doc["paths"]) == {"/v1/lanes/{lane}/callouts", "/v1/lanes/{lane}/callouts:batch",
                                 "/v1/callouts/{task_id}", "/v1/lanes", "/healthz", "/readyz"}
    schema = schemathesis.openapi.from_dict(doc)
    assert len([op for op in schema.get_all_operations() if op.ok()]) == 6


@pytest.mark.unit
def test_only_the_intake_imports_the_asgi_stack_and_onelane_works_without_it(base_env):
    # Given every onelane module
    asgi = {"starlette", "uvicorn", "fastapi", "schemathesis"}
    offenders = []
    for path in (procs.ROOT / "onelane").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if {x.split(".")[0] for x in names} & asgi:
            offenders.append(path.relative_to(procs.ROOT).as_posix())
    # Then only onelane/ops/intake/ imports Starlette or uvicorn
    assert offenders and all(p.startswith("onelane/ops/intake/") for p in offenders), offenders
    # and without them installed, the CLI, the status, submit and the token commands still load
    code = ("import sys\nsys.modules.update(starlette=None, uvicorn=None)\n"
            "import onelane.ops.cli, onelane.ops.status, onelane.ops.producer, onelane.ops.intake.tokens\n"
            "from click.testing import CliRunner\n"
            "r = CliRunner().invoke(onelane.ops.cli.main, ['intake', '--port', '1'])\n"
            "print(r.output)\n")
    out = subprocess.run([sys.executable, "-c", code], env=base_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'onelane[intake]'" in out.stdout


@pytest.mark.unit
def test_make_compose_and_readme_run_the_intake_as_documented():
    import yaml

    service = yaml.safe_load((procs.ROOT / "docker-compose.yml").read_text())["services"]["intake"]
    assert service["command"][:2] == ["onelane", "intake"]
    # beyond loopback inside the container, so with a tokens file, published on the host's loopback only
    assert service["environment"]["ONELANE_INTAKE_TOKENS_FILE"].startswith("/var/lib/onelane/")
    assert service["ports"] == ["127.0.0.1:8080:8080"]
    assert "onelane intake --host 127.0.0.1 --port 8080" in (procs.ROOT / "Makefile").read_text()
    assert 'intake]"' in (procs.ROOT / "Dockerfile").read_text()
    readme = (procs.ROOT / "README.md").read_text()
    section = readme[readme.index("### From any platform: the HTTP intake"):readme.index("## Running it")]
    assert "curl" in section and "send_task" in section and "TLS" in section
    assert "onelane intake --host 127.0.0.1 --port 8080" in section


# -- redis: the intake process against the session's Redis, no worker ------------------------------------
@pytest.mark.redis
def test_the_intake_refuses_to_start_open_beyond_loopback_or_with_a_missing_tokens_file(run_intake, tmp_path):
    # Without a tokens file, on every address: refused, saying what to do
    open_wide = run_intake(host="0.0.0.0", wait_ready=False)
    wait_for(lambda: open_wide.proc.poll() is not None, 30, what="the open intake to exit")
    assert open_wide.proc.returncode != 0
    assert "ONELANE_INTAKE_TOKENS_FILE" in open_wide.log() and "onelane intake token add" in open_wide.log()
    # With a tokens file that is not there: refused, naming the setting
    missing = run_intake({"ONELANE_INTAKE_TOKENS_FILE": str(tmp_path / "nope.json")}, wait_ready=False)
    wait_for(lambda: missing.proc.poll() is not None, 30, what="the misconfigured intake to exit")
    assert missing.proc.returncode != 0 and "ONELANE_INTAKE_TOKENS_FILE" in missing.log()
    assert "no such file" in missing.log()
    # Without a tokens file on loopback: it runs, and needs no token
    local = run_intake()
    r = local.post("lane-local", {"url": "http://127.0.0.1:9/x"}, token=None)
    assert r.status_code == 202 and r.json()["error"] is None


@pytest.mark.redis
def test_auth_no_token_401_wrong_lane_403_over_rate_429_with_retry_after(run_intake, tokens, redis_client):
    intake = run_intake(intake_env(tokens))
    callout = {"url": "http://127.0.0.1:9/x"}
    # no token, a malformed header, an unknown token: 401, with a challenge and what to do
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer olk_not-a-real-token"}):
        r = intake.call("POST", f"/v1/lanes/{LANE}/callouts", headers=headers, json=callout)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json()["error"]
    # a lane the token may not use: 403 naming the lane; GET of a callout on it likewise
    r = intake.post(LANE, callout, token=tokens["other"])
    assert r.status_code == 403 and repr(LANE) in r.json()["error"]
    task_id = intake.post(LANE, callout, token=tokens["main"]).json()["task_id"]
    assert intake.call("GET", f"/v1/callouts/{task_id}", token=tokens["other"]).status_code == 403
    assert intake.call("GET", f"/v1/callouts/{task_id}", token=tokens["main"]).json()["state"] == "queued"
    # over its rate (2/s, a burst of 2): 429 with Retry-After in whole seconds
    answers = [intake.post(LANE, callout, token=tokens["limited"]) for _ in range(6)]
    codes = [a.status_code for a in answers]
    assert codes[0] == 202 and 429 in codes, codes
    limited = next(a for a in answers if a.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1 and "rate of 2/s" in limited.json()["error"]
    # nothing refused reached the queue: one for 'main' and the limited token's accepted ones
    assert redis_client.llen(LANE) == 1 + codes.count(202)
    # and a token added while the intake runs is accepted within a second or two, a revoked one refused
    new = TokensFile(tokens["path"]).add([LANE], name="late")[0]
    wait_for(lambda: intake.post(LANE, callout, token=new).status_code == 202, 10, 0.2, what="the new token")
    TokensFile(tokens["path"]).revoke("late")
    wait_for(lambda: intake.post(LANE, callout, token=new).status_code == 401, 10, 0.2, what="the revocation")


@pytest.mark.redis
def test_bad_requests_get_json_errors_that_name_what_to_fix(run_intake, tokens, redis_client):
    intake = run_intake({**intake_env(tokens), "ONELANE_MAX_MESSAGE_BYTES": "2048", "ONELANE_INTAKE_MAX_BATCH": "3"})
    t = tokens["main"]
    post = f"/v1/lanes/{LANE}/callouts"
    cases = [
        (intake.post(LANE, {"url": "ftp://x"}, token=t), 422, "url"),
        (intake.post(LANE, {"url": "http://h/", "json": 1, "data": "x"}, token=t), 422, "json"),
        (intake.post(LANE, {"url": "http://h/", "timeout": 0}, token=t), 422, "timeout"),
        (intake.post(LANE, {"url": "http://h/", "color": "red"}, token=t), 422, "color"),
        (intake.post(LANE, ["http://h/"], token=t), 422, "body"),
        (intake.post(LANE, {"url": "http://h/", "idempotency_key": "a"}, token=t, key="b"), 422, "idempotency_key"),
        (intake.post(LANE, {"url": "http://h/"}, token=t, key="k" * 201), 422, "Idempotency-Key"),
        (intake.post("bad lane!", {"url": "http://h/"}, token=t), 422, "lane"),
        (intake.post(LANE, {"url": "http://h/", "json": "x" * 3000}, token=t), 413, "body"),
        (intake.post(LANE, {"url": "http://h/", "json": "x" * 1990}, token=t, key="k" * 100), 413, "payload"),
        (intake.call("POST", post, token=t, data=b'{"url":'), 400, "body"),
        (intake.call("POST", post, token=t, data=b'{"url": "http://h/", "timeout": NaN}'), 400, "body"),
        (intake.call("POST", post, token=t, data=b""), 400, "body"),
        (intake.call("POST", post, token=t, data=b'{"url": "http://h/"}',
                     headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "Content-Type"),
        (intake.call("POST", f"{post}:batch", token=t, json={"callouts": []}), 422, "callouts"),
        (intake.call("POST", f"{post}:batch", token=t, json={"callouts": [{"url": "http://h/"}] * 4}), 413,
         "callouts"),
        (intake.call("GET", "/v1/callouts/no-such-task", token=t), 404, None),
        (intake.call("GET", "/v2/nothing", token=t), 404, None),
        (intake.call("DELETE", "/v1/lanes", token=t), 405, None),
    ]
    for r, status, field in cases:
        body = r.json()
        assert (r.status_code, body.get("field")) == (status, field), (r.request.url, r.status_code, body)
        assert isinstance(body["error"], str) and len(body["error"]) > 20 and "Traceback" not in body["error"]
    # nothing refused was published
    assert redis_client.llen(LANE) == 0
    # and a good one is, with its status URL in Location
    ok = intake.post(LANE, {"url": "http://h/"}, token=t)
    assert ok.status_code == 202 and ok.headers["Location"] == ok.json()["status_url"]
    assert redis_client.llen(LANE) == 1


@pytest.mark.redis
def test_one_idempotency_key_sent_many_times_at_once_publishes_once(run_intake, tokens, redis_client):
    intake = run_intake(intake_env(tokens))
    callout = {"url": "http://127.0.0.1:9/order", "json": {"order": 42}}
    answers: list = []
    lock = threading.Lock()

    def send():
        with requests.Session() as s:  # a connection of its own per client
            for _ in range(20):  # a 409 (the first is still being published) says: retry in a moment
                r = s.post(f"{intake.url}/v1/lanes/{LANE}/callouts", json=callout, timeout=15,
                           headers={"Authorization": f"Bearer {tokens['main']}", "Idempotency-Key": "order-42"})
                if r.status_code != 409:
                    break
                assert r.headers["Retry-After"] == "1"
                time.sleep(0.05)
        with lock:
            answers.append(r)

    # When 16 clients send the same key at the same moment
    threads = [threading.Thread(target=send) for _ in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    # Then one publishes (202), the others get its task id (200), and the lane holds one message
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 15 + [202], codes
    assert len({r.json()["task_id"] for r in answers}) == 1
    assert redis_client.llen(LANE) == 1
    assert all(r.json()["duplicate"] == (r.status_code == 200) for r in answers)
    # and the same key on another lane is another callout
    lane_b = TokensFile(tokens["path"]).add(["lane-b"])[0]
    other = wait_for(lambda: (r := intake.post("lane-b", callout, token=lane_b, key="order-42")).status_code != 401
                     and r, 10, 0.2, what="the token of lane-b")
    assert other.status_code == 202 and other.json()["task_id"] != answers[0].json()["task_id"]


@pytest.mark.redis
def test_redis_down_is_a_503_with_retry_after_and_the_intake_recovers(run_intake, tokens):
    with RedisServer(appendonly=False) as server:
        intake = run_intake({**intake_env(tokens), "REDIS_URL": server.url})
        assert intake.post(LANE, {"url": "http://127.0.0.1:9/a"}, token=tokens["main"]).status_code == 202
        # When Redis stops
        server.stop()
        t0 = time.monotonic()
        answers = [intake.post(LANE, {"url": "http://127.0.0.1:9/b"}, token=tokens["main"], key="b"),
                   intake.post(LANE, {"url": "http://127.0.0.1:9/c"}, token=tokens["limited"]),
                   intake.call("POST", f"/v1/lanes/{LANE}/callouts:batch", token=tokens["main"],
                               json={"callouts": [{"url": "http://127.0.0.1:9/d"}]}),
                   intake.call("GET", "/v1/lanes", token=tokens["main"]),
                   intake.call("GET", "/readyz")]
        took = time.monotonic() - t0
        # Then every answer is a quick 503 with Retry-After and an error that says to retry
        for r in answers:
            assert r.status_code == 503, (r.request.url, r.status_code, r.text)
            assert int(r.headers["Retry-After"]) >= 1 and "again" in r.json()["error"]
        assert took < 30, took  # bounded retries, never a hang
        assert intake.call("GET", "/healthz").status_code == 200  # the process itself is up
        # When Redis is back, so is the intake (no restart), and the key refused meanwhile is free
        server.start()
        wait_for(lambda: intake.call("GET", "/readyz").status_code == 200, 15, 0.2, what="readyz after Redis is back")
        again = intake.post(LANE, {"url": "http://127.0.0.1:9/b"}, token=tokens["main"], key="b")
        assert again.status_code == 202, again.text
        assert "Traceback" not in intake.log()


@pytest.mark.redis
def test_a_batch_cut_off_by_redis_midway_says_which_callouts_were_published(run_intake, tokens):
    with RedisServer(appendonly=False) as server:
        intake = run_intake({**intake_env(tokens), "REDIS_URL": server.url})
        client = redis.Redis.from_url(server.url)
        big = {"url": "http://127.0.0.1:9/x", "json": "x" * 200_000}
        # Given a Redis that will fill up (maxmemory, noeviction) a few messages into the batch
        before = int(client.info("memory")["used_memory"])
        for _ in range(2):
            assert intake.post(LANE, big, token=tokens["main"]).status_code == 202
        after = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", int(after + 2.5 * (after - before) / 2))
        batch = f"/v1/lanes/{LANE}/callouts:batch"
        # When a batch of 8 big callouts is posted and Redis answers OOM partway
        r = intake.call("POST", batch, token=tokens["main"], json={"callouts": [big] * 8},
                        headers={"Idempotency-Key": "cut"})
        body = r.json()
        # Then the answer says exactly which were published; the rest are 503s to send again
        assert r.status_code == 202 and 1 <= body["accepted"] <= 7, body
        codes = [it["status"] for it in body["items"]]
        assert codes == [202] * body["accepted"] + [503] * (8 - body["accepted"]), codes
        assert all("send it again" in it["error"] for it in body["items"] if it["status"] == 503)
        assert client.llen(LANE) == 2 + body["accepted"]
        # And once Redis has room again, the same batch resent publishes just the rest
        client.config_set("maxmemory", 0)
        again = intake.call("POST", batch, token=tokens["main"], json={"callouts": [big] * 8},
                            headers={"Idempotency-Key": "cut"}).json()
        assert (again["duplicates"], again["accepted"]) == (body["accepted"], 8 - body["accepted"]), again
        assert client.llen(LANE) == 2 + 8
        client.close()


# -- e2e: a real worker, the fragile API ---------------------------------------------------------------------
@pytest.mark.e2e
def test_a_posted_callout_reaches_the_api_once_and_get_shows_how_it_went(run_intake, tokens, base_env, api, start,
                                                                         redis_client):
    start(procs.worker(base_env))
    intake = run_intake(intake_env(tokens))
    t = tokens["main"]
    api.script("order-7", [Reply(200, {"ok": True}, headers={"Set-Cookie": "session=secret"}, delay_s=0.3)])
    # When a platform POSTs a callout with its own Idempotency-Key
    first = intake.post(LANE, {"url": f"{api.url}/orders", "json": {"order": 7},
                               "headers": {"Authorization": "Bearer api-secret"}}, token=t, key="order-7")
    assert first.status_code == 202, first.text
    task_id = first.json()["task_id"]
    # Then it reaches the API once, carrying that key, and GET follows it to succeeded with the result
    seen = set()

    def finished():
        st = intake.call("GET", first.json()["status_url"], token=t).json()
        seen.add(st["state"])
        return st if st["state"] == "succeeded" else None

    state = wait_for(finished, 30, 0.02, what="the callout to succeed")
    assert seen <= {"queued", "running", "succeeded"} and "running" in seen, seen
    assert state["task_id"] == task_id and state["lane"] == LANE and state["attempts"] == 1
    assert state["result"]["status_code"] == 200 and state["result"]["json"]["ok"] is True
    assert state["result"]["headers"]["Set-Cookie"] == "***"  # secrets masked
    [call] = api.calls_for("order-7")
    assert call.json() == {"order": 7} and call.headers["authorization"] == "Bearer api-secret"
    # and the same key again: the same task id, 200, nothing published, no second call
    again = intake.post(LANE, {"url": f"{api.url}/orders", "json": {"order": 7},
                               "headers": {"Authorization": "Bearer api-secret"}}, token=t, key="order-7")
    assert again.status_code == 200 and again.json()["task_id"] == task_id and again.json()["duplicate"] is True
    time.sleep(0.5)
    assert len(api.calls_for("order-7")) == 1 and redis_client.llen(LANE) == 0
    # A callout the API refuses for good is dead-lettered, and GET says so and why
    api.script("bad-1", [Reply(400, {"error": "no such order"})])
    bad = intake.post(LANE, {"url": f"{api.url}/orders", "json": {"order": -1}}, token=t, key="bad-1")
    st = wait_for(lambda: (s := intake.call("GET", bad.json()["status_url"], token=t).json())["state"]
                  in ("dead-lettered", "failed") and s, 30, 0.05, what="the refused callout to finish")
    assert st["state"] == "dead-lettered" and "400" in st["reason"] and st["result"] is None
    # and the lane overview shows it
    lanes = intake.call("GET", "/v1/lanes", token=t).json()["lanes"]
    serial = next(x for x in lanes if x["name"] == LANE)
    assert serial["dead_letters"] == 1 and serial["depth"] == 0 and serial["holder"]["pid"] > 0
    assert {x["name"] for x in intake.call("GET", "/v1/lanes", token=tokens["other"]).json()["lanes"]} == set()


@pytest.mark.e2e
def test_a_batch_of_100_with_5_bad_records_sends_95_and_names_the_5(run_intake, tokens, base_env, api, start):
    start(procs.worker(base_env))
    intake = run_intake(intake_env(tokens))
    bad = {7: {"url": "ftp://nope"}, 23: {"url": "http://h/", "timeout": -1}, 42: {"json": {"no": "url"}},
           61: {"url": "http://h/", "method": "FETCH"}, 99: "not an object"}
    callouts = [bad.get(i, {"url": f"{api.url}/rec/{i}", "json": {"i": i}}) for i in range(100)]
    batch = f"/v1/lanes/{LANE}/callouts:batch"
    # When the batch is posted with an Idempotency-Key
    r = intake.call("POST", batch, token=tokens["main"], json={"callouts": callouts},
                    headers={"Idempotency-Key": "nightly-1"})
    assert r.status_code == 202, r.text
    body = r.json()
    # Then the 5 bad records come back by index, each naming its field, and the 95 others are published
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (95, 0, 5)
    errors = {it["index"]: it for it in body["items"] if it["error"]}
    assert sorted(errors) == sorted(bad)
    assert {i: errors[i]["field"] for i in errors} == {7: "url", 23: "timeout", 42: "url", 61: "method", 99: "body"}
    assert all(errors[i]["error"].startswith(f"callouts[{i}]") for i in errors)
    assert [it["index"] for it in body["items"]] == list(range(100))
    wait_for(lambda: len(api.snapshot()) >= 95, 60, 0.1, what="95 calls at the API")
    # in the batch's order, each once
    keys = [c.key for c in api.snapshot()]
    assert keys == [f"nightly-1:{i}" for i in range(100) if i not in bad]
    assert [c.json()["i"] for c in api.snapshot()] == [i for i in range(100) if i not in bad]
    # And the same batch sent again (a client that timed out) publishes nothing
    again = intake.call("POST", batch, token=tokens["main"], json={"callouts": callouts},
                        headers={"Idempotency-Key": "nightly-1"}).json()
    assert (again["accepted"], again["duplicates"], again["rejected"]) == (0, 95, 5)
    assert [it.get("task_id") for it in again["items"]] == [it.get("task_id") for it in body["items"]]
    time.sleep(0.5)
    assert len(api.snapshot()) == 95 and api.overlaps == 0


@pytest.mark.e2e
def test_fuzzing_the_openapi_document_finds_no_500_and_only_valid_allowed_callouts_reach_the_api(
        run_intake, tokens, base_env, api, start, redis_client):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                                   response_schema_conformance, status_code_conformance)
    from schemathesis.checks import not_a_server_error

    # Given a worker on the token's lane that may call the fragile API and nothing else (short deadlines:
    # fuzzed callouts may ask the API to wait)
    worker = start(procs.worker({**base_env, "ONELANE_CALLOUT_TIMEOUT": "2", "ONELANE_MAX_ATTEMPTS": "1",
                                 "ONELANE_ALLOWED_HOSTS": f"127.0.0.1:{api.port}"}))
    intake = run_intake(intake_env(tokens))
    doc = requests.get(f"{intake.url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(doc)
    auth = {"Authorization": f"Bearer {tokens['main']}"}
    accepted_keys: set[str] = set()
    lanes_tried: set[str] = set()
    statuses: dict[str, list[int]] = {}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]

    def callouts_of(body) -> list:
        """The callouts of a batch body as the intake reads them (anything but a list of them: none)."""
        callouts = body.get("callouts") if isinstance(body, dict) else None
        return callouts if isinstance(callouts, list) else []

    def aim(case, to_lane: bool, to_api: bool):
        """Half the cases on the token's lane, and callout bodies pointed at the fragile API (else nothing could
        reach it); the API's own test switches (?delay=, ?status=) and long deadlines are taken out."""
        if "lane" in (case.path_parameters or {}) and to_lane:
            case.path_parameters = {**case.path_parameters, "lane": LANE}
        body = case.body
        for item in [body] if isinstance(body, dict) and "callouts" not in body else callouts_of(body):
            if isinstance(item, dict) and to_api and isinstance(item.get("url"), str):
                item["url"] = f"{api.url}/fuzz"
            if isinstance(item, dict) and isinstance(item.get("params"), dict):
                item["params"].pop("delay", None)
                item["params"].pop("status", None)
            if isinstance(item, dict) and isinstance(item.get("timeout"), (int, float)) and item["timeout"] > 2:
                item["timeout"] = 2
        if isinstance(body, dict):
            case.body = body  # assigned again: schemathesis then knows the case was changed
        return case

    for result in schema.get_all_operations():
        op = result.ok()
        cases = st.one_of(op.as_strategy(generation_mode=GenerationMode.POSITIVE),
                          op.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @given(case=cases, to_lane=st.booleans(), to_api=st.booleans())
        @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def fuzz(case, to_lane, to_api):
            aim(case, to_lane, to_api)
            lanes_tried.add(unquote(str((case.path_parameters or {}).get("lane", LANE))))
            response = case.call(base_url=intake.url, headers=auth, timeout=15)
            statuses.setdefault(op.label, []).append(response.status_code)
            assert response.status_code < 500, response.text
            case.validate_response(response, checks=checks)
            if response.status_code in (200, 202) and "callouts" in op.path:
                body = response.json()
                for item in body.get("items", [body]):
                    if item.get("task_id"):
                        accepted_keys.add(item["task_id"])
                sent = case.body if isinstance(case.body, dict) else {}
                # a header's value arrives without the spaces and tabs around it (HTTP strips them)
                header_key = (case.headers or {}).get("Idempotency-Key")
                header_key = header_key.strip(" \t") if isinstance(header_key, str) else None
                keys = [header_key, sent.get("idempotency_key")]
                keys += [c.get("idempotency_key") for c in callouts_of(sent) if isinstance(c, dict)]
                if header_key:
                    keys += [f"{header_key}:{i}" for i in range(len(callouts_of(sent)))]
                accepted_keys.update(k for k in keys if isinstance(k, str))

        fuzz()

    # (and one well-formed callout for the API beside the fuzz: what hypothesis generates differs with
    # what ran before it in the process, and a run whose accepted callouts all aim elsewhere would
    # leave the check below nothing to check)
    known = intake.call("POST", f"/v1/lanes/{LANE}/callouts", token=tokens["main"],
                        json={"url": f"{api.url}/fuzz", "idempotency_key": "known-good"})
    assert known.status_code == 202, known.text
    accepted_keys.add("known-good")

    # Then every operation was exercised, nothing answered 5xx (asserted per request above) ...
    assert len(statuses) == 6 and all(statuses.values())
    posted = statuses["POST /v1/lanes/{lane}/callouts"]
    assert 202 in posted and any(400 <= s < 500 for s in posted), posted  # the fuzz reached both sides
    # ... every call that reached the API was a callout the intake accepted on the allowed lane ...
    keys = Keys()

    def drained() -> bool:  # nothing queued (kombu's list, the ready list), taken or in flight
        return (redis_client.llen(LANE) == 0 and redis_client.llen(keys.ready(LANE)) == 0
                and not redis_client.zcard(keys.inflight_index(LANE)) and not redis_client.hlen("unacked")
                and not any(redis_client.llen(f) for f in redis_client.hkeys(keys.fetch_lists)))

    wait_for(drained, 60, 0.2, what="the worker to drain the lane")
    time.sleep(0.5)
    calls = api.snapshot()
    assert calls, f"no callout reached the API: the test would prove nothing; the worker's log ends:\n" \
                  f"{worker.log()[-4000:]}"
    assert [c.key for c in calls if c.key not in accepted_keys] == []
    # ... and nothing was published to any other lane
    others = sorted(x for x in lanes_tried if x != LANE)
    assert others, "the fuzz never tried another lane"
    assert [x for x in others if redis_client.exists(x) or redis_client.exists(f"_kombu.binding.{x}")] == []
