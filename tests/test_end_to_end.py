"""End to end: many producer processes, one real worker, the fragile API."""
from __future__ import annotations

import pytest
from celery.result import AsyncResult

from onelane.core.keys import Keys
from tests import procs
from tests.procs import wait_for
from tests.producer_proc import Producers

pytestmark = pytest.mark.e2e

CONTRACT_FIELDS = {"status_code", "headers", "elapsed_ms", "attempts", "fencing_token"}


def test_200_callouts_from_4_producers_run_one_at_a_time_in_order(base_env, redis_client, api, start, celery_app):
    # Given a real worker on the serial queue (the public command) and an API that takes 5-15 ms
    api.delay_s = 0.005
    start(procs.worker(base_env))
    # When 4 producer processes publish 50 callouts each with plain send_task
    with Producers(base_env["REDIS_URL"], api.url, processes=4, count=50, max_gap_s=0.01) as producers:
        published = producers.published(timeout_s=60)
    results = {tid: AsyncResult(tid, app=celery_app).get(timeout=120)
               for ids in published.values() for tid in ids}

    # Then all complete, one at a time
    calls = api.snapshot()
    assert len(results) == 200
    assert len(calls) == 200
    assert api.overlaps == 0
    assert api.max_concurrency == 1
    # each producer's callouts reach the API in the order it published them
    for producer in range(4):
        order = [c.json()["n"] for c in calls if c.json()["producer"] == producer]
        assert order == list(range(50)), f"producer {producer} out of order: {order}"
    # every Idempotency-Key is unique, and the fencing token grows with every call
    keys = [c.key for c in calls]
    assert len(set(keys)) == 200
    fences = [c.fence for c in calls]
    assert all(a < b for a, b in zip(fences, fences[1:])), fences
    # results hold the contract's fields
    for tid, res in results.items():
        assert CONTRACT_FIELDS <= set(res), res
        assert ("json" in res) or ("body" in res)
        assert res["status_code"] == 200 and res["attempts"] == 1
    assert sorted(r["fencing_token"] for r in results.values()) == sorted(fences)
    # the worker fetched through its own fetch list (onelane/delivery/transport.py), now empty, and
    # every message it recorded as unacked was acknowledged
    [(fetch_list, owner)] = redis_client.hgetall("onelane:fetching").items()
    assert fetch_list.startswith(b"onelane:fetching:serial:") and b'"queue": "serial"' in owner
    assert redis_client.llen(fetch_list) == 0
    # (the last message is acked just after its result is stored, hence the short wait)
    wait_for(lambda: redis_client.hlen("unacked") == 0, 5, what="every message acknowledged")


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_a_callout_is_acknowledged_with_its_outcome_and_the_workers_ack_adds_no_round_trip(
        pool, base_env, redis_client, api, start, celery_app):
    # Given a real worker with each pool, warmed up with one callout
    extra = [] if pool == "prefork" else ["--pool", pool] + (["-c", "1"] if pool == "threads" else [])
    start(procs.worker(base_env, extra=extra))
    first = celery_app.send_task("tasks.callout", kwargs={"url": f"{api.url}/warm"}, queue="serial")
    first.get(timeout=60)
    wait_for(lambda: redis_client.hlen("unacked") == 0, 5, what="the warm-up acknowledged")
    redis_client.config_resetstat()
    # When 20 callouts run
    results = [celery_app.send_task("tasks.callout", kwargs={"url": f"{api.url}/a", "json": {"i": i}},
                                    queue="serial") for i in range(20)]
    assert [r.get(timeout=60)["status_code"] for r in results] == [200] * 20
    # Then every message is acknowledged, each in the one transaction that recorded its outcome:
    # kombu's own ack (MULTI, ZREM, HDEL, EXEC) never reached Redis, so one EXEC per callout, and
    # one removal each: of kombu's unacked copy (HDEL: a message the take script took) or, for one
    # the fast take delivered, which ran from the worker's fetch list, of its copy there (LREM)
    wait_for(lambda: redis_client.hlen("unacked") == 0 and not redis_client.zcard("unacked_index"), 5,
             what="every message acknowledged")
    assert not any(redis_client.llen(f) for f in redis_client.hkeys(Keys().fetch_lists))
    stats = redis_client.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
    assert calls["exec"] == 20, calls
    assert calls.get("hdel", 0) + calls.get("lrem", 0) == 20 and calls.get("lrem", 0) > 0, calls
    assert len(api.snapshot()) == 21 and api.overlaps == 0


def test_a_failed_delivery_of_an_id_that_succeeded_before_is_acknowledged_the_usual_way(
        base_env, redis_client, api, start, celery_app):
    # Given a worker on which task id "again" succeeded (Celery remembers such ids for hours)
    start(procs.worker(base_env))
    first = celery_app.send_task("tasks.callout", task_id="again", kwargs={"url": f"{api.url}/a"}, queue="serial")
    assert first.get(timeout=60)["status_code"] == 200
    wait_for(lambda: redis_client.hlen("unacked") == 0, 5, what="the first delivery acknowledged")
    # When, its outcome forgotten, the same id comes again with bad input (rejected: no outcome transaction)
    redis_client.delete("onelane:done:again")
    celery_app.send_task("tasks.callout", task_id="again", kwargs={"url": "ftp://nowhere"}, queue="serial")
    wait_for(lambda: redis_client.hexists("onelane:dlq:serial", "again"), 30, what="the rejection dead-lettered")
    # Then its ack still removes kombu's unacked copy: nothing is left to come back later
    wait_for(lambda: redis_client.hlen("unacked") == 0 and not redis_client.zcard("unacked_index"), 5,
             what="the rejected delivery acknowledged")
    assert len(api.snapshot()) == 1


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_fast_takes_claim_every_message_and_leave_nothing_behind(pool, base_env, redis_client, api, start, celery_app):
    # Given 30 callouts queued before the worker starts (the take script moves them to the ready list,
    # and the takes after it are plain LMOVEs), one of them with bad input and one with a coalesce key
    api.delay_s = 0.02
    sent = []
    for i in range(30):
        kwargs = {"url": f"{api.url}/f", "json": {"i": i}}
        if i == 10:
            kwargs["url"] = "ftp://nowhere"  # rejected before its first Redis step: never claimed
        if i == 20:
            kwargs.update(coalesce_key="rec", json={"i": i, "version": 1})
        sent.append(celery_app.send_task("tasks.callout", kwargs=kwargs, queue="serial"))
    extra = [] if pool == "prefork" else ["--pool", pool]
    redis_client.config_resetstat()
    start(procs.worker(base_env, extra=extra))
    # When a newer version of the keyed record arrives while its first waits in the ready list
    wait_for(lambda: len(api.snapshot()) >= 2, 60, what="the lane to run")
    newer = celery_app.send_task("tasks.callout", queue="serial", kwargs={
        "url": f"{api.url}/f", "json": {"i": 20, "version": 2}, "coalesce_key": "rec"})
    for i, r in enumerate(sent):
        if i != 10:
            assert r.get(timeout=120)["status_code"] == 200
    assert newer.get(timeout=60)["coalesced_into"] == sent[20].id

    # Then every callout but the rejected one reached the API once, in order, the keyed one with its newest data
    calls = api.snapshot()
    assert [c.json()["i"] for c in calls] == [i for i in range(30) if i != 10]
    assert [c.json().get("version") for c in calls if c.json()["i"] == 20] == [2]
    assert api.overlaps == 0
    wait_for(lambda: redis_client.hexists("onelane:dlq:serial", sent[10].id), 30, what="the rejection dead-lettered")
    # most takes were one plain LMOVE each (the keyed callout went back to the script)
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_lmove"]["calls"] >= 25, stats.get("cmdstat_lmove")
    # and nothing is left behind: not in the fetch list (the rejected one was taken off it by its ack),
    # not unacked, nothing waiting
    [(fetch_list, _owner)] = redis_client.hgetall("onelane:fetching").items()
    wait_for(lambda: redis_client.llen(fetch_list) == 0 and redis_client.hlen("unacked") == 0
             and not redis_client.zcard("unacked_index"), 5, what="every message acknowledged")
    assert redis_client.llen("serial") == 0 and redis_client.llen("onelane:ready:serial") == 0
