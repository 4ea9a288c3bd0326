"""Recent outcomes counted in 10-second steps (onelane.core.recent): the counts status shows, bounded."""
from __future__ import annotations

import pytest

from onelane.callout.ledger import Ledger
from onelane.core import recent
from onelane.core.clock import redis_now_ms
from onelane.core.keys import Keys
from onelane.core.settings import load_settings
from onelane.delivery.reaper import reap
from onelane.ops.status import lane_line, snapshot

KEYS = Keys()
STEP = recent.STEP_MS
NOW = 1_796_612_086_825  # ms, in the middle of a step
MINUTE, HOUR = 60_000, 3_600_000


def fields(**by_age_ms) -> dict:
    """A hash reply: "success_<age>" / "failure_<age>" = count, for outcomes <age> ms before NOW."""
    out = {}
    for name, n in by_age_ms.items():
        outcome, age = name.split("_")
        key = f"{outcome}:{(NOW - int(age)) // STEP}".encode()
        out[key] = str(int(out.get(key, 0)) + n).encode()
    return out


@pytest.mark.unit
def test_a_window_counts_every_step_it_overlaps_and_nothing_older():
    f = fields(success_0=3, success_59000=2, failure_30000=1, success_75000=4, failure_3500000=5,
               success_3700000=7)
    assert recent.totals(f, now_ms=NOW, window_ms=MINUTE) == {"success": 5, "failure": 1}
    assert recent.totals(f, now_ms=NOW, window_ms=HOUR) == {"success": 9, "failure": 6}


@pytest.mark.unit
def test_the_step_the_window_starts_in_counts_whole_so_a_minute_is_never_undercounted():
    # an outcome 65 s ago shares its step with the window's start (NOW - 60 s): counted
    start_step = (NOW - MINUTE) // STEP
    at_start = {f"success:{start_step}".encode(): b"1", f"success:{start_step - 1}".encode(): b"8"}
    assert recent.totals(at_start, now_ms=NOW, window_ms=MINUTE) == {"success": 1, "failure": 0}


@pytest.mark.unit
def test_fields_of_another_form_are_skipped_and_dropped_as_stale():
    f = {b"success": b"9", b"success:abc": b"2", b"other:" + str(NOW // STEP).encode(): b"4",
         f"success:{NOW // STEP}".encode(): b"1", f"failure:{(NOW - HOUR) // STEP - 1}".encode(): b"3"}
    assert recent.totals(f, now_ms=NOW, window_ms=HOUR) == {"success": 1, "failure": 0}
    assert sorted(recent.stale(f, now_ms=NOW)) == sorted(
        ["success", "success:abc", f"failure:{(NOW - HOUR) // STEP - 1}"])


@pytest.mark.redis
def test_status_counts_recorded_outcomes_and_the_reaper_keeps_the_hash_to_an_hour(redis_client):
    ledger = Ledger(redis_client, KEYS, window_s=600)
    now = redis_now_ms(redis_client)
    for i in range(3):
        ledger.record_success(task_id=f"ok-{i}", queue="serial", idempotency_key=f"ok-{i}", result={}, now_ms=now)
    ledger.record_failure(task_id="bad-0", queue="serial", error="boom", dead_letter={"id": "bad-0"}, now_ms=now)
    ledger.record_success(task_id="old-0", queue="serial", idempotency_key="old-0", result={}, now_ms=now - 2 * HOUR)
    # an older onelane's sorted set of recent outcomes: the reaper deletes it
    redis_client.zadd(KEYS.legacy_stats("serial", "success"), {"x": now})
    settings = load_settings({})

    snap = snapshot(redis_client, KEYS, "serial", settings)
    assert snap.completed == {"last_minute": 3, "last_hour": 3}
    assert snap.failed == {"last_minute": 1, "last_hour": 1}
    assert lane_line(redis_client, KEYS, "serial", settings, now)["completed_last_minute"] == 3

    reap(redis_client, KEYS, lanes=["serial"], bulk_queues=[], margin_ms=1000)
    left = {k.decode() for k in redis_client.hkeys(KEYS.stats("serial"))}
    assert left == {f"success:{now // STEP}", f"failure:{now // STEP}"}, "the step two hours old is dropped"
    assert not redis_client.exists(KEYS.legacy_stats("serial", "success"))
    assert snapshot(redis_client, KEYS, "serial", settings).completed == {"last_minute": 3, "last_hour": 3}
