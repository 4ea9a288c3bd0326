"""The fetch script and coalescing, step by step, on a real Redis holding kombu's own layout.

The end-to-end tests (test_coalescing, test_faults) show them with real workers; here each rule
is pinned down on its own: what a take returns, that an absorb never moves a message twice, how
versions with one coalesce key become one carrier with the newest arguments, parking behind a
running key and going back to the head, and reading a message's key.
"""
from __future__ import annotations

import base64
import json

import pytest

from onelane.core.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, Keys
from onelane.delivery import coalescing, flow
from onelane.delivery.fetching import QueueFetch, Step, claim_fetched, give_back, requeue_taken
from onelane.delivery.inflight import MOVED, NOT_HELD, requeue_at_head

KEYS = Keys()
QUEUE = "serial"


def fetcher(queue: str = QUEUE, token: str = "t1") -> QueueFetch:
    return QueueFetch(KEYS, queue, KEYS.fetch_list(queue, token))


def take(client, f: QueueFetch, *, budget: int = 10_000) -> Step:
    """One fetch as the worker runs it: a take, then absorb what it read until it takes or finds nothing."""
    step = Step.of(client.execute_command(*f.take_command(client)))
    while step.kind == "drain":
        budget -= len(step.drained)
        step = f.absorb(client, step.drained, drain_first=budget > 0)
    return step


def publish(app, *, queue: str = QUEUE, **kwargs):
    kwargs.setdefault("url", "http://api.example/x")
    return app.send_task("tasks.callout", kwargs=kwargs, queue=queue).id


def kwargs_of(message: bytes) -> dict:
    return json.loads(base64.b64decode(json.loads(message)["body"]))[1]


def id_of(message: bytes) -> str:
    return json.loads(message)["headers"]["id"]


def fast_takes(client, app, taken: int, *, published: int | None = None, token: str = "t1"):
    """A worker's fetch whose script took the first of ``published`` messages (the rest to the ready
    list), then ``taken`` fast takes; returns (the fetch, the ids published, the messages taken)."""
    f = fetcher(token=token)
    ids = [publish(app) for _ in range(published or taken + 1)]
    take(client, f)
    return f, ids, [client.execute_command(*f.fast_take_command()) for _ in range(taken)]


def take_all(client, f: QueueFetch) -> list[bytes]:
    out = []
    while (step := take(client, f)).kind == "msg":
        out.append(step.message)
    assert step.kind == "empty"
    return out


# -- the take ----------------------------------------------------------------------------------
@pytest.mark.redis
def test_a_take_reads_kombus_list_and_takes_the_oldest_unacked_in_the_same_step(redis_client, celery_app):
    f = fetcher()
    assert take(redis_client, f).kind == "empty"
    ids = [publish(celery_app, idempotency_key=f"k{i}") for i in range(5)]
    first = take(redis_client, f)
    assert first.kind == "msg" and id_of(first.message) == ids[0]
    # the rest moved to the ready list, in order; kombu's list is empty
    assert redis_client.llen(QUEUE) == 0 and redis_client.llen(KEYS.ready(QUEUE)) == 4
    assert [id_of(m) for m in flow.waiting(redis_client, KEYS, QUEUE)] == ids[1:]
    assert flow.depth(redis_client, KEYS, QUEUE) == 4
    # unacked exactly as kombu records it: [message, exchange, routing key], scored with the time
    tag = json.loads(first.message)["properties"]["delivery_tag"]
    message, _exchange, routing_key = json.loads(redis_client.hget(KOMBU_UNACKED, tag))
    assert message == json.loads(first.message) and routing_key == QUEUE
    assert redis_client.zscore(KOMBU_UNACKED_INDEX, tag) is not None
    assert [id_of(m) for m in take_all(redis_client, f)] == ids[1:]
    assert redis_client.hlen(KOMBU_UNACKED) == 5


@pytest.mark.redis
def test_a_take_from_the_bulk_queue_records_its_receiver_in_the_same_step(redis_client, celery_app):
    # Given a bulk worker's fetch (many consumers: the reaper must know who received what) and a lane's
    bulk = QueueFetch(KEYS, "bulk", KEYS.fetch_list("bulk", "w1"), receiver="w1")
    lane = fetcher()
    publish(celery_app, queue="bulk")
    publish(celery_app)
    # When each takes a message
    from_bulk, from_lane = take(redis_client, bulk), take(redis_client, lane)
    # Then the bulk message is unacked with its receiver recorded by the same script; the lane's has none
    bulk_tag = json.loads(from_bulk.message)["properties"]["delivery_tag"]
    lane_tag = json.loads(from_lane.message)["properties"]["delivery_tag"]
    assert redis_client.hget(KEYS.reserved("bulk"), bulk_tag) == b"w1"
    assert redis_client.hexists(KOMBU_UNACKED, bulk_tag)
    assert not redis_client.exists(KEYS.reserved(QUEUE)) and redis_client.hexists(KOMBU_UNACKED, lane_tag)


@pytest.mark.redis
def test_an_absorb_of_messages_another_worker_took_meanwhile_moves_nothing_twice(redis_client, celery_app):
    a, b = fetcher(token="a"), fetcher(token="b")
    ids = [publish(celery_app) for _ in range(3)]
    step = Step.of(redis_client.execute_command(*a.take_command(redis_client)))
    assert step.kind == "drain" and len(step.drained) == 3
    got_b = take(redis_client, b)  # b absorbs all three and takes the first
    assert id_of(got_b.message) == ids[0]
    # a's absorb of what it read finds them gone from kombu's list: it takes the next one instead
    got_a = a.absorb(redis_client, step.drained, drain_first=True)
    assert got_a.kind == "msg" and id_of(got_a.message) == ids[1]
    assert [id_of(m) for m in take_all(redis_client, b)] == [ids[2]]
    assert redis_client.hlen(KOMBU_UNACKED) == 3


@pytest.mark.redis
def test_a_drain_budget_takes_before_reading_everything(redis_client, celery_app):
    f = fetcher()
    ids = [publish(celery_app) for _ in range(450)]
    step = take(redis_client, f, budget=200)  # one batch of 200, then the take
    assert step.kind == "msg" and id_of(step.message) == ids[0]
    assert redis_client.llen(QUEUE) == 250 and redis_client.llen(KEYS.ready(QUEUE)) == 199
    assert [id_of(m) for m in take_all(redis_client, f)] == ids[1:]


@pytest.mark.redis
def test_a_take_by_the_script_says_how_many_the_ready_list_still_holds(redis_client, celery_app):
    f = fetcher()
    ids = [publish(celery_app) for _ in range(3)]
    steps = [take(redis_client, f) for _ in range(3)]
    assert [id_of(s.message) for s in steps] == ids
    assert [s.ready_left for s in steps] == [2, 1, 0]


@pytest.mark.redis
def test_a_fast_take_holds_the_message_in_the_fetch_list_until_a_claim_records_it_unacked(
        redis_client, celery_app):
    # Given a ready list of three (the script took the first, moving the rest there)
    f = fetcher()
    ids = [publish(celery_app) for _ in range(3)]
    take(redis_client, f)
    # When the fast take runs: one plain LMOVE
    message = redis_client.execute_command(*f.fast_take_command())
    # Then the head of the queue is in the worker's fetch list, and nowhere else yet
    assert id_of(message) == ids[1]
    assert redis_client.lrange(f.fetch_list, 0, -1) == [message]
    assert [id_of(m) for m in flow.waiting(redis_client, KEYS, QUEUE)] == ids[2:]
    tag = json.loads(message)["properties"]["delivery_tag"]
    assert not redis_client.hexists(KOMBU_UNACKED, tag)
    # When its task claims it (before a give-back or a deferral), and claims it again (the first
    # reply lost)
    def claim() -> bool:
        return claim_fetched(redis_client, KEYS, fetch_list=f.fetch_list, delivery_tag=tag, message=message.decode(),
                             exchange="", queue=QUEUE, receiver="")

    claims = [claim(), claim()]
    # Then it is unacked exactly as kombu records it, and off the fetch list; the second claim
    # found its own record (claimed, not given back by someone else)
    assert claims == [True, True]
    assert json.loads(redis_client.hget(KOMBU_UNACKED, tag)) == [json.loads(message), "", QUEUE]
    assert redis_client.zscore(KOMBU_UNACKED_INDEX, tag) is not None
    assert redis_client.llen(f.fetch_list) == 0
    # and an orphan's requeue finds it where it finds a message the script took
    assert requeue_at_head(redis_client, KEYS, queue=QUEUE, delivery_tag=tag, task_id=ids[1]) == MOVED
    assert id_of(flow.head(redis_client, KEYS, QUEUE)) == ids[1]
    # and a claim after that (the message is in neither place now) writes nothing
    assert claim() is False and not redis_client.hexists(KOMBU_UNACKED, tag)
    # An empty ready list answers the fast take with nothing (the script's take comes next)
    redis_client.delete(KEYS.ready(QUEUE))
    assert redis_client.execute_command(*f.fast_take_command()) is None


@pytest.mark.redis
def test_a_give_back_of_chosen_messages_moves_only_those_the_fetch_list_still_holds(redis_client, celery_app):
    # Given a fetch list of three fast takes, and one message already claimed elsewhere
    f, ids, taken = fast_takes(redis_client, celery_app, 3, published=5)
    assert [id_of(m) for m in taken] == ids[1:4]
    # When two of them are given back (one running is kept) and one that is not there any more
    moved = give_back(redis_client, KEYS, fetch_list=f.fetch_list, queue=QUEUE, forget=False,
                      only=[taken[2], taken[0], b"claimed meanwhile"])
    # Then exactly those two went back to the head, oldest first in line, and the other stays
    assert [id_of(m) for m in moved] == [ids[3], ids[1]]
    assert [id_of(m) for m in flow.waiting(redis_client, KEYS, QUEUE)] == [ids[1], ids[3], ids[4]]
    assert redis_client.lrange(f.fetch_list, 0, -1) == [taken[1]]
    assert give_back(redis_client, KEYS, fetch_list=f.fetch_list, queue=QUEUE, forget=False, only=[]) == []


@pytest.mark.redis
def test_a_requeue_of_a_delivered_message_finds_it_claimed_or_still_in_the_fetch_list(redis_client, celery_app):
    # Given three messages delivered by fast takes: one claimed by its task, one not yet (its pool
    # child died first), one acknowledged
    f, ids, (claimed, unclaimed, acked) = fast_takes(redis_client, celery_app, 3, token="w1")
    tags = [json.loads(m)["properties"]["delivery_tag"] for m in (claimed, unclaimed, acked)]
    assert claim_fetched(redis_client, KEYS, fetch_list=f.fetch_list, delivery_tag=tags[0], message=claimed.decode(),
                         exchange="", queue=QUEUE, receiver="")
    redis_client.lrem(f.fetch_list, 1, acked)
    # When each is requeued (a worker-lost reject)
    res = [requeue_taken(redis_client, KEYS, queue=QUEUE, delivery_tag=tag, task_id=tid, fetched=m.decode(),
                         owner="w1") for tag, tid, m in zip(tags, ids[1:], (claimed, unclaimed, acked))]
    # Then the claimed one comes back from its unacked copy, the unclaimed one from the fetch list,
    # both at the head; the acknowledged one is gone for good
    assert res == [MOVED, MOVED, NOT_HELD]
    assert [id_of(m) for m in flow.waiting(redis_client, KEYS, QUEUE)] == [ids[2], ids[1]]
    assert redis_client.llen(f.fetch_list) == 0 and redis_client.hlen(KOMBU_UNACKED) == 1  # the script's take


@pytest.mark.redis
def test_an_unreadable_message_is_handed_to_the_worker_in_its_fetch_list(redis_client, celery_app):
    f = fetcher()
    redis_client.rpush(KEYS.ready(QUEUE), b"not json")
    step = take(redis_client, f)
    assert step.kind == "bad" and step.message == b"not json"
    assert redis_client.lrange(f.fetch_list, 0, -1) == [b"not json"]


@pytest.mark.redis
def test_a_requeue_goes_to_the_head_of_the_ready_list(redis_client, celery_app):
    f = fetcher()
    ids = [publish(celery_app) for _ in range(3)]
    first = take(redis_client, f)
    tag = json.loads(first.message)["properties"]["delivery_tag"]
    assert requeue_at_head(redis_client, KEYS, queue=QUEUE, delivery_tag=tag, task_id=ids[0]) == MOVED
    assert [id_of(m) for m in flow.waiting(redis_client, KEYS, QUEUE)] == ids
    assert id_of(flow.head(redis_client, KEYS, QUEUE)) == ids[0]


# -- coalescing --------------------------------------------------------------------------------
@pytest.mark.redis
def test_versions_with_one_key_become_one_call_with_the_newest_arguments_at_the_first_place(
        redis_client, celery_app):
    f = fetcher()
    a1 = publish(celery_app, coalesce_key="order-1", json={"v": 1})
    plain = publish(celery_app, json={"plain": True})
    b1 = publish(celery_app, coalesce_key="order-2", json={"v": 1})
    a2 = publish(celery_app, coalesce_key="order-1", json={"v": 2})
    a3 = publish(celery_app, coalesce_key="order-1", json={"v": 3})
    other_lane = publish(celery_app, queue="erp", coalesce_key="order-1", json={"v": 9})
    taken = take_all(redis_client, f)
    assert [id_of(m) for m in taken] == [a1, plain, b1]
    assert kwargs_of(taken[0])["json"] == {"v": 3} and kwargs_of(taken[2])["json"] == {"v": 1}
    carried = coalescing.read_carried(redis_client, KEYS, queue=QUEUE, task_id=a1)
    assert [c["id"] for c in carried] == [a2, a3]
    assert coalescing.view(redis_client, KEYS, QUEUE).coalesced == 2
    # keys are per queue: the erp lane's message is untouched
    erp = take_all(redis_client, fetcher("erp"))
    assert [id_of(m) for m in erp] == [other_lane] and kwargs_of(erp[0])["json"] == {"v": 9}


@pytest.mark.redis
def test_a_started_callout_is_never_changed_and_a_newer_one_waits_behind_it(redis_client, celery_app):
    f = fetcher("bulk")
    v1 = publish(celery_app, queue="bulk", coalesce_key="r", json={"v": 1})
    assert id_of(take(redis_client, f).message) == v1  # started
    v2 = publish(celery_app, queue="bulk", coalesce_key="r", json={"v": 2})
    other = publish(celery_app, queue="bulk", json={"other": 1})
    v3 = publish(celery_app, queue="bulk", coalesce_key="r", json={"v": 3})
    # v2 reaches the head while v1 runs: parked (never two with one key at once); v3 rides on it
    step = take(redis_client, f)
    assert id_of(step.message) == other
    assert take(redis_client, f).kind == "empty"
    assert flow.depth(redis_client, KEYS, "bulk") == 1  # the parked one counts as waiting
    assert coalescing.view(redis_client, KEYS, "bulk").parked == 1
    # v1's outcome frees the key: v2 goes back to the head, carrying v3's arguments
    assert coalescing.release(redis_client, KEYS, queue="bulk", key="r", task_id=v1) == 1
    step = take(redis_client, f)
    assert id_of(step.message) == v2 and kwargs_of(step.message)["json"] == {"v": 3}
    carried = coalescing.read_carried(redis_client, KEYS, queue="bulk", task_id=v2)
    assert [c["id"] for c in carried] == [v3]


@pytest.mark.redis
def test_a_release_by_another_id_leaves_the_key_held(redis_client, celery_app):
    f = fetcher("bulk")
    v1 = publish(celery_app, queue="bulk", coalesce_key="r")
    take(redis_client, f)
    publish(celery_app, queue="bulk", coalesce_key="r")
    assert take(redis_client, f).kind == "empty"  # parked behind v1
    assert coalescing.release(redis_client, KEYS, queue="bulk", key="r", task_id="someone-else") == 0
    assert take(redis_client, f).kind == "empty"
    assert coalescing.release(redis_client, KEYS, queue="bulk", key="r", task_id=v1) == 1
    assert take(redis_client, f).kind == "msg"


@pytest.mark.redis
def test_a_redelivered_copy_of_a_started_callout_is_not_coalesced(redis_client, celery_app):
    f = fetcher()
    v1 = publish(celery_app, coalesce_key="r", json={"v": 1})
    first = take(redis_client, f)
    v2 = publish(celery_app, coalesce_key="r", json={"v": 2})
    # kombu restores v1 to the tail (visibility timeout), after v2: it must not overwrite v2's data
    tag = json.loads(first.message)["properties"]["delivery_tag"]
    restored = json.loads(first.message)
    restored["headers"]["redelivered"] = True
    redis_client.hdel(KOMBU_UNACKED, tag)
    redis_client.lpush(QUEUE, json.dumps(restored))
    step = take(redis_client, f)  # v2 waits (v1 is started): v2 parks, the restored v1 runs again
    assert id_of(step.message) == v1 and kwargs_of(step.message)["json"] == {"v": 1}
    coalescing.release(redis_client, KEYS, queue=QUEUE, key="r", task_id=v1)
    step = take(redis_client, f)
    assert id_of(step.message) == v2 and kwargs_of(step.message)["json"] == {"v": 2}


# -- reading a message's key (pure) ------------------------------------------------------------
def envelope(kwargs, *, task="tasks.callout", headers=None, content_type="application/json") -> bytes:
    body = base64.b64encode(json.dumps([[], kwargs, {}]).encode()).decode()
    return json.dumps({"body": body, "content-encoding": "utf-8", "content-type": content_type,
                       "headers": {"task": task, "id": "tid-1", **(headers or {})},
                       "properties": {"body_encoding": "base64", "delivery_tag": "tag-1",
                                      "delivery_info": {"exchange": "", "routing_key": QUEUE}}}).encode()


@pytest.mark.unit
@pytest.mark.parametrize("pad", range(6))
def test_the_key_is_found_at_every_byte_alignment(pad):
    a = coalescing.arrival(envelope({"url": "http://x/" + "y" * pad, "coalesce_key": "order-42"}))
    assert (a.key, a.task_id, a.solo) == ("order-42", "tid-1", False)


@pytest.mark.unit
@pytest.mark.parametrize("message", [
    envelope({"url": "http://x/"}),  # no key
    envelope({"url": "http://x/", "json": {"coalesce_key": "nested"}, "coalesce_key": 7}),  # not a string
    envelope({"url": "http://x/", "coalesce_key": ""}),
    envelope({"url": "http://x/", "coalesce_key": "k" * 201}),
    envelope({"url": "http://x/", "coalesce_key": "k"}, task="tasks.other"),
    envelope({"url": "http://x/", "coalesce_key": "k"}, content_type="application/x-python-serialize"),
    b"not json at all",
    b'{"body": "!!!not base64 coalesce_key"}',
])
def test_a_message_without_a_valid_key_is_never_coalesced(message):
    assert coalescing.arrival(message) == coalescing.NO_KEY


@pytest.mark.unit
def test_a_redelivered_or_expiring_message_is_solo_and_its_batch_is_read():
    a = coalescing.arrival(envelope({"url": "http://x/", "coalesce_key": "k"},
                                    headers={"redelivered": True, "onelane_batch": "b-1"}))
    assert a.solo and a.batch == "b-1" and a.key == "k"
    assert not coalescing.arrival(envelope({"url": "http://x/", "coalesce_key": "k"})).solo
    for header in ({"expires": "2030-01-01T00:00:00+00:00"}, {"eta": "2030-01-01T00:00:00+00:00"}):
        assert coalescing.arrival(envelope({"url": "http://x/", "coalesce_key": "k"}, headers=header)).solo


@pytest.mark.unit
@pytest.mark.parametrize("value, ok", [("order-42", True), ("k" * 200, True), ("", False), ("k" * 201, False),
                                       (42, False), (None, False)])
def test_one_rule_for_a_coalesce_key(value, ok):
    from onelane.callout.validation import validate
    from onelane.core.errors import ValidationError

    assert (coalescing.coalesce_key_problem(value) is None) == ok
    if value is None:
        return
    if ok:
        assert validate({"url": "http://x/", "coalesce_key": value}).coalesce_key == value
    else:
        with pytest.raises(ValidationError, match="coalesce_key"):
            validate({"url": "http://x/", "coalesce_key": value})


@pytest.mark.redis
def test_a_carrier_that_will_never_run_frees_its_key_and_ends_what_it_carried(redis_client, celery_app):
    from onelane.core.outcome import Outcome

    f = fetcher("bulk")
    v1 = publish(celery_app, queue="bulk", coalesce_key="r", json={"v": 1})
    v2 = publish(celery_app, queue="bulk", coalesce_key="r", json={"v": 2})
    assert id_of(take(redis_client, f).message) == v1  # carries v2
    v3 = publish(celery_app, queue="bulk", coalesce_key="r", json={"v": 3})
    assert take(redis_client, f).kind == "empty"  # v3 parked behind v1
    # v1 is revoked (or purged): its key is freed, v2 ends FAILURE naming it, v3 goes back to the head
    coalescing.abandon(redis_client, KEYS, queue="bulk", key="r", task_id=v1, why="it was revoked",
                       window_s=60, result_expires_s=60, now_ms=0)
    outcome = Outcome.from_json(redis_client.get(KEYS.done(v2)))
    assert outcome.status == "failure" and outcome.coalesced_into == v1 and "revoked" in outcome.error
    meta = json.loads(redis_client.get(KEYS.celery_result(v2)))
    assert meta["status"] == "FAILURE" and v1 in meta["result"]["exc_message"][0]
    assert celery_app.AsyncResult(v2).state == "FAILURE"
    step = take(redis_client, f)
    assert id_of(step.message) == v3 and kwargs_of(step.message)["json"] == {"v": 3}
    assert redis_client.exists(KEYS.coalesce_carried("bulk", v1)) == 0


@pytest.mark.redis
def test_the_reaper_frees_a_key_held_by_a_callout_held_nowhere(redis_client, celery_app):
    from onelane.core.settings import get_settings
    from onelane.delivery.reaper import reap_everything

    f = fetcher()
    v1 = publish(celery_app, coalesce_key="r")
    message = take(redis_client, f).message
    tag = json.loads(message)["properties"]["delivery_tag"]
    s = get_settings()
    # taken long ago (older than any callout may stay unacked) ...
    redis_client.hset(KEYS.coalesce_started(QUEUE), "r",
                      json.dumps({"id": v1, "tag": tag, "at": 0}))
    assert reap_everything(redis_client, KEYS, s).freed_keys == []  # ... but still unacked: held
    redis_client.hdel(KOMBU_UNACKED, tag)  # purged by hand
    assert reap_everything(redis_client, KEYS, s).freed_keys == ["r"]
    assert redis_client.hlen(KEYS.coalesce_started(QUEUE)) == 0


@pytest.mark.redis
def test_the_heartbeat_looks_before_it_moves_retries_and_prioritised_messages(redis_client, celery_app):
    # Given an idle queue: nothing to move, as the worker's heartbeat finds it four times a second
    assert flow.pending_moves(redis_client, KEYS, QUEUE) == flow.PendingMoves(due=False, prioritised=False)
    # When a relaxed retry is due later, it is not due yet; once due (on the Redis clock), it is
    now_ms = redis_client.time()[0] * 1000
    redis_client.zadd(KEYS.delayed(QUEUE), {"later": now_ms + 60_000})
    assert not flow.pending_moves(redis_client, KEYS, QUEUE).due
    redis_client.zadd(KEYS.delayed(QUEUE), {"now": now_ms - 1})
    assert flow.pending_moves(redis_client, KEYS, QUEUE).due
    # And a message a plain producer sent with a priority (in kombu's sub-list for its level) is seen
    assert not flow.pending_moves(redis_client, KEYS, QUEUE).prioritised
    redis_client.lpush(KEYS.priority_list(QUEUE, 5), b"{}")
    assert flow.pending_moves(redis_client, KEYS, QUEUE).prioritised


@pytest.mark.redis
def test_a_reconnect_gives_the_fetch_list_back_but_for_messages_tasks_may_still_claim(redis_client, celery_app):
    from types import SimpleNamespace

    from onelane.delivery import transport

    # Given a worker that took three messages by fast takes: one it handed to a task still running
    # (not claimed yet), two left behind (say its fetch stopped before handing them over)
    f, ids, (running, _left1, _left2) = fast_takes(redis_client, celery_app, 3, token="w1")
    tag = json.loads(running)["properties"]["delivery_tag"]
    transport._running_fetched(tag, running.decode())
    try:
        # When it reconnects (the fetch list is prepared again)
        channel = SimpleNamespace(_client=lambda: redis_client)
        transport.LossProofFetch._prepare(channel, f)
        # Then the two go back to the head, oldest first; the running one stays for its task's claim
        assert [id_of(m) for m in flow.waiting(redis_client, KEYS, QUEUE)] == ids[2:]
        assert redis_client.lrange(f.fetch_list, 0, -1) == [running]
        assert channel._fetch_ready == f.fetch_list and channel._take_fast is False
    finally:
        transport._RUNNING_FETCHED.pop(tag, None)


@pytest.mark.unit
def test_a_callout_that_ended_with_ignore_is_acknowledged_in_memory_only(monkeypatch):
    from types import SimpleNamespace

    from celery.exceptions import Ignore
    from celery.worker.request import Request

    from onelane.delivery import transport
    from onelane.delivery.request import HeadRequeueRequest

    handled = []
    monkeypatch.setattr(Request, "on_failure", lambda self, exc_info, **kw: handled.append(self.message.delivery_tag))
    monkeypatch.setattr(transport, "_ACKED_WITH_OUTCOME", set())

    def ended_with(tag: str, exc: BaseException) -> None:
        request = HeadRequeueRequest.__new__(HeadRequeueRequest)
        request._message = SimpleNamespace(delivery_tag=tag)
        request.on_failure(SimpleNamespace(exception=exc))

    # Given a callout that gave its message back (Ignore), and one that failed
    ended_with("tag-moved", Ignore())
    ended_with("tag-failed", ValueError("boom"))
    # Then Celery handles both as ever (both acknowledged next), but only the first's ack is noted
    # as memory only: its message was moved already, and a removal could take another delivery's copy
    assert handled == ["tag-moved", "tag-failed"]
    assert transport._ACKED_WITH_OUTCOME == {"tag-moved"}
