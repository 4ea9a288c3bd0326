"""The reaper's rules for a many-consumer queue, on a real Redis holding kombu's own layout.

The end-to-end kill tests (test_capacity, test_faults) show these rules at work with real
workers; here each rule is pinned down on its own, including the narrow case a real kill
only hits now and then: a worker that died after kombu marked a message unacked but
before the worker recorded that it had received it.
"""
from __future__ import annotations

import json
import time

import pytest

from onelane.core.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, Keys
from onelane.delivery.reaper import reap

KEYS = Keys()
MARGIN_MS = 2000


@pytest.fixture
def deliver(redis_client, celery_app):
    """Publish a callout to ``bulk`` and take it off the queue as kombu's Redis transport does
    when a worker fetches it: the message leaves the list and lands in the unacked hash and
    index (scored with the delivery time, in seconds)."""
    def _deliver(key: str, delivered_s_ago: float) -> tuple[str, str]:
        celery_app.send_task("tasks.callout", kwargs={"url": "http://api.example/x", "idempotency_key": key},
                             queue="bulk")
        raw = redis_client.rpop("bulk")
        message = json.loads(raw)
        tag = message["properties"]["delivery_tag"]
        redis_client.zadd(KOMBU_UNACKED_INDEX, {tag: time.time() - delivered_s_ago})
        redis_client.hset(KOMBU_UNACKED, tag, json.dumps([message, "", "bulk"]))
        return message["headers"]["id"], tag
    return _deliver


def run_reaper(client):
    return reap(client, KEYS, lanes=["serial"], bulk_queues=["bulk"], margin_ms=MARGIN_MS)


def queued_ids(client) -> list[str]:
    """Task ids in the bulk queue, head (next to be taken) first."""
    return [json.loads(raw)["headers"]["id"] for raw in reversed(client.lrange("bulk", 0, -1))]


@pytest.mark.redis
def test_unrecorded_message_of_a_dead_receiver_goes_back_to_the_head(redis_client, deliver, celery_app):
    celery_app.send_task("tasks.callout", kwargs={"url": "http://api.example/later"}, queue="bulk")
    task_id, tag = deliver("lost-in-the-window", delivered_s_ago=MARGIN_MS / 1000 + 1)
    report = run_reaper(redis_client)
    assert report.requeued == [task_id]
    assert queued_ids(redis_client)[0] == task_id  # ahead of the message published before it
    assert redis_client.hget(KOMBU_UNACKED, tag) is None
    assert redis_client.zscore(KOMBU_UNACKED_INDEX, tag) is None
    # a second reaper pass (or a second beat) finds nothing more to do
    assert run_reaper(redis_client).requeued == []
    assert queued_ids(redis_client).count(task_id) == 1


@pytest.mark.redis
def test_recent_unrecorded_message_is_left_to_its_receiver(redis_client, deliver):
    _task_id, tag = deliver("just-fetched", delivered_s_ago=0)
    assert run_reaper(redis_client).requeued == []
    assert redis_client.hget(KOMBU_UNACKED, tag) is not None
    assert redis_client.llen("bulk") == 0


@pytest.mark.redis
def test_message_recorded_by_a_live_worker_is_left_alone(redis_client, deliver):
    _task_id, tag = deliver("held-by-a-live-worker", delivered_s_ago=60)
    redis_client.hset(KEYS.reserved("bulk"), tag, "live-token")
    redis_client.set(KEYS.lease(KEYS.presence("live-token")), "live-token", px=30_000)
    assert run_reaper(redis_client).requeued == []
    assert redis_client.hget(KOMBU_UNACKED, tag) is not None


@pytest.mark.redis
def test_message_recorded_by_a_dead_worker_goes_back(redis_client, deliver):
    task_id, tag = deliver("held-by-a-dead-worker", delivered_s_ago=0)
    redis_client.hset(KEYS.reserved("bulk"), tag, "dead-token")  # no presence lease: gone
    assert run_reaper(redis_client).requeued == [task_id]
    assert queued_ids(redis_client) == [task_id]
    assert redis_client.hlen(KEYS.reserved("bulk")) == 0


@pytest.mark.redis
def test_unrecorded_message_with_an_attempt_under_way_is_left_alone(redis_client, deliver):
    task_id, tag = deliver("attempt-running", delivered_s_ago=60)
    redis_client.hset(KEYS.inflight(task_id), mapping={"owner": "someone", "queue": "bulk"})
    assert run_reaper(redis_client).requeued == []
    assert redis_client.hget(KOMBU_UNACKED, tag) is not None


@pytest.mark.redis
def test_reap_on_the_bulk_queue_leaves_a_live_workers_waiting_task_alone(redis_client, deliver, base_env):
    # A live bulk worker received a message and its task waits for a capacity slot: its
    # in-flight record has no deadline yet. `onelane reap bulk` must apply the bulk rules
    # (receiver alive: leave it), not the serial ones (deadline passed: requeue).
    import subprocess

    from onelane.delivery.inflight import Inflight, InflightRecord
    from tests import procs

    task_id, tag = deliver("waiting-for-a-slot", delivered_s_ago=60)
    redis_client.hset(KEYS.reserved("bulk"), tag, "live-token")
    redis_client.set(KEYS.lease(KEYS.presence("live-token")), "live-token", px=30_000)
    Inflight(redis_client, KEYS).record(InflightRecord(
        task_id=task_id, queue="bulk", resource="acme", owner="live-token", lease="", lease_token="", fence=0,
        started_ms=0, deadline_ms=0, attempt=1, delivery_tag=tag, host="h", pid=1, kwargs={}))
    out = subprocess.run([str(procs.VENV_BIN / "onelane"), "reap", "bulk"], env=base_env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "0 orphan(s) requeued" in out.stdout
    assert redis_client.hget(KOMBU_UNACKED, tag) is not None and redis_client.llen("bulk") == 0


# -- messages taken off the queue but not yet recorded (onelane/delivery/transport.py) ----------------

def fetch(client, celery_app, queue: str, token: str) -> tuple[str, bytes]:
    """Publish a callout and take it off ``queue`` into ``token``'s fetch list, as a worker's
    BLMOVE does; register the fetch list as the worker does on connecting."""
    celery_app.send_task("tasks.callout", kwargs={"url": "http://api.example/x"}, queue=queue)
    fetch_list = KEYS.fetch_list(queue, token)
    item = client.lmove(queue, fetch_list, "RIGHT", "LEFT")
    client.hset(KEYS.fetch_lists, fetch_list, json.dumps({"queue": queue, "token": token}))
    return json.loads(item)["headers"]["id"], item


@pytest.mark.redis
def test_fetched_message_of_a_dead_bulk_worker_goes_back_to_the_head(redis_client, celery_app):
    celery_app.send_task("tasks.callout", kwargs={"url": "http://api.example/later"}, queue="bulk")
    task_id, _item = fetch(redis_client, celery_app, "bulk", "dead-token")  # no presence: gone
    report = run_reaper(redis_client)
    assert report.requeued == [task_id]
    assert queued_ids(redis_client)[0] == task_id
    assert redis_client.llen(KEYS.fetch_list("bulk", "dead-token")) == 0
    assert redis_client.hlen(KEYS.fetch_lists) == 0  # the dead worker's fetch list is forgotten
    assert run_reaper(redis_client).requeued == []


@pytest.mark.redis
def test_a_dead_bulk_workers_callout_still_at_the_api_waits_for_its_deadline_in_the_fetch_list(redis_client,
                                                                                             celery_app):
    from onelane.core.clock import redis_now_ms
    from onelane.delivery.inflight import Inflight, InflightRecord

    # Given a bulk worker that is gone (no presence) whose fetch list holds two callouts: one never
    # started, one running from there (a bulk callout stays in the fetch list till its success's
    # ack), its attempt recorded in flight with its deadline 1.5 s ahead
    never_started, _ = fetch(redis_client, celery_app, "bulk", "dead-token")
    running, running_item = fetch(redis_client, celery_app, "bulk", "dead-token")
    tag = json.loads(running_item)["properties"]["delivery_tag"]
    deadline_ms = redis_now_ms(redis_client) + 1500
    Inflight(redis_client, KEYS).record(InflightRecord(
        task_id=running, queue="bulk", resource="acme", owner="dead-token", lease="resource:acme#1",
        lease_token="tok", fence=7, started_ms=deadline_ms - 3000, deadline_ms=deadline_ms, attempt=1,
        delivery_tag=tag, host="h", pid=1, kwargs={}))
    # When the reaper runs before that deadline
    report = run_reaper(redis_client)
    # Then the callout never started goes back at once; the running one stays where it is (the API
    # may still be working on it), and so does its fetch list's entry in the index
    assert report.requeued == [never_started] and report.waiting == [running]
    assert queued_ids(redis_client) == [never_started]
    assert redis_client.lrange(KEYS.fetch_list("bulk", "dead-token"), 0, -1) == [running_item]
    assert redis_client.hexists(KEYS.fetch_lists, KEYS.fetch_list("bulk", "dead-token"))
    assert Inflight(redis_client, KEYS).get(running) is not None
    # and once the deadline has passed, the next pass moves it back too, dropping its attempt's record
    time.sleep(max(0.0, (deadline_ms - redis_now_ms(redis_client)) / 1000) + 0.05)
    report = run_reaper(redis_client)
    assert report.requeued == [running] and report.waiting == []
    assert queued_ids(redis_client) == [running, never_started]
    assert Inflight(redis_client, KEYS).get(running) is None
    assert redis_client.zscore(KEYS.inflight_index("bulk"), running) is None
    assert redis_client.hlen(KEYS.fetch_lists) == 0 and redis_client.llen(KEYS.fetch_list("bulk", "dead-token")) == 0


@pytest.mark.redis
def test_a_second_reaper_with_a_stale_reading_of_a_fetch_list_touches_nothing(redis_client, celery_app):
    from onelane.delivery import fetching
    from onelane.delivery.inflight import Inflight, InflightRecord

    # Given a dead worker's fetch list holding a callout whose attempt's deadline has passed, which a
    # first reaper gave back (dropping that attempt's record), then another worker that took the
    # message again (unacked under the same tag) and has not recorded its attempt yet
    task_id, item = fetch(redis_client, celery_app, "bulk", "dead-token")
    tag = json.loads(item)["properties"]["delivery_tag"]
    Inflight(redis_client, KEYS).record(InflightRecord(
        task_id=task_id, queue="bulk", resource="acme", owner="dead-token", lease="", lease_token="", fence=0,
        started_ms=0, deadline_ms=1, attempt=1, delivery_tag=tag, host="h", pid=1, kwargs={}))
    assert run_reaper(redis_client).requeued == [task_id]
    assert Inflight(redis_client, KEYS).get(task_id) is None
    redis_client.rpop("bulk")
    redis_client.hset(KOMBU_UNACKED, tag, json.dumps([json.loads(item), "", "bulk"]))
    # When a second reaper acts on what it read of the fetch list before the first moved it
    fetch_list = KEYS.fetch_list("bulk", "dead-token")
    moved, waiting = fetching._REAP(redis_client, keys=[fetch_list, "bulk", KEYS.fetch_lists, KEYS.ready("bulk"),
                                                        KEYS.inflight_index("bulk"), KEYS.inflight(task_id)],
                                    args=["dead-token", item, task_id])
    # Then it moved nothing and left the other worker's copy alone (one delivery, not two)
    assert (moved, waiting) == ([], [])
    assert redis_client.llen("bulk") == 0 and redis_client.hexists(KOMBU_UNACKED, tag)


@pytest.mark.redis
def test_a_worker_taken_for_gone_enters_its_fetch_list_again_so_what_it_fetches_next_is_found(redis_client,
                                                                                             celery_app):
    from onelane.delivery.fetching import register_fetch_list

    # Given a bulk worker whose presence lapsed (a long pause): a reaper pass took it for gone and
    # dropped its empty fetch list from the index
    fetch_list = register_fetch_list(redis_client, KEYS, queue="bulk", token="paused-token")
    run_reaper(redis_client)
    assert not redis_client.hexists(KEYS.fetch_lists, fetch_list)
    # When it comes back (its heartbeat enters its fetch list again), fetches a callout, and dies
    redis_client.set(KEYS.lease(KEYS.presence("paused-token")), "paused-token", px=30_000)
    assert register_fetch_list(redis_client, KEYS, queue="bulk", token="paused-token") == fetch_list
    celery_app.send_task("tasks.callout", kwargs={"url": "http://api.example/x"}, queue="bulk")
    item = redis_client.lmove("bulk", fetch_list, "RIGHT", "LEFT")
    redis_client.delete(KEYS.lease(KEYS.presence("paused-token")))
    # Then the reaper finds that callout and gives it back
    assert run_reaper(redis_client).requeued == [json.loads(item)["headers"]["id"]]


@pytest.mark.redis
def test_fetched_message_of_a_live_bulk_worker_is_left_alone(redis_client, celery_app):
    _task_id, item = fetch(redis_client, celery_app, "bulk", "live-token")
    redis_client.set(KEYS.lease(KEYS.presence("live-token")), "live-token", px=30_000)
    assert run_reaper(redis_client).requeued == []
    assert redis_client.lrange(KEYS.fetch_list("bulk", "live-token"), 0, -1) == [item]


@pytest.mark.redis
def test_serial_fetch_list_of_a_worker_without_the_guard_goes_back(redis_client, celery_app):
    from onelane.coordination.lease import Lease

    # a live holder of the serial guard, and another worker, still present, that fetched a
    # message: only the guard holder consumes the serial queue, so that message is an orphan
    Lease(redis_client, KEYS.guard_name("serial"), keys=KEYS).try_acquire("holder", ttl_ms=30_000)
    redis_client.set(KEYS.lease(KEYS.presence("former")), "former", px=30_000)
    task_id, _item = fetch(redis_client, celery_app, "serial", "former")
    assert run_reaper(redis_client).requeued == [task_id]
    assert redis_client.llen("serial") == 1


@pytest.mark.unit
@pytest.mark.parametrize("version, ok", [("7.0.15", True), ("6.2.0", True), ("6.0.16", False),
                                         ("5.0.7", False), ("255.255.255", True)])
def test_redis_older_than_6_2_is_refused_with_a_reason(version, ok):
    from onelane.core.clients import version_problem

    problem = version_problem(version)
    assert (problem is None) == ok
    if not ok:
        assert version in problem and "6.2" in problem and "BLMOVE" in problem


@pytest.mark.redis
def test_the_test_redis_is_new_enough(redis_client):
    from onelane.core.clients import version_problem

    assert version_problem(redis_client.info("server")["redis_version"]) is None
