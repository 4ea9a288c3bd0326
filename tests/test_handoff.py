"""Slots handed on within a worker process, against the session's real Redis: a task whose attempt
ended passes its slot to a task of its process waiting for one, in its outcome's transaction,
without the slot ever coming free; never two holders, never a slot kept from the other workers,
never a waiter left waiting on a handoff that failed."""
from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from onelane.callout.permit import SlotPermit
from onelane.coordination import handoff
from onelane.coordination.slots import SlotGrant
from onelane.core.keys import Keys
from onelane.core.limits import Limit
from onelane.delivery.inflight import Inflight, InflightRecord

pytestmark = pytest.mark.redis

KEYS = Keys()
TTL_MS = 30_000


def permit(client, cap: int) -> SlotPermit:
    return SlotPermit(client, KEYS, "acme", Limit(concurrency=cap), Inflight(client, KEYS))


def record(task_id: str) -> InflightRecord:
    return InflightRecord(task_id=task_id, queue="bulk", resource="acme", owner="w9", lease="", lease_token="",
                          fence=0, started_ms=0, deadline_ms=0, attempt=1, delivery_tag=f"tag-{task_id}", host="h",
                          pid=1, kwargs={"url": "u"})


def commands(client) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if predicate():
            return True
        time.sleep(0.01)
    return False


class LocalWaiter:
    """A task of this process queued behind its waiters (its preflight tried nothing), then acquiring."""

    def __init__(self, client, cap: int, task_id: str):
        self.permit = permit(client, cap)
        self.task_id = task_id
        self.token = f"tok-{task_id}"
        pipe = client.pipeline(transaction=False)
        assert self.permit.speculate(pipe, record(task_id), token=self.token, ttl_ms=TTL_MS, timeout_ms=5_000) == 0
        assert len(pipe) == 0, "queued behind: no Redis step before its wait"
        self.out: dict = {}
        self.thread = threading.Thread(target=self._acquire)

    def _acquire(self):
        started = time.monotonic()
        self.out["got"] = self.permit.acquire(record(self.task_id), token=self.token, ttl_ms=TTL_MS, timeout_ms=5_000,
                                              redis_now_ms=0)
        self.out["after_s"] = time.monotonic() - started

    def start(self, key: str) -> "LocalWaiter":
        self.thread.start()
        assert wait_until(lambda: handoff.waiting(key) >= 1), "waiting in the process"
        return self

    def grant(self) -> SlotGrant:
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()
        return self.out["got"][0]


def end_attempt(client, holder: SlotPermit, grant: SlotGrant, *, lose_reply: bool = False) -> None:
    """The outcome's transaction of ``grant``'s attempt, its permit last (as CalloutRun records a success)."""
    pipe = client.pipeline(transaction=True)
    pipe.set("outcome", "recorded")
    settle = holder.hand_off(grant, pipe=pipe)
    replies = pipe.execute()
    settle(None if lose_reply else replies)


@pytest.fixture
def key():
    return KEYS.slots_held("acme")


@pytest.fixture
def redis_waiter(client_permit):
    """Another task of this process waiting in Redis for a slot (so newcomers queue behind it)."""
    client_permit.slots.begin_waiting()
    try:
        yield
    finally:
        client_permit.slots.end_waiting()


@pytest.fixture
def client_permit(redis_client):
    return permit(redis_client, 1)


def test_a_slot_is_handed_to_a_waiter_of_its_process_without_ever_coming_free(redis_client, client_permit, key,
                                                                               redis_waiter):
    # Given a cap of 1, held by an attempt, and a newcomer queued behind the process's waiter
    holder = client_permit
    first = holder.slots.try_acquire("tok-first", ttl_ms=TTL_MS)
    assert isinstance(first, SlotGrant)
    waiter = LocalWaiter(redis_client, 1, "t2").start(key)
    redis_client.config_resetstat()
    # When the attempt's outcome is recorded
    end_attempt(redis_client, holder, first)
    # Then the waiter holds the slot: its token in the slot's key, a new fence, no release on the
    # way (no wake-up signal for the other workers, no try of its own)
    grant = waiter.grant()
    assert (grant.slot, grant.token, grant.kept_since) == (1, "tok-t2", first.kept_since)  # kept, not retaken
    assert grant.fence > first.fence
    assert redis_client.get(KEYS.lease(first.name)).decode() == "tok-t2"
    calls = commands(redis_client)
    assert "lpush" not in calls and calls["evalsha"] == 1, calls
    assert not redis_client.exists(KEYS.slot_signal("acme"))
    # (the hints keep the first grant's deadline: the reaper and a try look at the key itself)
    assert redis_client.zscore(KEYS.slots_held("acme"), "1") == first.deadline_ms
    assert redis_client.zscore(KEYS.lease_index, first.name) == first.deadline_ms
    assert 0 < redis_client.pttl(KEYS.lease(first.name)) <= TTL_MS
    # and its attempt is on record, stamped as a grant stamps it, numbered from the ledger
    h = {k.decode(): v.decode() for k, v in redis_client.hgetall(KEYS.inflight("t2")).items()}
    assert (h["owner"], h["delivery_tag"], h["lease"], h["lease_token"], h["fence"], h["attempt"]) == \
        ("w9", "tag-t2", first.name, "tok-t2", str(grant.fence), "1")
    assert redis_client.zscore(KEYS.inflight_index("bulk"), "t2") == int(h["deadline_ms"]) > grant.now_ms
    assert waiter.out["got"][1] > 0  # its wait is counted
    # and the old holder's token frees nothing any more
    holder.release(first)
    assert redis_client.get(KEYS.lease(first.name)).decode() == "tok-t2"


def test_a_slot_handed_on_its_limit_goes_back_to_every_worker(redis_client, client_permit, key):
    # Given a slot its process has kept as long as it may, and a newcomer queued behind the process's
    # task waiting in Redis
    holder = client_permit
    first = holder.slots.try_acquire("tok-first", ttl_ms=TTL_MS)
    worn = replace(first, kept_since=time.monotonic() - handoff.KEEP_S - 0.1)
    holder.slots.begin_waiting()
    try:
        waiter = LocalWaiter(redis_client, 1, "t3").start(key)
        # When that attempt ends
        end_attempt(redis_client, holder, worn)
        # Then the slot was released to every worker (the wake-up signal pushed for whoever waits in
        # Redis longest, of any process), not handed to the newcomer
        assert redis_client.exists(KEYS.slot_signal("acme"))
        assert not redis_client.exists(KEYS.lease(first.name))
        time.sleep(0.2)
        assert waiter.thread.is_alive() and handoff.waiting(key) == 1
    finally:
        # and when the task waiting in Redis leaves, the newcomer takes its place and tries
        holder.slots.end_waiting()
    grant = waiter.grant()
    assert grant.token == "tok-t3" and grant.kept_since > first.kept_since and grant.fence > first.fence
    assert waiter.out["after_s"] < 1.5, "at once, not after its wait ran out"


def test_a_waiter_whose_handoff_reply_was_lost_gets_that_slot_not_a_second(redis_client, key):
    # Given a cap of 2, slot 1 held, slot 2 free, and a newcomer queued behind the process's waiter
    holder = permit(redis_client, 2)
    first = holder.slots.try_acquire("tok-first", ttl_ms=TTL_MS)
    assert first.slot == 1
    holder.slots.begin_waiting()
    try:
        waiter = LocalWaiter(redis_client, 2, "t4").start(key)
        # When the outcome's transaction ran, handing slot 1 on, but its reply was lost
        end_attempt(redis_client, holder, first, lose_reply=True)
        grant = waiter.grant()
    finally:
        holder.slots.end_waiting()
    # Then the waiter, told the handoff may have happened, holds slot 1 (granted again, a new fence),
    # and slot 2 is still free: one slot for one attempt
    assert (grant.slot, grant.token) == (1, "tok-t4")
    assert redis_client.get(KEYS.lease(KEYS.slot("acme", 1))).decode() == "tok-t4"
    assert not redis_client.exists(KEYS.lease(KEYS.slot("acme", 2)))


def test_when_its_waiter_in_redis_gets_a_slot_the_oldest_waiter_of_the_process_waits_there_in_its_place(
        redis_client, key):
    # Given a cap of 1, held; a task of this process waiting in Redis for it; a newcomer queued behind
    p = permit(redis_client, 1)
    first = p.slots.try_acquire("tok-first", ttl_ms=TTL_MS)
    out = {}
    in_redis = threading.Thread(target=lambda: out.update(
        got=p.slots.acquire("tok-redis", ttl_ms=TTL_MS, wait_ms=10_000, refused_ms=2_000)))
    in_redis.start()
    assert wait_until(p.slots.others_waiting)
    waiter = LocalWaiter(redis_client, 1, "t5").start(key)
    # When the slot is released (a failed attempt's release: to every worker) and the task waiting in
    # Redis takes it
    p.release(first)
    in_redis.join(timeout=15)
    second, _ = out["got"]
    assert second.token == "tok-redis"
    # Then the newcomer waits in Redis in its place (counted there), not beside the process's line
    assert wait_until(lambda: p.slots.others_waiting() and handoff.waiting(key) == 0)
    assert waiter.thread.is_alive(), "the slot is held: it waits"
    # and the next release wakes it at once, well before its block would end
    released = time.monotonic()
    p.release(second)
    grant = waiter.grant()
    assert grant.token == "tok-t5" and time.monotonic() - released < 1.5
    assert not p.slots.others_waiting()


def test_a_handoff_never_gives_a_slot_its_holder_lost(redis_client, client_permit, key, redis_waiter):
    def handed_to(task_id: str) -> bool:  # its in-flight record, if any, names a slot it holds
        return bool(redis_client.hget(KEYS.inflight(task_id), "lease_token"))

    # Given an attempt whose slot was taken from it (its deadline passed; the reaper freed it, and
    # another worker holds it now), and a newcomer queued behind
    holder = client_permit
    first = holder.slots.try_acquire("tok-first", ttl_ms=TTL_MS)
    redis_client.set(KEYS.lease(first.name), "tok-other-worker", px=TTL_MS)
    waiter = LocalWaiter(redis_client, 1, "t6").start(key)
    # When that attempt's outcome is recorded
    end_attempt(redis_client, holder, first)
    # Then nothing was handed on (the other worker keeps the slot) and the waiter waits in Redis
    # for a slot of its own
    assert redis_client.get(KEYS.lease(first.name)).decode() == "tok-other-worker"
    assert not handed_to("t6")
    assert wait_until(lambda: holder.slots.others_waiting() and handoff.waiting(key) == 0)
    assert not handed_to("t6")  # (its try in Redis, refused, may have written it down as waiting)
    redis_client.delete(KEYS.lease(first.name))
    redis_client.zadd(KEYS.slots_held("acme"), {"1": 1})
    redis_client.lpush(KEYS.slot_signal("acme"), "1")  # the other worker's release
    grant = waiter.grant()
    assert grant.token == "tok-t6" and grant.kept_since > first.kept_since  # taken from Redis anew


def test_a_releaser_that_cannot_reach_redis_before_its_transaction_leaves_the_waiter_in_line(
        redis_client, client_permit, key, redis_waiter, monkeypatch):
    # Given an attempt holding the slot, a newcomer in line, and Redis's script cache lost while Redis
    # cannot be reached (the handoff's script must be loaded again first)
    from onelane.coordination import slots
    import redis

    holder = client_permit
    first = holder.slots.try_acquire("tok-first", ttl_ms=TTL_MS)
    waiter = LocalWaiter(redis_client, 1, "t7").start(key)

    def unreachable(client):
        raise redis.exceptions.ConnectionError("Redis is loading")

    monkeypatch.setattr(slots._HANDOFF, "loaded_sha", unreachable)
    # When the attempt's outcome transaction is put together
    with pytest.raises(redis.exceptions.ConnectionError):
        holder.hand_off(first, pipe=redis_client.pipeline(transaction=True))
    # Then the newcomer is still in line, claimed by nobody, and the next try hands the slot to it
    assert handoff.waiting(key) == 1
    monkeypatch.undo()
    end_attempt(redis_client, holder, first)
    assert waiter.grant().token == "tok-t7"


def test_a_token_whose_try_went_unanswered_tries_again_rather_than_wait_for_a_second_slot(
        redis_client, key):
    # Given a cap of 2, a preflight's try that won slot 1 but whose reply was lost, and by the time
    # the preflight is tried again another task of the process waits in Redis
    p = permit(redis_client, 2)
    pipe = redis_client.pipeline(transaction=False)
    p.slots.queue_try(pipe, "tok-c", ttl_ms=TTL_MS)
    pipe.execute()  # the reply never read: lost
    assert redis_client.get(KEYS.lease(KEYS.slot("acme", 1))).decode() == "tok-c"
    p.slots.begin_waiting()
    try:
        # When the preflight is tried again with the same token
        pipe = redis_client.pipeline(transaction=False)
        n = p.speculate(pipe, record("t8"), token="tok-c", ttl_ms=TTL_MS, timeout_ms=5_000)
        grant = p.speculated(pipe.execute(), token="tok-c") if n else None
    finally:
        p.slots.end_waiting()
    # Then it tried ahead (not in line for a handoff that would give the token a second slot) and
    # was granted slot 1 again; slot 2 is free
    assert n == 1 and grant is not None and grant.slot == 1
    assert not redis_client.exists(KEYS.lease(KEYS.slot("acme", 2)))


def test_a_newcomer_whose_process_stopped_waiting_in_redis_meanwhile_tries_at_once(redis_client, key):
    # Given a free slot, and a newcomer whose preflight queued it behind the process's task waiting
    # in Redis, which then left before the newcomer joined the line
    p = permit(redis_client, 1)
    p.slots.begin_waiting()
    newcomer = permit(redis_client, 1)
    pipe = redis_client.pipeline(transaction=False)
    assert newcomer.speculate(pipe, record("t9"), token="tok-t9", ttl_ms=TTL_MS, timeout_ms=5_000) == 0
    p.slots.end_waiting()
    # When it goes for its slot
    started = time.monotonic()
    grant, _ = newcomer.acquire(record("t9"), token="tok-t9", ttl_ms=TTL_MS, timeout_ms=5_000, redis_now_ms=0)
    # Then it did not wait in a line nobody serves: it tried, and won the free slot
    assert grant.token == "tok-t9" and time.monotonic() - started < 1.0
    assert handoff.waiting(key) == 0


def test_a_handoff_that_lands_after_its_waiter_gave_up_on_it_is_released(redis_client, key, monkeypatch):
    # Given a cap of 2, slot 1 held, a newcomer in line, claimed by the holder's outcome transaction,
    # and that transaction stuck longer than a claimed waiter waits for it
    monkeypatch.setattr(handoff, "WAIT_S", 0.1)
    monkeypatch.setattr(handoff, "CLAIMED_WAIT_S", 0.2)
    holder = permit(redis_client, 2)
    first = holder.slots.try_acquire("tok-first", ttl_ms=TTL_MS)
    holder.slots.begin_waiting()
    try:
        waiter = LocalWaiter(redis_client, 2, "t10").start(key)
        pipe = redis_client.pipeline(transaction=True)
        settle = holder.hand_off(first, pipe=pipe)
        # When the newcomer gives up on it (and takes the free slot 2 itself), and the transaction
        # lands only then
        grant = waiter.grant()
        settle(pipe.execute())
    finally:
        holder.slots.end_waiting()
    # Then the newcomer holds slot 2 alone: slot 1, handed to it too late, was freed by its releaser
    assert (grant.slot, grant.token) == (2, "tok-t10")
    assert not redis_client.exists(KEYS.lease(first.name))
    assert redis_client.get(KEYS.lease(KEYS.slot("acme", 2))).decode() == "tok-t10"


def test_a_run_that_succeeds_hands_its_slot_to_a_run_of_its_process_waiting_for_one(redis_client, redis_server, key):
    # Given a resource capped at 2, one slot held elsewhere, and two runs of the bulk queue: the first
    # holds the other slot, the second queued behind the process's task waiting in Redis
    import json

    from onelane.callout.classify import Reply, Verdict
    from onelane.core.settings import load_settings
    from tests.test_run_steps import begin_on, ok_response

    s = load_settings({"REDIS_URL": redis_server.url, "ONELANE_ALLOW_PRIVATE_NETWORKS": "1",
                       "ONELANE_LIMITS": json.dumps({"acme": {"concurrency": 2}})})

    def begin(task_id):
        return begin_on(s, task_id, "bulk", resource="acme")

    ok = ok_response()
    in_redis = permit(redis_client, 2)
    assert isinstance(in_redis.slots.try_acquire("tok-elsewhere", ttl_ms=TTL_MS), SlotGrant)
    first = begin("t-a")
    check_a = first.preflight()
    assert check_a.grant is not None, "won ahead: the slot was free"
    in_redis.slots.begin_waiting()
    out = {}
    try:
        second = begin("t-b")
        check_b = second.preflight()
        assert check_b.grant is None, "queued behind: no try of its own"

        def run_second():
            with second.permit(check_b) as attempt:
                out["grant"] = attempt.grant
                out["holder"] = redis_client.get(KEYS.lease(attempt.grant.name)).decode()

        thread = threading.Thread(target=run_second)
        thread.start()
        assert wait_until(lambda: handoff.waiting(key) == 1)
        # When the first run's call succeeds and its outcome is recorded
        with first.permit(check_a) as attempt_a:
            first.record_success(attempt_a, Reply(response=ok, started=1.0, elapsed_ms=50.0),
                                 Verdict("succeeded", api_up=True))
        thread.join(timeout=15)
    finally:
        in_redis.slots.end_waiting()
    # Then the second run held the slot, handed on by that transaction, with a newer fence
    assert out["holder"] == check_b.token == out["grant"].token
    assert out["grant"].fence > attempt_a.grant.fence and out["grant"].kept_since == attempt_a.grant.kept_since
    assert redis_client.get(KEYS.done("t-a")) is not None


def test_a_handed_slot_whose_hints_are_early_is_neither_reaped_nor_granted_again(redis_client, client_permit, key,
                                                                                  redis_waiter):
    # Given a slot handed on (its lease index entry and slot set entry keep the first grant's deadline)
    from onelane.coordination.lease import Lease

    holder = client_permit
    first = holder.slots.try_acquire("tok-first", ttl_ms=TTL_MS)
    waiter = LocalWaiter(redis_client, 1, "t11").start(key)
    end_attempt(redis_client, holder, first)
    grant = waiter.grant()
    # When the reaper passes once that early deadline is due, and the slot set's entry says free
    # (as it does once its deadline passes) while the new holder still holds the key
    assert not Lease(redis_client, first.name, keys=KEYS).reap(now_ms=first.deadline_ms + 1)
    redis_client.zadd(KEYS.slots_held("acme"), {"1": 1})
    refused = permit(redis_client, 1).slots.try_acquire("tok-late", ttl_ms=TTL_MS)
    # Then neither takes the slot from its holder: the reaper moved the index entry to the key's
    # expiry, and the try found the key held and was refused (the slot set read again from the keys)
    assert redis_client.get(KEYS.lease(first.name)).decode() == grant.token
    assert redis_client.zscore(KEYS.lease_index, first.name) > first.deadline_ms
    assert isinstance(refused, int)
    assert redis_client.zscore(KEYS.slots_held("acme"), "1") > 1_000_000
