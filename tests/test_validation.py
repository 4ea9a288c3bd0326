"""Bad input never reaches the API: `submit` raises at once, a plain `send_task` fails, is dead-lettered,
and the queue moves on. Good input is normalised."""
from __future__ import annotations

import base64
import json

import pytest

import tasks
from onelane.callout.ledger import Ledger
from onelane.callout.validation import validate
from onelane.core.errors import CalloutRejected, ValidationError
from onelane.core.keys import Keys
from tests import procs

KEYS = Keys()
URL = "http://api.example/x"  # submit's bad inputs fail before anything is sent anywhere

# (case id, callout kwargs, the field the error must name)
BAD = [
    ("missing-url", {"method": "GET"}, "url"),
    ("empty-url", {"url": ""}, "url"),
    ("url-not-a-string", {"url": 42}, "url"),
    ("ftp-scheme", {"url": "ftp://127.0.0.1/bad"}, "url"),
    ("no-scheme", {"url": "127.0.0.1/bad"}, "url"),
    ("no-host", {"url": "http:///bad"}, "url"),
    ("bad-port", {"url": "http://127.0.0.1:99999/bad"}, "url"),
    ("unknown-method", {"url": "{api}/bad/method", "method": "FETCH"}, "method"),
    ("method-not-a-string", {"url": "{api}/bad/method2", "method": 1}, "method"),
    ("json-and-data", {"url": "{api}/bad/both", "json": {"a": 1}, "data": "a=1"}, "json"),
    ("headers-int-value", {"url": "{api}/bad/h1", "headers": {"X-N": 1}}, "headers"),
    ("headers-list", {"url": "{api}/bad/h2", "headers": ["X-N: 1"]}, "headers"),
    ("headers-reserved", {"url": "{api}/bad/h3", "headers": {"Idempotency-Key": "k"}}, "headers"),
    ("header-host", {"url": "{api}/bad/h4", "headers": {"Host": "evil.example.com"}}, "headers"),
    ("header-hop-by-hop", {"url": "{api}/bad/h5", "headers": {"Transfer-Encoding": "chunked"}}, "headers"),
    ("url-with-password", {"url": "http://user:PASSWORD@127.0.0.1/bad"}, "url"),
    ("timeout-string", {"url": "{api}/bad/t1", "timeout": "abc"}, "timeout"),
    ("timeout-zero", {"url": "{api}/bad/t2", "timeout": 0}, "timeout"),
    ("timeout-negative", {"url": "{api}/bad/t3", "timeout": -1}, "timeout"),
    ("timeout-too-long", {"url": "{api}/bad/t4", "timeout": 3600.5}, "timeout"),
    ("timeout-bool", {"url": "{api}/bad/t5", "timeout": True}, "timeout"),
    ("timeout-huge-int", {"url": "{api}/bad/t6", "timeout": 10**400}, "timeout"),  # was an OverflowError
    ("resource-empty", {"url": "{api}/bad/r1", "resource": ""}, "resource"),
    ("resource-blank", {"url": "{api}/bad/r2", "resource": "   "}, "resource"),
    ("idempotency-key-201", {"url": "{api}/bad/k1", "idempotency_key": "k" * 201}, "idempotency_key"),
    ("idempotency-key-empty", {"url": "{api}/bad/k2", "idempotency_key": ""}, "idempotency_key"),
    ("unknown-argument", {"url": "{api}/bad/u1", "colour": "red"}, "colour"),
]

# only submit can carry these (send_task's JSON serializer refuses them before anything is sent)
BAD_SUBMIT_ONLY = [
    ("json-set", {"url": URL, "json": {1, 2}}, "json"),
    ("json-object", {"url": URL, "json": {"a": object()}}, "json"),
    ("json-nan", {"url": URL, "json": {"a": float("nan")}}, "json"),
    ("payload-nan-param", {"url": URL, "params": {"a": float("nan")}}, "payload"),
    ("timeout-nan", {"url": URL, "timeout": float("nan")}, "timeout"),
    ("timeout-inf", {"url": URL, "timeout": float("inf")}, "timeout"),
]


def _kwargs(kwargs: dict, api_url: str) -> dict:
    out = dict(kwargs)
    if isinstance(out.get("url"), str):
        out["url"] = out["url"].replace("{api}", api_url)
    return out


def _queued(client) -> int:
    return client.llen(KEYS.queue_list("serial"))


# -- through tasks.submit ----------------------------------------------------------------------

@pytest.mark.redis
@pytest.mark.parametrize("kwargs, field", [(k, f) for _, k, f in BAD + BAD_SUBMIT_ONLY],
                         ids=[c for c, _, _ in BAD + BAD_SUBMIT_ONLY])
def test_submit_refuses_bad_input_naming_the_field(kwargs, field, redis_client):
    kwargs = _kwargs(kwargs, "http://api.example")
    url = kwargs.pop("url", None)
    with pytest.raises(ValueError) as info:
        tasks.submit(url, **kwargs)
    exc = info.value
    assert isinstance(exc, ValidationError)
    assert exc.field == field
    assert repr(field) in str(exc)
    assert "PASSWORD" not in str(exc)  # a URL password never shows in an error
    # nothing was published
    assert _queued(redis_client) == 0


@pytest.mark.unit
def test_submit_and_validate_give_the_same_message():
    kwargs = {"url": "http://api.example/x", "timeout": -1}
    with pytest.raises(ValidationError) as by_validate:
        validate(kwargs)
    with pytest.raises(ValidationError) as by_submit:
        tasks.submit(kwargs.pop("url"), **kwargs)
    assert str(by_submit.value) == str(by_validate.value)
    assert "(0, 3600] seconds" in str(by_submit.value)


@pytest.mark.unit
def test_validate_normalises_good_input():
    req = validate({"url": "https://api.example/v1", "method": "put", "timeout": 5, "json": {"a": [1, 2]},
                    "headers": {"X-Trace": "t"}, "params": {"q": "x", "n": 3}, "resource": "acme",
                    "idempotency_key": "order-1", "retry_on": [503, 429, 503]})
    assert req.method == "PUT"
    assert req.timeout_s == 5.0 and isinstance(req.timeout_s, float)
    assert req.retry_on == (429, 503)
    assert req.as_kwargs() == {
        "url": "https://api.example/v1", "method": "PUT", "json": {"a": [1, 2]}, "headers": {"X-Trace": "t"},
        "params": {"q": "x", "n": 3}, "timeout": 5.0, "resource": "acme", "idempotency_key": "order-1",
        "retry_on": [429, 503],
    }
    # the defaults: POST, nothing else added
    assert validate({"url": "http://h/"}).as_kwargs() == {"url": "http://h/", "method": "POST"}
    # json=None counts as absent, so data may go with it
    assert validate({"url": "http://h/", "json": None, "data": "a=1"}).as_kwargs()["data"] == "a=1"
    # the largest timeout is allowed
    assert validate({"url": "http://h/", "timeout": 3600}).timeout_s == 3600.0


# http.client encodes header names as ASCII and values as Latin-1: anything else is refused up front.
@pytest.mark.parametrize("kwargs, field", [
    ({"headers": {"X-Price": "10 \u20ac"}}, "headers"),
    ({"headers": {"X-Pr\u00efce": "10"}}, "headers"),
    ({"idempotency_key": "\u043a\u043b\u044e\u0447"}, "idempotency_key"),
], ids=["header-value-not-latin1", "header-name-not-ascii", "idempotency-key-not-latin1"])
@pytest.mark.unit
def test_header_text_http_cannot_encode_is_refused(kwargs, field):
    with pytest.raises(ValidationError) as info:
        validate({"url": "http://api.example/x", **kwargs})
    assert info.value.field == field


@pytest.mark.unit
def test_latin1_header_values_are_accepted():
    req = validate({"url": "http://api.example/x", "headers": {"X-Name": "Ren\u00e9e"},
                    "idempotency_key": "caf\u00e9"})
    assert req.headers == {"X-Name": "Ren\u00e9e"} and req.idempotency_key == "caf\u00e9"


def _published_kwargs(client) -> list[dict]:
    """The kwargs of every message waiting in the serial queue (kombu's JSON envelope, base64 body)."""
    out = []
    for raw in client.lrange(KEYS.queue_list("serial"), 0, -1):
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
        assert args == []
        out.append(kwargs)
    return out


@pytest.mark.redis
def test_submit_publishes_the_normalised_kwargs(redis_client):
    # Given no worker, so the message stays in the queue where we can read it
    result = tasks.submit("http://api.example/v1", method="patch", timeout=7, json={"n": 1})
    try:
        assert result.id
        [kwargs] = _published_kwargs(redis_client)
        assert kwargs["method"] == "PATCH"
        assert kwargs["timeout"] == 7.0 and isinstance(kwargs["timeout"], float)
        assert kwargs == {"url": "http://api.example/v1", "method": "PATCH", "json": {"n": 1}, "timeout": 7.0}
    finally:
        redis_client.delete(KEYS.queue_list("serial"))  # no later worker may run it


# -- through plain send_task, with a real worker -----------------------------------------------

@pytest.mark.e2e
def test_send_task_bad_input_fails_at_once_is_dead_lettered_and_the_queue_moves_on(
        base_env, redis_client, api, start, celery_app):
    # Given one real worker on the serial queue
    start(procs.worker(base_env))
    cases = []  # (case id, field, expected message, bad result, good result)
    # When each bad message is published with plain send_task, each followed by a good one
    for i, (case, kwargs, field) in enumerate(BAD + [("positional-args", None, "args")]):
        if kwargs is None:
            bad = celery_app.send_task("tasks.callout", args=[f"{api.url}/bad/args"], queue="serial")
            expected = "callout argument 'args': tasks.callout takes keyword arguments only"
        else:
            kwargs = _kwargs(kwargs, api.url)
            with pytest.raises(ValidationError) as info:  # the message submit would have raised
                validate(kwargs)
            assert info.value.field == field
            expected = str(info.value)
            bad = celery_app.send_task("tasks.callout", kwargs=kwargs, queue="serial")
        good = celery_app.send_task("tasks.callout", kwargs={"url": f"{api.url}/good/{i}", "json": {"i": i}},
                                    queue="serial")
        cases.append((case, field, expected, bad, good))

    # Then every bad one failed with the validation message, and the good one after it succeeded
    problems = []
    for case, field, expected, bad, good in cases:
        bad.get(timeout=30, propagate=False)
        if bad.state != "FAILURE":
            problems.append(f"{case}: state {bad.state}")
        if not isinstance(bad.result, CalloutRejected):
            problems.append(f"{case}: result is {type(bad.result).__name__}: {bad.result!r}")
        if expected not in str(bad.result) or expected not in (bad.traceback or ""):
            problems.append(f"{case}: {expected!r} not in {str(bad.result)!r} / traceback")
        if f"{field!r}" not in str(bad.result):
            problems.append(f"{case}: field {field!r} not named in {str(bad.result)!r}")
        res = good.get(timeout=30)
        if res.get("status_code") != 200 or res.get("attempts") != 1:
            problems.append(f"{case}: the good task after it ended {res!r}")
    assert problems == [], "\n".join(problems)

    # ... each is in the dead-letter hash, marked invalid, with no attempt made
    dead = {e["task_id"]: e for e in Ledger(redis_client, KEYS, window_s=60).dead_letters("serial")}
    assert set(dead) == {c[3].id for c in cases}
    for case, field, expected, bad, _ in cases:
        entry = dead[bad.id]
        assert entry["kind"] == "invalid", (case, entry)
        assert expected in entry["reason"], (case, entry)
        assert entry["attempts"] == [], (case, entry)
        assert entry["queue"] == "serial"
        assert redis_client.hexists(KEYS.dead_letters("serial"), bad.id)
    # ... and the fragile API saw the good calls only, in order, one at a time
    calls = api.snapshot()
    assert [c.path for c in calls] == [f"/good/{i}" for i in range(len(cases))]
    assert api.overlaps == 0
