"""classify(): what each reply means — the one place that answers "what happens on a 429?" (pure logic)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from onelane.callout.classify import FAILED, RETRY, SUCCEEDED, Reply, RetryPolicy, classify, overloaded
from onelane.callout.result import attempt_entry
from onelane.core.settings import load_settings

pytestmark = pytest.mark.unit

POLICY = RetryPolicy(max_attempts=5, backoff_base_s=1.0, backoff_max_s=60.0, retry_after_max_s=300.0)


@dataclass
class FakeResponse:
    status_code: int
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    encoding: str = "utf-8"


def answer(status: int, body: bytes = b"", **headers) -> Reply:
    return Reply(response=FakeResponse(status, {k.replace("_", "-"): v for k, v in headers.items()}, body))


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304])
def test_a_status_below_400_that_is_not_retried_is_a_success(status):
    verdict = classify(answer(status), attempt=1, policy=POLICY)
    assert verdict.kind == SUCCEEDED and verdict.succeeded and not verdict.final
    assert verdict.api_up is True


def test_a_429_with_retry_after_waits_what_the_server_asked():
    verdict = classify(answer(429, b"slow down", Retry_After="7"), attempt=1, policy=POLICY)
    assert verdict.kind == RETRY and not verdict.final
    assert verdict.wait_s == 7.0 and verdict.retry_after_s == 7.0
    assert verdict.api_up is False
    assert verdict.reason == "429 slow down"


def test_retry_after_is_capped_by_the_policy():
    policy = RetryPolicy(retry_after_max_s=30.0)
    verdict = classify(answer(503, Retry_After="3600"), attempt=2, policy=policy)
    assert verdict.kind == RETRY and verdict.wait_s == 30.0 and verdict.retry_after_s == 3600.0


def test_a_retry_after_as_an_http_date_counts_from_now():
    verdict = classify(answer(429, Retry_After="Wed, 21 Oct 2015 07:28:30 GMT"), attempt=1, policy=POLICY,
                       now=1445412500.0)  # 10 s before that date
    assert verdict.wait_s == pytest.approx(10.0)


@pytest.mark.parametrize("attempt, ceiling", [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)])
def test_a_retryable_status_without_retry_after_backs_off_with_full_jitter(attempt, ceiling):
    rng = random.Random(42)
    waits = [classify(answer(500), attempt=attempt, policy=POLICY, rng=rng).wait_s for _ in range(300)]
    assert all(0.0 <= w <= ceiling for w in waits)
    assert max(waits) > 0.9 * ceiling and min(waits) < 0.1 * ceiling


def test_the_last_retryable_failure_is_final_with_no_wait():
    verdict = classify(answer(503, b"down"), attempt=5, policy=POLICY)
    assert verdict.kind == FAILED and verdict.final
    assert verdict.reason == "failed after 5 attempts; last: 503 down"
    assert verdict.api_up is False  # the circuit counts it


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_other_4xx_fail_at_once_and_say_the_api_is_up(status):
    verdict = classify(answer(status, b'{"error": "bad"}'), attempt=1, policy=POLICY)
    assert verdict.kind == FAILED and "(not retryable)" in verdict.reason and str(status) in verdict.reason
    assert verdict.api_up is True  # the API answered: it must not open the circuit


def test_a_connection_error_or_timeout_is_retried():
    for error in ("connection error: refused", "timeout: no complete response within the 3 s deadline"):
        verdict = classify(Reply(error=error), attempt=1, policy=POLICY, rng=random.Random(1))
        assert verdict.kind == RETRY and verdict.reason == error and verdict.api_up is False


def test_a_permanent_error_fails_at_once_and_tells_the_circuit_nothing():
    verdict = classify(Reply(error="the host name does not resolve: x", permanent=True), attempt=1, policy=POLICY)
    assert verdict.kind == FAILED and verdict.api_up is None
    assert verdict.reason == "the host name does not resolve: x (not retryable)"


def test_a_calls_own_retry_on_replaces_the_retried_statuses():
    settings = load_settings({})
    policy = RetryPolicy.of(settings, retry_on=[503])
    assert classify(answer(503), attempt=1, policy=policy, rng=random.Random(0)).kind == RETRY
    assert classify(answer(500), attempt=1, policy=policy).kind == FAILED
    # and a status below 400 the call asked to retry is retried, not a success
    assert classify(answer(202), attempt=1, policy=RetryPolicy.of(settings, retry_on=[202]),
                    rng=random.Random(0)).kind == RETRY


def test_the_policy_comes_from_the_settings():
    s = load_settings({"ONELANE_MAX_ATTEMPTS": "3", "ONELANE_BACKOFF_BASE": "0.5", "ONELANE_BACKOFF_MAX": "2",
                       "ONELANE_RETRY_AFTER_MAX": "9", "ONELANE_RETRY_STATUSES": "429,503"})
    assert RetryPolicy.of(s) == RetryPolicy(frozenset({429, 503}), 3, 0.5, 2.0, 9.0)


def test_the_attempt_entry_has_a_retry_time_only_when_a_retry_follows():
    retry = classify(answer(429, Retry_After="2"), attempt=1, policy=POLICY)
    last = classify(answer(429, Retry_After="2"), attempt=5, policy=POLICY)
    entry = attempt_entry(answer(429, Retry_After="2"), retry, attempt=1, fence=3)
    assert entry["retry_in_s"] == 2.0 and entry["retry_after_s"] == 2.0 and entry["fencing_token"] == 3
    # the dead-lettered last attempt shows no retry that never happened
    assert "retry_in_s" not in attempt_entry(answer(429, Retry_After="2"), last, attempt=5, fence=4)


def test_overload_is_a_429_a_503_or_a_timeout():
    assert overloaded(answer(429)) and overloaded(answer(503))
    assert overloaded(Reply(error="timeout: too slow"))
    assert not overloaded(answer(500)) and not overloaded(Reply(error="connection error: refused"))
