"""Pure logic of onelane/callout/classify.py: full-jitter backoff, Retry-After, retryable statuses."""
from __future__ import annotations

import random
from datetime import datetime, timezone
from email.utils import format_datetime

import pytest

from onelane.callout.classify import RETRYABLE_STATUSES, backoff_s, is_retryable_status, retry_after_s
from onelane.core.settings import Settings

pytestmark = pytest.mark.unit

NOW = 1_700_000_000.0  # a whole second, so HTTP dates (1 s resolution) compare exactly


# -- full jitter ---------------------------------------------------------------------------

@pytest.mark.parametrize("attempt, ceiling", [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (5, 1.0), (30, 1.0)])
def test_backoff_is_full_jitter_under_the_capped_exponential_ceiling(attempt, ceiling):
    # Given a seeded generator, base 0.2 s and a cap of 1 s
    rng = random.Random(1234)
    # When many delays are drawn after failed attempt ``attempt``
    draws = [backoff_s(attempt, base_s=0.2, max_s=1.0, rng=rng) for _ in range(2000)]
    # Then every delay lies in [0, min(cap, base * 2**(attempt-1))] ...
    assert all(0.0 <= d <= ceiling for d in draws), (min(draws), max(draws))
    # ... and they spread over the whole range (full jitter, not "equal jitter" or a fixed delay)
    assert min(draws) < 0.05 * ceiling
    assert max(draws) > 0.95 * ceiling
    mean = sum(draws) / len(draws)
    assert 0.4 * ceiling < mean < 0.6 * ceiling


def test_backoff_is_reproducible_with_a_seeded_generator():
    a = [backoff_s(n, base_s=1.0, max_s=60.0, rng=random.Random(7)) for n in range(1, 10)]
    b = [backoff_s(n, base_s=1.0, max_s=60.0, rng=random.Random(7)) for n in range(1, 10)]
    assert a == b
    assert len(set(a)) > 1


def test_backoff_of_attempt_zero_or_below_uses_the_base_as_ceiling():
    rng = random.Random(3)
    for attempt in (0, -1, -10):
        draws = [backoff_s(attempt, base_s=0.5, max_s=60.0, rng=rng) for _ in range(500)]
        assert all(0.0 <= d <= 0.5 for d in draws)
        assert max(draws) > 0.45


def test_backoff_with_a_zero_base_or_zero_cap_never_waits():
    rng = random.Random(5)
    assert {backoff_s(n, base_s=0.0, max_s=60.0, rng=rng) for n in range(1, 20)} == {0.0}
    assert {backoff_s(n, base_s=1.0, max_s=0.0, rng=rng) for n in range(1, 20)} == {0.0}


def test_backoff_of_a_huge_attempt_number_stays_at_the_cap():
    rng = random.Random(11)
    draws = [backoff_s(500, base_s=1.0, max_s=60.0, rng=rng) for _ in range(200)]
    assert all(0.0 <= d <= 60.0 for d in draws)


# -- Retry-After -----------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [("0", 0.0), ("2", 2.0), ("120", 120.0), (" 7 ", 7.0)])
def test_retry_after_delta_seconds(value, expected):
    got = retry_after_s(value, now=NOW)
    assert got == expected and isinstance(got, float)


def test_retry_after_http_date_in_the_future_gives_the_seconds_until_then():
    when = datetime.fromtimestamp(NOW + 30, tz=timezone.utc)
    header = format_datetime(when, usegmt=True)  # e.g. "Tue, 14 Nov 2023 22:13:50 GMT"
    assert header.endswith("GMT")
    assert retry_after_s(header, now=NOW) == pytest.approx(30.0)


def test_retry_after_rfc_example_date():
    # RFC 9110's example, seen from 30 s before it
    example = "Wed, 21 Oct 2015 07:28:00 GMT"
    at = datetime(2015, 10, 21, 7, 28, 0, tzinfo=timezone.utc).timestamp()
    assert retry_after_s(example, now=at - 30) == pytest.approx(30.0)


def test_retry_after_http_date_in_the_past_means_no_wait():
    when = datetime.fromtimestamp(NOW - 3600, tz=timezone.utc)
    assert retry_after_s(format_datetime(when, usegmt=True), now=NOW) == 0.0


def test_retry_after_uses_the_wall_clock_when_now_is_not_given():
    import time

    when = datetime.fromtimestamp(int(time.time()) + 100, tz=timezone.utc)
    got = retry_after_s(format_datetime(when, usegmt=True))
    assert 90.0 <= got <= 100.0


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "-5", "1.5", "3 s", "Wed, 99 Foo 2015",
                                   "Mon, 32 Oct 2015 07:28:00 GMT", "later, please"])
def test_retry_after_garbage_is_none(value):
    assert retry_after_s(value, now=NOW) is None


def test_retry_after_non_ascii_digit_is_garbage_not_a_crash():
    assert retry_after_s("\xb2", now=NOW) is None


# -- retryable statuses ----------------------------------------------------------------------

@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retryable(status):
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304, 400, 401, 403, 404, 409, 410, 422, 501, 505])
def test_other_statuses_are_not_retryable(status):
    assert not is_retryable_status(status)


def test_retryable_set_is_exactly_the_documented_one_and_matches_the_settings_default():
    assert RETRYABLE_STATUSES == frozenset({408, 425, 429, 500, 502, 503, 504})
    assert Settings().retry_statuses == RETRYABLE_STATUSES


def test_a_custom_retryable_set_replaces_the_default():
    custom = frozenset({409})
    assert is_retryable_status(409, custom)
    assert not is_retryable_status(503, custom)
