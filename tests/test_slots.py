"""The semaphore of a capped resource against the session's real Redis: the cap, the held-slot
hint that makes a grant O(1), and why a stale hint can never hand one slot to two holders."""
from __future__ import annotations

import json
import threading
import time

import pytest

from onelane.coordination.lease import new_token
from onelane.coordination.lease import Stamp
from onelane.coordination.slots import Semaphore, SlotGrant
from onelane.core.keys import Keys
from onelane.core.limits import Limit

pytestmark = pytest.mark.redis

KEYS = Keys()
TTL_MS = 30_000


def semaphore(client, cap: int, resource: str = "acme", **limit) -> Semaphore:
    return Semaphore(client, KEYS, resource, Limit(concurrency=cap, **limit))


def slot_set(client, resource: str = "acme") -> dict[int, float]:
    """Every slot number in the hint -> its deadline (a free slot i scores i: a time long past)."""
    return {int(m): s for m, s in client.zrange(KEYS.slots_held(resource), 0, -1, withscores=True)}


def hint(client, resource: str = "acme") -> dict[int, float]:
    """The slots the hint says are taken -> their deadlines."""
    return {m: s for m, s in slot_set(client, resource).items() if s > 1_000_000}


def commands(client) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


def test_twenty_threads_never_hold_more_than_the_cap_or_one_slot_twice(redis_client):
    # Given a cap of 5 and 20 threads looping take / hold briefly / release for ~2 s
    sem = semaphore(redis_client, 5)
    guard = threading.Lock()
    held: dict[int, str] = {}
    state = {"max": 0, "grants": 0, "twice": 0}
    errors: list[BaseException] = []
    run_until = time.monotonic() + 2.0

    def contend():
        try:
            while time.monotonic() < run_until:
                got = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
                if not isinstance(got, SlotGrant):
                    time.sleep(0.001)
                    continue
                with guard:
                    state["twice"] += got.slot in held
                    held[got.slot] = got.token
                    state["max"] = max(state["max"], len(held))
                    state["grants"] += 1
                time.sleep(0.002)
                with guard:
                    del held[got.slot]
                sem.release(got)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # Then no slot was ever held twice, the cap held, and the slots kept changing hands
    assert not errors, errors
    assert state["twice"] == 0
    assert state["max"] <= 5
    assert state["grants"] > 100, state
    assert hint(redis_client) == {}, "every release marked its slot free in the hint"
    assert sorted(slot_set(redis_client)) == [1, 2, 3, 4, 5], "the hint holds every slot, free or taken"


def test_a_grant_reads_the_hint_not_every_slot(redis_client):
    # Given a cap of 25 with 10 slots taken
    sem = semaphore(redis_client, 25)
    grants = [sem.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(10)]
    assert all(isinstance(g, SlotGrant) for g in grants)
    redis_client.config_resetstat()
    # When 10 more are taken
    more = [sem.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(10)]
    # Then each grant read one member of the hint and looked at no slot's PTTL (the old grant read 25)
    assert sorted(g.slot for g in grants + more) == list(range(1, 21))
    calls = commands(redis_client)
    assert calls.get("pttl", 0) == 0
    assert calls["zrange"] == 10 and calls.get("zrangebyscore", 0) == 0
    assert sorted(hint(redis_client)) == list(range(1, 21))


def test_a_full_semaphore_refuses_from_one_member_of_the_hint(redis_client):
    # Given a cap of 25, all taken, the soonest slot expiring first
    sem = semaphore(redis_client, 25)
    soonest = sem.try_acquire(new_token(), ttl_ms=5_000)
    rest = [sem.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(24)]
    assert all(isinstance(g, SlotGrant) for g in [soonest, *rest])
    redis_client.config_resetstat()
    # When 10 more tries come
    refusals = [sem.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(10)]
    # Then each is told to wait about until the soonest slot's deadline, read from the hint's lowest
    # member, with no slot's PTTL looked at
    assert all(isinstance(r, int) and 4_000 < r <= 5_000 for r in refusals), refusals
    calls = commands(redis_client)
    assert calls.get("pttl", 0) == 0 and calls["zrange"] == 10


def test_a_hint_for_another_cap_is_rebuilt_from_the_keys(redis_client):
    # Given slots 1..3 held under a cap of 3, then the cap raised to 5 (the hint knows 3 slots)
    small = semaphore(redis_client, 3)
    held = [small.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(3)]
    big = semaphore(redis_client, 5)
    # When the larger semaphore grants twice, then is asked once more
    more = [big.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(3)]
    # Then it handed out slots 4 and 5 only, and its hint is whole: five slots, all taken
    assert [g.slot for g in more[:2]] == [4, 5] and isinstance(more[2], int)
    assert sorted(slot_set(redis_client)) == [1, 2, 3, 4, 5] == sorted(hint(redis_client))
    # and when the cap goes back down to 2, the extra members go from the hint
    for g in held + more[:2]:
        big.release(g)
    assert isinstance(semaphore(redis_client, 2).try_acquire(new_token(), ttl_ms=TTL_MS), SlotGrant)
    assert sorted(slot_set(redis_client)) == [1, 2]


def test_a_lost_hint_never_hands_a_held_slot_to_a_second_holder(redis_client):
    # Given slots 1 and 2 of 3 held, and the hint gone (an older onelane, or a hand-made key)
    sem = semaphore(redis_client, 3)
    first, second = (sem.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(2))
    redis_client.delete(KEYS.slots_held("acme"))
    # When another grant is asked for
    third = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
    # Then it gets the free slot 3: the set was not one member per slot, so the script read every key
    assert isinstance(third, SlotGrant) and third.slot == 3
    assert redis_client.get(KEYS.lease(first.name)).decode() == first.token
    assert redis_client.get(KEYS.lease(second.name)).decode() == second.token
    # and the hint is whole again, so the next grant is refused from it: all 3 are held
    assert sorted(hint(redis_client)) == [1, 2, 3]
    busy = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
    assert isinstance(busy, int) and 0 < busy <= TTL_MS


def test_an_expired_slot_is_free_again_without_a_release(redis_client):
    # Given a cap of 1 whose holder died (its slot's TTL runs out; nobody releases it)
    sem = semaphore(redis_client, 1)
    dead = sem.try_acquire(new_token(), ttl_ms=50)
    assert isinstance(dead, SlotGrant)
    assert isinstance(sem.try_acquire(new_token(), ttl_ms=TTL_MS), int)
    time.sleep(0.1)
    # When another asks after the deadline
    got = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
    # Then it gets the slot, with a larger fencing token
    assert isinstance(got, SlotGrant) and got.slot == 1 and got.fence > dead.fence


def test_a_release_by_a_stale_grant_leaves_the_slot_and_its_hint_alone(redis_client):
    # Given slot 1 taken by a grant that expired, then taken again by a live one
    sem = semaphore(redis_client, 1)
    stale = sem.try_acquire(new_token(), ttl_ms=50)
    time.sleep(0.1)
    live = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
    assert isinstance(live, SlotGrant) and live.slot == stale.slot
    # When the stale grant's holder releases late
    sem.release(stale)
    # Then the live holder keeps the slot, and the hint still counts it
    assert redis_client.get(KEYS.lease(live.name)).decode() == live.token
    assert list(hint(redis_client)) == [1]
    assert isinstance(sem.try_acquire(new_token(), ttl_ms=TTL_MS), int)


def test_a_renewal_moves_the_slots_deadline_in_the_hint(redis_client):
    sem = semaphore(redis_client, 2)
    got = sem.try_acquire(new_token(), ttl_ms=1_000)
    before = hint(redis_client)[got.slot]
    deadline = sem.renew(got, ttl_ms=TTL_MS)
    assert hint(redis_client)[got.slot] == deadline > before + 20_000


def test_the_adaptive_cap_is_read_at_every_grant(redis_client):
    # Given 4 slots whose adaptive cap is down to 2
    sem = semaphore(redis_client, 4, adaptive=True)
    redis_client.hset(KEYS.adaptive("acme"), "cap", "2.7")
    # Then only 2 are granted
    got = [sem.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(3)]
    assert [isinstance(g, SlotGrant) for g in got] == [True, True, False]
    assert got[1].cap == 2


def test_a_lowered_adaptive_cap_holds_even_when_the_hint_misses_a_held_slot(redis_client):
    # Given 4 slots, 3 held, and the hint missing slot 3 (an older onelane took it, or a renewal
    # was cut off), then slots 1 and 2 released and the adaptive cap lowered to 2
    sem = semaphore(redis_client, 4, adaptive=True)
    held = [sem.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(3)]
    redis_client.zadd(KEYS.slots_held("acme"), {"3": 1})
    sem.release(held[0])
    sem.release(held[1])
    redis_client.hset(KEYS.adaptive("acme"), "cap", "2")
    # When two more are asked for
    got = [sem.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(2)]
    # Then only one is granted: slot 3 counts, found from its key
    assert [isinstance(g, SlotGrant) for g in got] == [True, False]
    assert sem.held() == 2


def test_a_dead_holders_slot_released_by_name_is_free_in_the_hint_too(redis_client):
    # Given a cap of 1 held by a worker that died (ONELANE_RELEASE_DEAD_HOLDER=1 frees it at once)
    sem = semaphore(redis_client, 1)
    dead = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
    # When it is released knowing only its lease name and token (the in-flight record)
    assert sem.release_named(dead.name, dead.token)
    # Then the next grant gets it at once: neither the key nor the hint holds it
    assert hint(redis_client) == {}
    assert isinstance(sem.try_acquire(new_token(), ttl_ms=TTL_MS), SlotGrant)
    with pytest.raises(ValueError):
        sem.release_named("resource:other#1", dead.token)


def test_a_try_that_finds_no_slot_records_the_task_as_waiting_due_at_once(redis_client):
    # Given a cap of 1, held
    sem = semaphore(redis_client, 1)
    assert isinstance(sem.try_acquire(new_token(), ttl_ms=TTL_MS), SlotGrant)
    record, index = KEYS.inflight("t2"), KEYS.inflight_index("bulk")
    redis_client.rpush(KEYS.attempts("t2"), "{}")
    # When a task tries for a slot with its whole record
    stamp = Stamp(record, index, "t2", due_in_ms=5_000, fields=("task_id", "t2", "owner", "w9"),
                  attempts_key=KEYS.attempts("t2"))
    assert isinstance(sem.try_acquire(new_token(), ttl_ms=TTL_MS, stamp=stamp), int)
    # Then its record says it waits for a slot (no lease, deadline 0: a dead worker's waiting task is
    # requeued at once), its attempt counted from the ledger
    h = {k.decode(): v.decode() for k, v in redis_client.hgetall(record).items()}
    assert (h["lease"], h["lease_token"], h["deadline_ms"], h["attempt"], h["owner"]) == ("", "", "0", "2", "w9")
    assert redis_client.zscore(index, "t2") == 0


def test_a_grant_stamps_the_in_flight_record_with_its_slot(redis_client):
    # Given an in-flight record written before the wait for a slot
    record, index = KEYS.inflight("t1"), KEYS.inflight_index("bulk")
    redis_client.hset(record, mapping={"task_id": "t1", "lease": "", "lease_token": "", "fence": "0",
                                       "started_ms": "0", "deadline_ms": "0"})
    sem = semaphore(redis_client, 3)
    # When the grant stamps it
    got = sem.try_acquire(new_token(), ttl_ms=TTL_MS, stamp=Stamp(record, index, "t1", due_in_ms=5_000))
    # Then the record names the slot, its token and fence, and the attempt's deadline, in the index too
    h = {k.decode(): v.decode() for k, v in redis_client.hgetall(record).items()}
    assert h["lease"] == got.name and h["lease_token"] == got.token and int(h["fence"]) == got.fence
    assert int(h["started_ms"]) == got.now_ms and int(h["deadline_ms"]) == got.now_ms + 5_000
    assert redis_client.zscore(index, "t1") == got.now_ms + 5_000


def test_a_woken_waiter_has_the_slot_before_a_newcomer_can_ask(redis_client):
    # Given a cap of 1, held, and a task waiting for it with its whole in-flight record
    sem = semaphore(redis_client, 1)
    held = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
    stamp = Stamp(KEYS.inflight("t3"), KEYS.inflight_index("bulk"), "t3", due_in_ms=5_000,
                  fields=("task_id", "t3", "owner", "w9"), attempts_key=KEYS.attempts("t3"))
    out = {}
    waiter = threading.Thread(target=lambda: out.update(got=sem.acquire(new_token(), ttl_ms=TTL_MS,
                                                                        wait_ms=10_000, stamp=stamp)))
    waiter.start()
    time.sleep(0.3)
    # When the holder releases and a newcomer asks the moment the release returns
    sem.release(held)
    newcomer = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
    waiter.join(timeout=15)
    # Then the waiter has the slot: its try rode behind its BLPOP, so Redis ran it as the release's
    # signal ended the wait, before the release's own reply went out (one round trip per wait)
    assert isinstance(newcomer, int)
    grant, waited_ms = out["got"]
    assert isinstance(grant, SlotGrant) and grant.slot == 1 and waited_ms >= 250
    # and its record was written whole by the first try, then stamped with the grant
    h = {k.decode(): v.decode() for k, v in redis_client.hgetall(KEYS.inflight("t3")).items()}
    assert (h["owner"], h["lease_token"], h["fence"]) == ("w9", grant.token, str(grant.fence))


def test_a_wait_after_a_refused_try_ahead_starts_with_the_wait(redis_client):
    # Given a cap of 1, held, and a task whose try ahead (with the preflight) was just refused
    sem = semaphore(redis_client, 1)
    sem.release(sem.try_acquire(new_token(), ttl_ms=TTL_MS))  # both scripts in Redis's cache
    held = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
    refused = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
    assert isinstance(refused, int)
    redis_client.delete(KEYS.slot_signal("acme"))
    redis_client.config_resetstat()
    out = {}
    waiter = threading.Thread(target=lambda: out.update(got=sem.acquire(new_token(), ttl_ms=TTL_MS, wait_ms=10_000,
                                                                        refused_ms=refused)))
    waiter.start()
    time.sleep(0.3)
    # When the holder releases
    sem.release(held)
    waiter.join(timeout=15)
    # Then the task got the slot with one wait and one try (no second try straight after the first)
    grant, _ = out["got"]
    assert isinstance(grant, SlotGrant)
    calls = commands(redis_client)
    assert calls["blpop"] == 1 and calls["evalsha"] == 2, calls  # the wait's try, and the release


def test_a_hint_that_says_a_held_slot_is_free_never_hands_it_out(redis_client):
    # Given slots 1 and 2 of 3 held, and the hint saying slot 1 is free (a holder killed between its
    # key and its hint, or a hand-made change)
    sem = semaphore(redis_client, 3)
    first, second = (sem.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(2))
    redis_client.zadd(KEYS.slots_held("acme"), {"1": 1})
    # When another grant is asked for
    third = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
    # Then slot 1's key said no (SET NX), the script read every key and gave the free slot 3
    assert isinstance(third, SlotGrant) and third.slot == 3
    assert redis_client.get(KEYS.lease(first.name)).decode() == first.token
    # and the hint is right again: all three taken, so the next try is refused from it
    assert sorted(hint(redis_client)) == [1, 2, 3]
    assert isinstance(sem.try_acquire(new_token(), ttl_ms=TTL_MS), int)


def test_an_acquire_tried_again_after_a_refused_try_ahead_writes_the_record_whole(redis_client):
    # Given a cap of 1, held, and a task whose try ahead (queued with its preflight) was refused
    from onelane.callout.permit import SlotPermit
    from onelane.delivery.inflight import Inflight, InflightRecord

    inflight = Inflight(redis_client, KEYS)
    permit = SlotPermit(redis_client, KEYS, "acme", Limit(concurrency=1), inflight)
    other = permit.slots.try_acquire(new_token(), ttl_ms=TTL_MS)
    record = InflightRecord(task_id="t5", queue="bulk", resource="acme", owner="w9", lease="", lease_token="", fence=0,
                            started_ms=0, deadline_ms=0, attempt=0, delivery_tag="tag5", host="h", pid=1, kwargs={})
    pipe = redis_client.pipeline(transaction=False)
    assert permit.speculate(pipe, record, token="tok5", ttl_ms=TTL_MS, timeout_ms=5_000) == 1
    assert permit.speculated(pipe.execute(), token="tok5") is None
    permit.slots.release(other)
    # When its acquire wins the slot, and then (a lost reply, replicas that did not confirm) its
    # acquire runs again after the record was lost
    grant, _ = permit.acquire(record, token="tok5", ttl_ms=TTL_MS, timeout_ms=5_000, redis_now_ms=0, recorded=True)
    permit.release(grant)
    redis_client.delete(KEYS.inflight("t5"))
    again, _ = permit.acquire(record, token="tok6", ttl_ms=TTL_MS, timeout_ms=5_000, redis_now_ms=0, recorded=True)
    # Then the second acquire wrote the whole record, not only the grant's fields
    h = {k.decode(): v.decode() for k, v in redis_client.hgetall(KEYS.inflight("t5")).items()}
    assert (h.get("task_id"), h.get("owner"), h.get("lease_token")) == ("t5", "w9", "tok6")


def test_tries_under_a_lowered_adaptive_cap_count_the_keys_without_rewriting_the_hint(redis_client):
    # Given 4 slots whose adaptive cap is down to 2, both taken
    sem = semaphore(redis_client, 4, adaptive=True)
    redis_client.hset(KEYS.adaptive("acme"), "cap", "2")
    assert all(isinstance(sem.try_acquire(new_token(), ttl_ms=TTL_MS), SlotGrant) for _ in range(2))
    redis_client.config_resetstat()
    # When five more tries come (an overloaded API: many waiters)
    assert all(isinstance(sem.try_acquire(new_token(), ttl_ms=TTL_MS), int) for _ in range(5))
    # Then each read the keys and wrote nothing: no rewrite of the hint per refusal
    calls = commands(redis_client)
    assert calls["pttl"] == 20 and "zadd" not in calls and "del" not in calls, calls


def test_a_newcomer_queues_behind_its_processes_waiters_and_waits_in_its_preflights_round_trip(redis_client):
    # Given an adaptive cap of 1 (whose slots are never handed on: each grant asks the cap), held,
    # and a task of this process waiting for the slot
    from onelane.callout.permit import SlotPermit
    from onelane.coordination import slots
    from onelane.delivery.inflight import Inflight, InflightRecord

    inflight = Inflight(redis_client, KEYS)
    permit = SlotPermit(redis_client, KEYS, "acme", Limit(concurrency=1, adaptive=True), inflight)
    held = permit.slots.try_acquire(new_token(), ttl_ms=TTL_MS)
    out = {}
    waiter = threading.Thread(target=lambda: out.update(
        first=permit.slots.acquire(new_token(), ttl_ms=TTL_MS, wait_ms=10_000)))
    waiter.start()
    assert wait_until(permit.slots.others_waiting), "the first task is waiting"
    time.sleep(0.3)  # its first try was refused: it blocks on the release signal
    # When a newcomer's preflight asks ahead (its round trip: a wait, then a try that writes the record)
    record = InflightRecord(task_id="t7", queue="bulk", resource="acme", owner="w9", lease="", lease_token="",
                            fence=0, started_ms=0, deadline_ms=0, attempt=1, delivery_tag="tag7", host="h", pid=1,
                            kwargs={})
    redis_client.config_resetstat()
    pipe = redis_client.pipeline(transaction=False)
    assert permit.speculate(pipe, record, token="tok7", ttl_ms=TTL_MS, timeout_ms=5_000) == 2
    later = {}

    def preflight():
        try:
            replies = pipe.execute()
        finally:
            later["waited_ms"] = permit.speculation_over()
        later["got"] = permit.speculated(replies, token="tok7")

    newcomer = threading.Thread(target=preflight)
    newcomer.start()
    time.sleep(0.3)
    # Then it made no try before its wait (no script) and wrote nothing (its message is covered by
    # its receiver record meanwhile), and it counts as waiting too (so later newcomers queue behind it)
    calls = commands(redis_client)
    assert "evalsha" not in calls and "hset" not in calls and "zadd" not in calls, calls
    assert slots._waiting[KEYS.slots_held("acme")] == 2
    assert permit.stamps_attempt  # the try after the wait numbers the attempt
    # and when the slot comes free twice, the first waiter has it first and the newcomer after it,
    # woken by the release in the preflight's own round trip (well before its 2 s block ends)
    permit.slots.release(held)
    waiter.join(timeout=15)
    first, _ = out["first"]
    assert newcomer.is_alive(), "the newcomer still waits while the first waiter holds the slot"
    released = time.monotonic()
    permit.slots.release(first)
    newcomer.join(timeout=15)
    grant = later["got"]
    assert isinstance(grant, SlotGrant), grant
    assert time.monotonic() - released < 1.5, "woken by the release, not by its block's end"
    assert later["waited_ms"] >= 300
    assert slots._waiting[KEYS.slots_held("acme")] == 0, "no longer counted as waiting"
    # and the try that won wrote the whole record: the task's, the grant's, numbered from the ledger
    h = {k.decode(): v.decode() for k, v in redis_client.hgetall(KEYS.inflight("t7")).items()}
    assert (h["owner"], h["delivery_tag"], h["lease_token"], h["fence"], h["attempt"]) == \
        ("w9", "tag7", "tok7", str(grant.fence), "1")
    assert redis_client.zscore(KEYS.inflight_index("bulk"), "t7") == int(h["deadline_ms"]) > 0
    # and a second preflight of that task (a paused lane's, one tried again) tries at once, even
    # behind waiters: its wait is over (a second end of the first is a no-op)
    assert permit.speculation_over() == 0.0 and slots._waiting[KEYS.slots_held("acme")] == 0
    permit.slots.begin_waiting()  # another task of this process waits
    try:
        pipe = redis_client.pipeline(transaction=False)
        assert permit.speculate(pipe, record, token="tok8", ttl_ms=TTL_MS, timeout_ms=5_000) == 1
        pipe.reset()
    finally:
        permit.slots.end_waiting()


def test_a_queued_try_refused_after_its_wait_leaves_the_task_on_record_as_waiting(redis_client):
    # Given an adaptive cap of 1 (no handoffs), held, and another task of this process waiting for it
    from onelane.callout.permit import SlotPermit
    from onelane.delivery.inflight import Inflight, InflightRecord

    permit = SlotPermit(redis_client, KEYS, "acme", Limit(concurrency=1, adaptive=True), Inflight(redis_client, KEYS))
    permit.slots.try_acquire(new_token(), ttl_ms=TTL_MS)
    redis_client.rpush(KEYS.attempts("t9"), "an earlier attempt")
    record = InflightRecord(task_id="t9", queue="bulk", resource="acme", owner="w9", lease="", lease_token="",
                            fence=0, started_ms=0, deadline_ms=0, attempt=1, delivery_tag="tag9", host="h", pid=1,
                            kwargs={"url": "u"})
    permit.slots.begin_waiting()
    try:
        # When a newcomer queues behind it and no slot comes free during its preflight's wait
        pipe = redis_client.pipeline(transaction=False)
        assert permit.speculate(pipe, record, token="tok9", ttl_ms=TTL_MS, timeout_ms=5_000) == 2
        try:
            replies = pipe.execute()
        finally:
            permit.speculation_over()
        assert permit.speculated(replies, token="tok9") is None
    finally:
        permit.slots.end_waiting()
    # Then the refused try wrote the task's record: waiting, due at once (the reaper requeues it as
    # soon as its worker is gone), its attempt numbered from the ledger
    h = {k.decode(): v.decode() for k, v in redis_client.hgetall(KEYS.inflight("t9")).items()}
    assert (h["owner"], h["delivery_tag"], h["lease"], h["deadline_ms"], h["attempt"]) == ("w9", "tag9", "", "0", "2")
    assert json.loads(h["kwargs"]) == {"url": "u"}
    assert redis_client.zscore(KEYS.inflight_index("bulk"), "t9") == 0


def test_a_woken_waiter_that_wins_a_slot_wakes_the_next_while_another_slot_is_free(redis_client):
    # Given a cap of 2, both held, and two tasks waiting (each blocks up to 2 s on the release signal)
    sem = semaphore(redis_client, 2)
    first, second = (sem.try_acquire(new_token(), ttl_ms=TTL_MS) for _ in range(2))
    redis_client.delete(KEYS.slot_signal("acme"))
    got, woke = [], {}

    def wait():
        grant, _ = sem.acquire(new_token(), ttl_ms=TTL_MS, wait_ms=10_000, refused_ms=2_000)
        got.append(grant)
        woke[grant.slot] = time.monotonic()

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for w in waiters:
        w.start()
    time.sleep(0.3)
    # When slot 2 comes free without a signal (its holder's lease expired: nobody is told), and then
    # slot 1 is released (one signal: one waiter wakes)
    redis_client.delete(KEYS.lease(second.name))
    redis_client.zadd(KEYS.slots_held("acme"), {"2": 2})
    released = time.monotonic()
    sem.release(first)
    for w in waiters:
        w.join(timeout=15)
    # Then the woken waiter, granted slot 1, passed the wake-up on: the other has slot 2 at once,
    # not when its 2 s block ran out
    assert sorted(g.slot for g in got) == [1, 2]
    assert woke[2] - released < 1.0, f"the second waiter woke {woke[2] - released:.2f} s after the release"


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    give_up = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def test_a_try_again_after_a_lost_reply_is_granted_the_slot_the_lost_try_won_not_a_second(redis_client):
    # Given a try whose reply never came back (sent, run by Redis, the connection lost before the reply)
    sem = semaphore(redis_client, 3)
    token = new_token()
    pipe = redis_client.pipeline(transaction=False)
    sem.queue_try(pipe, token, ttl_ms=TTL_MS)
    pipe.execute()  # the reply is never read: as if lost
    assert sem.held() == 1
    # When the same token tries again
    redis_client.config_resetstat()
    grant = sem.try_acquire(token, ttl_ms=TTL_MS)
    # Then it has the slot the lost try won, with a new fence, and holds one slot, not two
    assert isinstance(grant, SlotGrant) and grant.slot == 1
    assert sem.held() == 1 and redis_client.get(KEYS.lease(grant.name)).decode() == token
    assert commands(redis_client).get("get", 0) >= 1  # it looked for the slot: only on a try again
    # and a try that was answered never looks: the next token's first try reads no slot key
    redis_client.config_resetstat()
    other = sem.try_acquire(new_token(), ttl_ms=TTL_MS)
    assert isinstance(other, SlotGrant) and other.slot == 2 and "get" not in commands(redis_client)
