"""The callout run's steps, one by one, against the private Redis and an injected clock (no worker)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from celery.exceptions import Ignore

from onelane.callout.classify import RETRY, Reply, Verdict
from onelane.callout.ledger import Ledger, Outcome
from onelane.callout.run import CalloutRun
from onelane.core.errors import CalloutFailed, CalloutRejected
from onelane.core.keys import Keys
from onelane.core.settings import load_settings
from onelane.coordination.circuit import Circuit
from onelane.coordination.lease import Lease, new_token
from onelane.core import clock
from onelane.delivery import flow
from onelane.delivery.inflight import Inflight

pytestmark = pytest.mark.redis

KEYS = Keys()


class FakeClock:
    """Time that moves only when the run sleeps."""

    def __init__(self):
        self.now = 1000.0
        self.slept: list[float] = []

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
def settings(redis_server):
    return load_settings({"REDIS_URL": redis_server.url, "ONELANE_MAX_ATTEMPTS": "3",
                          "ONELANE_ALLOW_PRIVATE_NETWORKS": "1"})


def task_request(task_id="t1", queue="serial"):
    return SimpleNamespace(id=task_id, delivery_info={"routing_key": queue}, properties={"delivery_tag": ""})


def begin(settings, clock=None, **kwargs):
    kwargs = {"url": "http://api.example/x", "json": {"n": 1}, **kwargs}
    return CalloutRun.begin(task_request(), (), kwargs, settings=settings, clock=clock or FakeClock())


def begin_on(settings, task_id: str, queue: str, **kwargs) -> CalloutRun:
    """A run of ``task_id`` received from ``queue`` (a GET of http://api.example/x unless told)."""
    kwargs = {"url": "http://api.example/x", **kwargs}
    return CalloutRun.begin(task_request(task_id, queue), (), kwargs, settings=settings, clock=FakeClock())


def ok_response(url: str = "http://api.example/x") -> SimpleNamespace:
    """A 200 answer with a short text body, as the HTTP step hands it over."""
    return SimpleNamespace(status_code=200, headers={}, body=b"ok", encoding="utf-8", elapsed_ms=5.0, url=url,
                           truncated=False, content_type="text/plain")


def test_bad_arguments_are_dead_lettered_before_a_run_exists(redis_client, settings):
    with pytest.raises(CalloutRejected) as info:
        CalloutRun.begin(task_request("bad"), (), {"url": "ftp://x"}, settings=settings, clock=FakeClock())
    assert "'url'" in str(info.value) and "the API was not called" in str(info.value)
    entry = json.loads(redis_client.hget(KEYS.dead_letters("serial"), "bad"))
    assert entry["kind"] == "invalid" and entry["request"] == {"url": "ftp://x"}


def test_the_run_takes_its_defaults_from_the_queue_task_and_settings(redis_client, settings):
    run = begin(settings)
    assert run.resource == "serial" and run.idempotency_key == "t1"
    assert run.timeout_ms == 60_000 and run.policy.max_attempts == 3 and not run.permits.capped


def test_preflight_counts_attempts_and_returns_a_recorded_outcome_on_the_first_read_only(redis_client, settings):
    run = begin(settings)
    first = run.preflight()
    assert first.prior is None and first.attempt == 1 and not first.paused and first.circuit.state == "closed"
    # Given two finished attempts and an outcome recorded meanwhile by another copy
    ledger = Ledger(redis_client, KEYS, window_s=60)
    ledger.add_attempt("t1", {"attempt": 1})
    ledger.add_attempt("t1", {"attempt": 2})
    ledger.record_success(task_id="t1", queue="serial", idempotency_key="t1", result={"ok": 1}, now_ms=1)
    # Then a later read counts the attempts but no longer looks for an outcome ...
    again = run.preflight()
    assert again.attempt == 3 and again.prior is None
    # ... while a new run (a redelivered copy) finds it and returns it without calling
    copy = begin(settings)
    check = copy.preflight()
    assert check.prior == Outcome("success", "t1", result={"ok": 1})
    assert copy.recorded(check.prior) == {"ok": 1}


def test_a_recorded_failure_is_raised_again(redis_client, settings):
    run = begin(settings)
    with pytest.raises(CalloutFailed, match="it broke"):
        run.recorded(Outcome("failure", "t1", error="it broke"))


def test_an_open_circuit_makes_a_strict_run_wait_a_second_at_a_time(redis_client, settings):
    clock = FakeClock()
    run = begin(settings, clock)
    circuit = Circuit(redis_client, KEYS, "serial", threshold=1, cooldown_ms=5_000, cooldown_max_ms=5_000)
    circuit.record(ok=False)  # opens it for 5 s
    assert run.wait_until_open(run.preflight()) is False
    assert clock.slept == [1.0]
    circuit.record(ok=True)
    assert run.wait_until_open(run.preflight()) is True
    assert clock.slept == [1.0]


def test_a_paused_queue_that_resumes_in_time_lets_the_attempt_start(redis_client, settings):
    run = begin(settings)
    flow.pause(redis_client, KEYS, "serial")
    check = run.preflight()
    assert check.paused
    flow.resume(redis_client, KEYS, "serial")
    assert run.wait_until_open(check) is True


def test_a_queue_still_paused_gives_the_message_back_and_ends_the_run(redis_client, settings, monkeypatch):
    import onelane.callout.run as run_module

    monkeypatch.setattr(run_module, "PAUSE_WAIT_S", 0.05)
    run = begin(settings)
    flow.pause(redis_client, KEYS, "serial")
    with pytest.raises(Ignore):
        run.wait_until_open(run.preflight())


def test_the_permit_holds_the_lease_with_the_attempt_in_flight_and_releases_it(redis_client, settings):
    run = begin(settings)
    check = run.preflight()
    lease = Lease(redis_client, KEYS.resource_lease("serial"), keys=KEYS)
    with run.permit(check) as attempt:
        # Then while the attempt runs, its lease is held and its record names it
        holder = lease.holder()
        assert holder is not None and holder.token == attempt.grant.token
        rec = Inflight(redis_client, KEYS).get("t1")
        assert rec.lease == lease.name and rec.attempt == 1 and rec.lease_token == attempt.grant.token
        assert attempt.grant.fence == lease.fence() >= 1
    assert lease.holder() is None and attempt.released


def test_the_permit_is_released_when_the_block_raises(redis_client, settings):
    run = begin(settings)
    lease = Lease(redis_client, KEYS.resource_lease("serial"), keys=KEYS)
    with pytest.raises(RuntimeError):
        with run.permit(run.preflight()):
            raise RuntimeError("boom")
    assert lease.holder() is None


def test_success_records_the_outcome_and_releases_in_one_step(redis_client, settings):
    run = begin(settings)
    response = SimpleNamespace(status_code=200, headers={"Content-Type": "application/json", "Set-Cookie": "s=1"},
                               body=b'{"ok": true}', encoding="utf-8", elapsed_ms=5.0, url=run.request.url,
                               truncated=False, content_type="application/json")
    with run.permit(run.preflight()) as attempt:
        result = run.record_success(attempt, Reply(response=response, started=1.0, elapsed_ms=5.0),
                                    Verdict("succeeded", api_up=True))
        assert attempt.released
    assert result["json"] == {"ok": True} and result["headers"]["Set-Cookie"] == "***"
    assert result["fencing_token"] == attempt.grant.fence and result["attempts"] == 1
    assert json.loads(redis_client.get(KEYS.done("t1")))["status"] == "success"
    assert Inflight(redis_client, KEYS).get("t1") is None
    assert Lease(redis_client, KEYS.resource_lease("serial"), keys=KEYS).holder() is None


def test_a_bulk_success_drops_its_receiver_record_with_its_ack_and_a_failure_keeps_it(redis_client, settings,
                                                                                      monkeypatch):
    from onelane.core.settings import WORKER_ID_ENV

    # Given two runs of the bulk queue received by this worker (their receiver records written by
    # their first read, as for every bulk message)
    monkeypatch.setenv(WORKER_ID_ENV, "w-live")

    def received(task_id: str) -> CalloutRun:
        request = SimpleNamespace(id=task_id, delivery_info={"routing_key": "bulk"},
                                  properties={"delivery_tag": f"tag-{task_id}"})
        return CalloutRun.begin(request, (), {"url": "http://api.example/x"}, settings=settings, clock=FakeClock())

    ok, failing = received("t-ok"), received("t-failing")
    checks = {run: run.preflight() for run in (ok, failing)}
    assert redis_client.hgetall(KEYS.reserved("bulk")) == {b"tag-t-ok": b"w-live", b"tag-t-failing": b"w-live"}
    # When the first succeeds and the second's attempt fails (it will be retried)
    with ok.permit(checks[ok]) as attempt:
        ok.record_success(attempt, Reply(response=ok_response(), started=1.0, elapsed_ms=5.0),
                          Verdict("succeeded", api_up=True))
    with failing.permit(checks[failing]) as attempt:
        failing.record_attempt(attempt, Reply(error="connection error: refused", started=1.0, elapsed_ms=3.0),
                               Verdict(RETRY, "connection error: refused", wait_s=1.0))
    # Then the success took its receiver record with its ack (nothing left for the reaper to clear),
    # and the message still running keeps its own: the reaper finds it should this worker die
    assert redis_client.hgetall(KEYS.reserved("bulk")) == {b"tag-t-failing": b"w-live"}


def fast_taken(redis_client, settings, monkeypatch, task_id: str, **env) -> CalloutRun:
    """A run of a bulk message the fast take delivered: the message waits in this worker's fetch list
    (as the LMOVE left it), its delivery carrying it as the fetch list holds it."""
    from onelane.core.settings import WORKER_ID_ENV
    from onelane.delivery.fetching import FETCHED

    monkeypatch.setenv(WORKER_ID_ENV, "w-live")
    message = json.dumps({"body": "...", "headers": {"id": task_id},
                          "properties": {"delivery_tag": f"tag-{task_id}", "body_encoding": "base64"}})
    redis_client.lpush(KEYS.fetch_list("bulk", "w-live"), message)
    request = SimpleNamespace(id=task_id, delivery_info={"routing_key": "bulk", "exchange": ""},
                              properties={"delivery_tag": f"tag-{task_id}", FETCHED: message})
    s = load_settings({"REDIS_URL": settings.redis_url, "ONELANE_ALLOW_PRIVATE_NETWORKS": "1", **env})
    return CalloutRun.begin(request, (), {"url": "http://api.example/x"}, settings=s, clock=FakeClock())


def test_a_fast_taken_bulk_callout_runs_from_the_fetch_list_and_its_success_acks_it_there(redis_client, settings,
                                                                                          monkeypatch):
    from onelane.core.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX

    # Given a bulk message the fast take delivered, waiting in this worker's fetch list
    run = fast_taken(redis_client, settings, monkeypatch, "t-fast")
    # When its run reads, calls and succeeds
    check = run.preflight()
    # Then nothing was claimed: the message stays in the fetch list (which says whose it is) while it
    # runs, with no unacked copy and no receiver record to write and take away again
    assert redis_client.llen(KEYS.fetch_list("bulk", "w-live")) == 1
    assert not redis_client.exists(KOMBU_UNACKED, KOMBU_UNACKED_INDEX, KEYS.reserved("bulk"))
    with run.permit(check) as attempt:
        assert Inflight(redis_client, KEYS).get("t-fast").owner == "w-live"
        run.record_success(attempt, Reply(response=ok_response(), started=1.0, elapsed_ms=5.0),
                           Verdict("succeeded", api_up=True))
    # and its success's transaction took it off the fetch list with the outcome: acknowledged
    assert json.loads(redis_client.get(KEYS.done("t-fast")))["status"] == "success"
    assert redis_client.llen(KEYS.fetch_list("bulk", "w-live")) == 0
    assert not redis_client.exists(KOMBU_UNACKED, KOMBU_UNACKED_INDEX, KEYS.reserved("bulk"))
    # and a copy delivered again (its recorded outcome answers it) is acknowledged from there too
    again = fast_taken(redis_client, settings, monkeypatch, "t-fast")
    prior = again.preflight().prior
    assert again.recorded(prior)["status_code"] == 200
    assert redis_client.llen(KEYS.fetch_list("bulk", "w-live")) == 0


def test_a_fast_taken_bulk_callout_given_back_or_deferred_is_claimed_first(redis_client, settings, monkeypatch):
    import onelane.callout.run as run_module

    # Given two bulk messages the fast take delivered, the bulk queue paused, relaxed order
    monkeypatch.setattr(run_module, "PAUSE_WAIT_S", 0.05)
    paused = fast_taken(redis_client, settings, monkeypatch, "t-paused", ONELANE_ORDERING="relaxed")
    flow.pause(redis_client, KEYS, "bulk")
    # When the first finds the queue still paused (it gives its message back at the head)
    with pytest.raises(Ignore):
        paused.wait_until_open(paused.preflight())
    flow.resume(redis_client, KEYS, "bulk")
    # and the second's attempt fails with a retry due later (relaxed: it moves to the delay set)
    later = fast_taken(redis_client, settings, monkeypatch, "t-later", ONELANE_ORDERING="relaxed")
    with later.permit(later.preflight()) as attempt:
        pass
    with pytest.raises(Ignore):
        later.wait_before_retry(attempt, Verdict(RETRY, "503 down", wait_s=30))
    # Then each was claimed out of the fetch list first, and moved from its unacked copy: one back at
    # the head of the queue, one in the delay set, neither left behind anywhere
    assert redis_client.llen(KEYS.fetch_list("bulk", "w-live")) == 0
    assert [json.loads(m)["headers"]["id"] for m in flow.waiting(redis_client, KEYS, "bulk")] == ["t-paused"]
    assert redis_client.zcard(KEYS.delayed("bulk")) == 1
    assert not redis_client.hlen("unacked") and not redis_client.zcard("unacked_index")


def test_a_fast_taken_bulk_callout_given_back_meanwhile_is_left_alone_by_its_run(redis_client, settings,
                                                                                 monkeypatch):
    import onelane.callout.run as run_module

    # Given a bulk message the fast take delivered, its run waiting on a paused queue, and the message
    # given back to the queue meanwhile (its worker counted as gone: the reaper moved it)
    monkeypatch.setattr(run_module, "PAUSE_WAIT_S", 0.05)
    run = fast_taken(redis_client, settings, monkeypatch, "t-taken")
    flow.pause(redis_client, KEYS, "bulk")
    check = run.preflight()
    redis_client.lmove(KEYS.fetch_list("bulk", "w-live"), "bulk", "RIGHT", "RIGHT")
    # When the run gives its message back (still paused)
    with pytest.raises(Ignore):
        run.wait_until_open(check)
    # Then it claimed nothing and moved nothing: the message exists once, where the reaper put it
    assert [json.loads(m)["headers"]["id"] for m in flow.waiting(redis_client, KEYS, "bulk")] == ["t-taken"]
    assert not redis_client.exists("unacked", "unacked_index", KEYS.reserved("bulk"))


def test_a_strict_retry_sleeps_the_verdicts_wait_on_the_runs_clock(redis_client, settings):
    clock = FakeClock()
    run = begin(settings, clock)
    with run.permit(run.preflight()) as attempt:
        pass
    run.wait_before_retry(attempt, Verdict(RETRY, "503 down", wait_s=2.5))
    assert clock.slept == [2.5]


def test_a_relaxed_retry_of_an_eager_call_cannot_defer_so_it_sleeps(redis_client, redis_server):
    s = load_settings({"REDIS_URL": redis_server.url, "ONELANE_ORDERING": "relaxed"})
    clock = FakeClock()
    run = begin(s, clock)
    with run.permit(run.preflight()) as attempt:
        pass
    run.wait_before_retry(attempt, Verdict(RETRY, "503 down", wait_s=0.75))
    assert clock.slept == [0.75]


def test_a_failed_attempt_is_kept_and_the_circuit_counts_it(redis_client, settings):
    run = begin(settings)
    with run.permit(run.preflight()) as attempt:
        pass
    run.record_attempt(attempt, Reply(error="connection error: refused", started=1.0),
                       Verdict(RETRY, "connection error: refused", wait_s=1.0, api_up=False))
    assert [a["error"] for a in Ledger(redis_client, KEYS, window_s=60).attempts("t1")] == [
        "connection error: refused"]
    assert int(redis_client.hget(KEYS.circuit("serial"), "failures")) == 1
    assert run.preflight().attempt == 2


def test_dead_letter_keeps_the_request_and_every_attempt_and_returns_the_error(redis_client, settings):
    run = begin(settings, headers={"Authorization": "Bearer secret"})
    Ledger(redis_client, KEYS, window_s=60).add_attempt("t1", {"attempt": 1, "status_code": 500})
    error = run.dead_letter("failed after 1 attempts; last: 500")
    assert isinstance(error, CalloutFailed)
    assert str(error) == "POST http://api.example/x: failed after 1 attempts; last: 500; dead-lettered as t1"
    entry = json.loads(redis_client.hget(KEYS.dead_letters("serial"), "t1"))
    assert entry["request"]["headers"] == {"Authorization": "***"}
    assert entry["attempts"] == [{"attempt": 1, "status_code": 500}] and entry["kind"] == "failed"


@pytest.fixture
def redis_clock(monkeypatch, redis_client):
    """Whether this process knows the Redis clock yet: ``"known"`` (its preflights grant a serial lease
    in plain commands) or ``"unknown"`` (its first preflight: the acquire script, which reads it)."""
    def set_(state: str) -> None:
        monkeypatch.setattr(clock, "_offset_ms", None)
        if state == "known":
            clock.note_redis_now(clock.redis_now_ms(redis_client))
    return set_


@pytest.mark.parametrize("known", ["known", "unknown"])
def test_preflight_takes_the_serial_lease_ahead_with_the_attempt_in_flight(redis_client, settings, redis_clock,
                                                                             known):
    # Given a lane whose lease was granted before (its fencing counter exists)
    lease = Lease(redis_client, KEYS.resource_lease("serial"), keys=KEYS)
    lease.release(lease.acquire(new_token(), ttl_ms=1_000).token)
    redis_clock(known)
    redis_client.config_resetstat()
    run = begin(settings)
    check = run.preflight()
    # Then the lease was won in the same round trip, and the attempt is recorded on the Redis clock
    assert check.grant is not None and lease.holder().token == check.grant.token == check.token
    assert lease.holder().label == "task t1" and check.grant.fence == lease.fence()
    rec = Inflight(redis_client, KEYS).get("t1")
    assert rec.lease_token == check.token and rec.attempt == 1
    assert rec.deadline_ms - rec.started_ms == run.timeout_ms + 100
    assert abs(rec.started_ms - check.redis_ms) < 1_000
    # (once the process knows the Redis clock, with no script at all)
    scripts = redis_client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert scripts == (0 if known == "known" else 1)
    # ... and the permit uses it without asking again
    with run.permit(check) as attempt:
        assert attempt.grant == check.grant
    assert lease.holder() is None


def test_a_new_resources_first_lease_is_counted_by_the_script_from_the_redis_clock(redis_client, settings,
                                                                                    redis_clock):
    # Given a process that knows the Redis clock, and a resource never granted (no fencing counter)
    redis_clock("known")
    run = begin(settings, resource="brand-new")
    check = run.preflight()
    lease = Lease(redis_client, KEYS.resource_lease("brand-new"), keys=KEYS)
    # Then the quick try took the lease but could not count it: not a grant yet
    assert check.grant is None and lease.holder().token == check.token
    # When the permit is asked for, the script grants it to the same token, its fence from the Redis clock
    with run.permit(check) as attempt:
        assert attempt.grant.token == check.token
        assert attempt.grant.fence == lease.fence() > check.redis_ms * 1000 - 10**9
    assert lease.holder() is None


def test_a_preflight_corrects_the_attempt_number_it_wrote_before_reading_the_count(redis_client, settings,
                                                                                   redis_clock):
    # Given a callout delivered again after two failed attempts (a worker that made them was killed)
    redis_clock("known")
    ledger = Ledger(redis_client, KEYS, window_s=60)
    for n in (1, 2):
        ledger.add_attempt("t1", {"attempt": n, "status_code": 500})
    # When its run's first preflight writes the in-flight record with the lease, in one round trip
    check = begin(settings).preflight()
    # Then the attempt is the third, in the check and in the record
    assert check.attempt == 3 and Inflight(redis_client, KEYS).get("t1").attempt == 3


@pytest.mark.parametrize("known", ["known", "unknown"])
@pytest.mark.parametrize("counted", [True, False])
@pytest.mark.parametrize("why", ["paused", "done", "circuit"])
def test_preflight_gives_back_what_it_took_ahead_when_the_attempt_cannot_start(redis_client, settings, redis_clock,
                                                                               why, counted, known):
    # (with a fencing counter or a new one: a quick try then holds the lease without a grant)
    redis_clock(known)
    if counted:
        lease = Lease(redis_client, KEYS.resource_lease("serial"), keys=KEYS)
        lease.release(lease.acquire(new_token(), ttl_ms=1_000).token)
    if why == "paused":
        flow.pause(redis_client, KEYS, "serial")
    elif why == "done":
        Ledger(redis_client, KEYS, window_s=60).record_success(task_id="t1", queue="serial", idempotency_key="t1",
                                                              result={"ok": 1}, now_ms=1)
    else:
        Circuit(redis_client, KEYS, "serial", threshold=1, cooldown_ms=5_000, cooldown_max_ms=5_000).record(ok=False)
    run = begin(settings)
    check = run.preflight()
    assert check.grant is None
    assert Lease(redis_client, KEYS.resource_lease("serial"), keys=KEYS).holder() is None
    assert Inflight(redis_client, KEYS).get("t1") is None
    assert redis_client.zcard(KEYS.inflight_index("serial")) == 0
