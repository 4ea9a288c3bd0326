"""Coalescing with real workers, beat and a fragile API: one call per record, with its newest data.

A callout with ``coalesce_key`` K replaces the arguments of a waiting callout with key K; a
started one is never changed, and two with one key never run at once. Every replaced task id
ends with its carrier's outcome, naming it.
"""
from __future__ import annotations

import json
import random
import threading
import time

import pytest
from celery.result import AsyncResult

from demo.fragile_api import Reply
from onelane.core.keys import Keys
from onelane.delivery import flow
from tests import procs
from tests.procs import wait_for

pytestmark = pytest.mark.e2e

KEYS = Keys()


def record_calls(api, prefix: str = "/sync/") -> list[dict]:
    """The API's calls to ``prefix...``, in the order they started, with the data each carried."""
    out = []
    for c in sorted(api.snapshot(), key=lambda c: c.start):
        if c.path.startswith(prefix):
            out.append({**c.json(), "key": c.key, "start": c.start, "end": c.end, "status": c.status})
    return out


def overlapping_per_record(calls: list[dict]) -> list[tuple]:
    by_record: dict[str, list[dict]] = {}
    for c in calls:
        by_record.setdefault(c["record"], []).append(c)
    bad = []
    for record, cs in by_record.items():
        cs.sort(key=lambda c: c["start"])
        for a, b in zip(cs, cs[1:]):
            if a["end"] is None or b["start"] < a["end"]:
                bad.append((record, a["version"], b["version"]))
    return bad


def status_json(env) -> dict:
    out = procs.subprocess.run([str(procs.VENV_BIN / "onelane"), "status", "--json"], env=env, capture_output=True,
                               text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_updates_while_the_lane_is_busy_become_one_call_per_record_with_its_newest_data(
        base_env, redis_client, api, start, celery_app):
    import tasks

    start(procs.worker(base_env))
    # Given a 3 s callout holding the lane
    hold = celery_app.send_task("tasks.callout", queue="serial",
                                kwargs={"url": f"{api.url}/hold?delay=3", "idempotency_key": "hold"})
    wait_for(lambda: api.in_flight == 1, 30, what="the 3 s callout to hold the lane")
    # When 10 records change 8 times each (submit) and 5 records 4 times each (plain send_task),
    # round by round, all keyed by record
    versions: dict[str, list[str]] = {}  # record -> its task ids, oldest first
    for version in range(8):
        for r in range(10):
            record = f"order-{r}"
            sent = tasks.submit(f"{api.url}/sync/{record}", json={"record": record, "version": version},
                                coalesce_key=record)
            versions.setdefault(record, []).append(sent.id)
        if version < 4:
            for r in range(5):
                record = f"invoice-{r}"
                sent = celery_app.send_task("tasks.callout", queue="serial", kwargs={
                    "url": f"{api.url}/sync/{record}", "json": {"record": record, "version": version},
                    "coalesce_key": record})
                versions.setdefault(record, []).append(sent.id)
    assert api.in_flight == 1, "the updates must all arrive while the lane is held"
    first_arrival = list(versions)  # dicts keep insertion order: the order records first arrived
    assert AsyncResult(hold.id, app=celery_app).get(timeout=30)["status_code"] == 200
    results = {tid: AsyncResult(tid, app=celery_app).get(timeout=60) for ids in versions.values() for tid in ids}
    # Then the API saw one call per record, each with the record's newest data, in first-arrival order
    calls = record_calls(api)
    assert [c["record"] for c in calls] == first_arrival
    newest = {record: len(ids) - 1 for record, ids in versions.items()}
    assert {c["record"]: c["version"] for c in calls} == newest
    # each call went out under its carrier's id (the record's first, oldest task id)
    assert [c["key"] for c in calls] == [versions[r][0] for r in first_arrival]
    assert api.overlaps == 0 and api.max_concurrency == 1
    # every task id ended SUCCESS; the replaced ones name their carrier
    for record, ids in versions.items():
        carrier = ids[0]
        assert results[carrier]["status_code"] == 200 and "coalesced_into" not in results[carrier]
        for tid in ids[1:]:
            assert AsyncResult(tid, app=celery_app).state == "SUCCESS"
            assert results[tid]["coalesced_into"] == carrier and results[tid]["status_code"] == 200
    # and status counts them per lane
    [serial] = [line for line in status_json(base_env)["lanes"] if line["name"] == "serial"]
    carried = sum(len(ids) - 1 for ids in versions.values())
    assert serial["coalesced"] == carried == 85
    print(f"\ncoalescing: {sum(len(ids) for ids in versions.values())} updates of {len(versions)} records "
          f"became {len(calls)} calls ({carried} carried)")


@pytest.mark.parametrize("ordering", ["strict", "relaxed"])
def test_a_keyed_callout_waiting_for_its_retry_keeps_newer_ones_behind_it_coalescing(
        base_env, redis_client, api, start, celery_app, ordering):
    env = {**base_env, "ONELANE_ORDERING": ordering}
    start(procs.worker(env))
    first = celery_app.send_task("tasks.callout", queue="serial", kwargs={
        "url": f"{api.url}/sync/r", "json": {"record": "r", "version": 0}, "coalesce_key": "r"})
    # its first attempt fails with a Retry-After of 3 s
    api.script(first.id, [Reply(status=503, headers={"Retry-After": "3"})])
    wait_for(lambda: len(api.calls_for(first.id)) == 1, 30, what="the first attempt")
    newer = [celery_app.send_task("tasks.callout", queue="serial", kwargs={
        "url": f"{api.url}/sync/r", "json": {"record": "r", "version": v}, "coalesce_key": "r"}) for v in (1, 2, 3)]
    other = celery_app.send_task("tasks.callout", queue="serial", kwargs={
        "url": f"{api.url}/sync/other", "json": {"record": "other", "version": 0}})
    results = [AsyncResult(t.id, app=celery_app).get(timeout=60) for t in [first, *newer, other]]
    calls = record_calls(api)
    r_calls = [(c["version"], c["status"]) for c in calls if c["record"] == "r"]
    # the started one retried with its own data; the three newer ones became one call, after it
    assert r_calls == [(0, 503), (0, 200), (3, 200)]
    assert [c["key"] for c in calls if c["record"] == "r"] == [first.id, first.id, newer[0].id]
    assert results[2]["coalesced_into"] == results[3]["coalesced_into"] == newer[0].id
    assert overlapping_per_record(calls) == [] and api.overlaps == 0
    order = [c["record"] for c in calls if c["status"] == 200]
    if ordering == "strict":  # the queue waits for the retry: the other callout runs last
        assert order == ["r", "r", "other"]
    else:  # the queue moves on while r waits: other runs first; r's newer ones wait behind r
        assert order == ["other", "r", "r"]


def test_on_the_bulk_queue_callouts_with_one_key_never_run_at_once(base_env, redis_client, api, start, celery_app):
    env = {**base_env, "ONELANE_LIMITS": json.dumps({"acme": {"concurrency": 5}})}
    api.capacity, api.delay_s = 5, 0.15
    for i in range(2):
        start(procs.worker(env, f"bulk{i}", queue="bulk", extra=["--pool", "threads", "-c", "5"]))
    # 6 records changed at random moments, mixed with 30 callouts without a key
    rng = random.Random(7)
    sent, newest = [], {}
    for step in range(102):
        if step % 3 == 0 and step // 3 < 30:
            kwargs = {"url": f"{api.url}/sync/plain-{step}", "json": {"record": f"plain-{step}", "version": 0}}
        else:
            record = f"rec-{rng.randrange(6)}"
            newest[record] = step
            kwargs = {"url": f"{api.url}/sync/{record}", "json": {"record": record, "version": step},
                      "coalesce_key": record}
        sent.append(celery_app.send_task("tasks.callout", queue="bulk", kwargs={**kwargs, "resource": "acme"}))
        time.sleep(rng.uniform(0, 0.03))
    results = [AsyncResult(t.id, app=celery_app).get(timeout=120) for t in sent]
    calls = record_calls(api)
    # never two calls for one record at once, and never more than the cap
    assert overlapping_per_record(calls) == []
    assert api.max_concurrency <= 5 and api.overlaps == 0
    # each record's calls carry ever newer data, the last one its newest
    for record, version in newest.items():
        seen = [c["version"] for c in calls if c["record"] == record]
        assert seen == sorted(seen) and seen[-1] == version, (record, seen, version)
    carried = sum(1 for r in results if "coalesced_into" in r)
    assert len(calls) + carried == len(sent)
    print(f"\nbulk, cap 5: {len(sent)} callouts became {len(calls)} calls ({carried} carried), "
          f"max {api.max_concurrency} in flight")


def test_a_worker_killed_while_keyed_callouts_are_taken_and_replaced_loses_nothing_runs_nothing_twice(
        base_env, redis_client, api, start, celery_app):
    # a killed attempt's lease lapses 2 s after it started; a new worker takes the guard within 2 s
    env = {**base_env, "ONELANE_GUARD_TTL": "2", "ONELANE_REAP_INTERVAL": "0.5", "ONELANE_CALLOUT_TIMEOUT": "1"}
    base_env = env
    api.delay_s = 0.02
    start(procs.beat(env))
    published: list[tuple[str, str, int]] = []  # (task id, record, version)
    stop = threading.Event()

    def produce():
        rng = random.Random(11)
        version = 0
        while not stop.is_set():
            record = f"rec-{rng.randrange(15)}"
            t = celery_app.send_task("tasks.callout", queue="serial", kwargs={
                "url": f"{api.url}/sync/{record}", "json": {"record": record, "version": version},
                "coalesce_key": record})
            published.append((t.id, record, version))
            version += 1
            time.sleep(rng.uniform(0, 0.004))

    producer = threading.Thread(target=produce, daemon=True)
    w = start(procs.worker(base_env, "w1"))
    producer.start()
    kills = 0
    try:
        for moment in (0.4, 0.9, 0.6, 1.1):  # several runs, killed at different moments
            time.sleep(moment)
            w.kill9()
            kills += 1
            w = start(procs.worker(base_env, f"w{kills + 1}"))
    finally:
        stop.set()
        producer.join(timeout=10)
    # every version ends: sent, or carried by one that is sent
    results = {}
    for tid, _record, _version in published:
        results[tid] = AsyncResult(tid, app=celery_app).get(timeout=120)
    calls = [c for c in record_calls(api) if c["status"] == 200]
    sent_ids = {c["key"] for c in calls}
    newest = {}
    for tid, record, version in published:
        newest[record] = max(newest.get(record, -1), version)
        carrier = results[tid].get("coalesced_into", tid)
        assert carrier in sent_ids, (tid, carrier)
    # each record's last call carries its newest data, and its calls never go back to older data
    for record, version in newest.items():
        seen = [c["version"] for c in calls if c["record"] == record]
        assert seen == sorted(seen) and seen[-1] == version, (record, seen, version)
    # nothing ran twice: a task id is called again only when a kill cut its attempt
    repeated = sum(n - 1 for n in _counts(c["key"] for c in record_calls(api)).values() if n > 1)
    assert repeated <= kills
    assert overlapping_per_record(record_calls(api)) == [] and api.overlaps == 0
    assert flow.depth(redis_client, KEYS, "serial") == 0
    print(f"\n{kills} kills during {len(published)} keyed callouts: {len(calls)} calls, "
          f"{len(published) - len(sent_ids)} carried, {repeated} repeated after a kill")


def _counts(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def test_a_batch_of_keyed_records_counts_every_record_done(base_env, redis_client, api, start, celery_app):
    from onelane.ops.batches import batch_status, submit_many

    start(procs.worker(base_env))
    celery_app.send_task("tasks.callout", queue="serial", kwargs={"url": f"{api.url}/hold?delay=2"})
    wait_for(lambda: api.in_flight == 1, 30, what="a callout to hold the lane")
    records = [{"url": f"{api.url}/sync/rec-{i % 5}", "json": {"record": f"rec-{i % 5}", "version": i},
                "coalesce_key": f"rec-{i % 5}"} for i in range(30)]
    batch_id = submit_many(records, batch="keyed", lane="serial")
    st = wait_for(lambda: (b := batch_status(redis_client, KEYS, batch_id)) and b.over and b, 60, 0.2,
                  what="the batch to finish")
    assert (st.done, st.failed, st.dead_lettered) == (30, 0, 0)
    calls = record_calls(api)
    assert sorted((c["record"], c["version"]) for c in calls) == [(f"rec-{r}", 25 + r) for r in range(5)]
