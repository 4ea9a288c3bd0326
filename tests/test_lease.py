"""The lease against the session's real Redis: exclusion, fencing, expiry, waking, reaping, stealing."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import socket
import threading
import time

import pytest

from onelane.coordination.lease import Grant, Holder, Lease, new_token
from onelane.core.clock import redis_now_ms
from onelane.core.errors import LeaseBusy, LeaseNotHeld
from onelane.core.keys import Keys
from tests.procs import wait_for

pytestmark = pytest.mark.redis

KEYS = Keys()
NAME = "resource:test"


def lease(client, name: str = NAME) -> Lease:
    return Lease(client, name, keys=KEYS)


def index_score(client, name: str = NAME):
    return client.zscore(KEYS.lease_index, name)


# -- exclusion under contention ---------------------------------------------------------------

def test_sixteen_threads_never_hold_the_lease_together(redis_client):
    # Given 16 threads contending for one lease, each looping acquire / hold briefly / release for ~2 s
    guard = threading.Lock()
    state = {"inside": 0, "max_inside": 0, "grants": 0, "busy": 0}
    fences: list[int] = []
    errors: list[BaseException] = []
    run_until = time.monotonic() + 2.0

    def contender():
        lz = lease(redis_client)
        try:
            while time.monotonic() < run_until:
                token = new_token()
                try:
                    grant = lz.acquire(token, ttl_ms=10_000, wait_ms=3_000, label="thread")
                except LeaseBusy:
                    with guard:
                        state["busy"] += 1
                    continue
                with guard:
                    state["inside"] += 1
                    state["max_inside"] = max(state["max_inside"], state["inside"])
                    state["grants"] += 1
                    fences.append(grant.fence)
                time.sleep(0.001)
                with guard:
                    state["inside"] -= 1
                assert lz.release(token) is True
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=contender, name=f"contender-{i}") for i in range(16)]
    # When they all run
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    # Then none is left running, none failed, and never were two inside at once
    assert not [t.name for t in threads if t.is_alive()]
    assert errors == []
    assert state["max_inside"] == 1
    assert state["inside"] == 0
    assert state["grants"] >= 50, state
    # every grant got a larger fencing token than the one before it
    assert all(a < b for a, b in zip(fences, fences[1:]))
    assert lease(redis_client).holder() is None
    print(f"\n16 threads: {state['grants']} grants, {state['busy']} waits ended busy")


def _contend(url: str, name: str, ready, go, run_s: float, out) -> None:
    """One contending process: its own client, loop acquire / hold / release, report intervals."""
    import redis

    client = redis.Redis.from_url(url)
    lz = Lease(client, name, keys=Keys())
    intervals, busy = [], 0
    ready.put(os.getpid())
    if not go.wait(30):
        out.put((os.getpid(), intervals, busy, "never told to go"))
        return
    run_until = time.monotonic() + run_s
    error = None
    try:
        while time.monotonic() < run_until:
            token = new_token()
            try:
                grant = lz.acquire(token, ttl_ms=10_000, wait_ms=3_000, label=f"proc {os.getpid()}")
            except LeaseBusy:
                busy += 1
                continue
            start = time.monotonic_ns()  # CLOCK_MONOTONIC: one clock for every process on this host
            time.sleep(0.002)
            end = time.monotonic_ns()
            if not lz.release(token):
                error = f"release of a held lease refused (fence {grant.fence})"
                break
            intervals.append((start, end, grant.fence))
    except Exception as exc:
        error = repr(exc)
    finally:
        client.close()
    out.put((os.getpid(), intervals, busy, error))


def test_eight_processes_never_hold_the_lease_together_and_fences_grow(redis_client, redis_server):
    # Given 8 spawned processes, each with its own Redis client, contending for one lease for ~2 s
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    workers = [ctx.Process(target=_contend, args=(redis_server.url, NAME, ready, go, 2.0, out), daemon=True)
               for _ in range(8)]
    try:
        for p in workers:
            p.start()
        for _ in workers:
            ready.get(timeout=30)
        # When they start together
        go.set()
        reports = [out.get(timeout=30) for _ in workers]
        for p in workers:
            p.join(timeout=10)
    finally:
        for p in workers:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    # Then every process ran cleanly and got the lease at least once
    assert [r[3] for r in reports] == [None] * 8, reports
    assert all(p.exitcode == 0 for p in workers)
    intervals = sorted(iv for r in reports for iv in r[1])
    assert all(r[1] for r in reports), [len(r[1]) for r in reports]
    assert len(intervals) >= 40
    # no two holding intervals overlap ...
    overlaps = [(a, b) for a, b in zip(intervals, intervals[1:]) if a[1] > b[0]]
    assert overlaps == []
    # ... and in the order they held it, every grant's fencing token is larger than the one before
    fences = [iv[2] for iv in intervals]
    assert all(a < b for a, b in zip(fences, fences[1:])), fences
    assert lease(redis_client).fence() == max(fences)
    print(f"\n8 processes: {len(intervals)} grants, {sum(r[2] for r in reports)} waits ended busy")


# -- ownership ----------------------------------------------------------------------------------

def test_release_by_a_non_owner_is_refused_and_the_lease_stays_held(redis_client):
    lz = lease(redis_client)
    owner, other = new_token(), new_token()
    lz.acquire(owner, ttl_ms=10_000)
    assert lz.release(other) is False
    assert redis_client.get(KEYS.lease(NAME)).decode() == owner
    assert lz.holder().token == owner
    assert index_score(redis_client) is not None
    # the owner can still release it, once
    assert lz.release(owner) is True
    assert lz.holder() is None and index_score(redis_client) is None
    assert lz.release(owner) is False


def test_renew_by_a_non_owner_raises_lease_not_held(redis_client):
    lz = lease(redis_client)
    owner, other = new_token(), new_token()
    grant = lz.acquire(owner, ttl_ms=10_000)
    with pytest.raises(LeaseNotHeld) as info:
        lz.renew(other, ttl_ms=60_000)
    assert NAME in str(info.value) and owner[:8] in str(info.value)
    # the owner's lease is untouched (not extended to 60 s)
    assert lz.holder().token == owner
    assert 0 < redis_client.pttl(KEYS.lease(NAME)) <= 10_000
    # and the owner's own renew works and moves the index deadline
    deadline = lz.renew(owner, ttl_ms=20_000)
    assert deadline > grant.deadline_ms
    assert index_score(redis_client) == deadline
    assert 10_000 < redis_client.pttl(KEYS.lease(NAME)) <= 20_000


def test_renew_after_expiry_raises_lease_not_held(redis_client):
    lz = lease(redis_client)
    owner = new_token()
    lz.acquire(owner, ttl_ms=100)
    wait_for(lambda: redis_client.exists(KEYS.lease(NAME)) == 0, 5, 0.02, "the lease to expire")
    with pytest.raises(LeaseNotHeld, match="expired"):
        lz.renew(owner, ttl_ms=10_000)
    assert lz.holder() is None


# -- expiry -------------------------------------------------------------------------------------

def test_an_expired_lease_can_be_taken_by_another_token(redis_client):
    lz = lease(redis_client)
    first, second = new_token(), new_token()
    g1 = lz.acquire(first, ttl_ms=200)
    # while it lives, another token is told who holds it
    busy = lz.try_acquire(second, ttl_ms=10_000)
    assert isinstance(busy, Holder) and busy.token == first and 0 < busy.pttl_ms <= 200
    # after its expiry, another token gets it (waiting on it, bounded)
    t0 = time.monotonic()
    g2 = lz.acquire(second, ttl_ms=10_000, wait_ms=3_000)
    waited = time.monotonic() - t0
    assert g2.token == second and g2.fence == g1.fence + 1
    assert waited < 1.5  # it looked again when the expiry was due, not at the end of the wait
    assert g2.now_ms >= g1.deadline_ms
    assert lz.release(first) is False  # the expired holder cannot release the new grant
    assert lz.holder().token == second


# -- fencing ------------------------------------------------------------------------------------

def test_the_fence_grows_with_every_grant_and_a_regrant_to_the_same_token_keeps_it(redis_client):
    lz = lease(redis_client)
    a, b = new_token(), new_token()
    assert lz.fence() == 0
    before_us = int(redis_client.time()[0]) * 1_000_000
    g1 = lz.acquire(a, ttl_ms=10_000)
    # a new counter starts from the Redis clock, in microseconds
    assert g1.fence == lz.fence() and g1.fence > before_us
    # a re-grant to the holder keeps its fence (and its "since")
    since = lz.holder().since_ms
    again = lz.try_acquire(a, ttl_ms=10_000)
    assert isinstance(again, Grant) and again.fence == g1.fence and lz.fence() == g1.fence
    assert lz.holder().since_ms == since
    assert lz.release(a)
    g2 = lz.acquire(b, ttl_ms=10_000)
    assert lz.release(b)
    g3 = lz.acquire(a, ttl_ms=10_000)  # the same token again, after a release: a new grant
    assert [g2.fence, g3.fence] == [g1.fence + 1, g1.fence + 2] and lz.fence() == g3.fence
    # a holder's refusal does not bump the counter
    assert isinstance(lz.try_acquire(b, ttl_ms=10_000), Holder)
    assert lz.fence() == g3.fence


def test_fences_are_per_lease(redis_client):
    one, two = lease(redis_client, "resource:one"), lease(redis_client, "resource:two")
    f1 = one.acquire(new_token(), ttl_ms=10_000).fence
    f2 = two.acquire(new_token(), ttl_ms=10_000).fence
    assert one.fence() == f1 and two.fence() == f2
    assert one.acquire(one.holder().token, ttl_ms=10_000).fence == f1  # each counts only its own grants


def test_fences_never_go_backwards_when_redis_loses_its_data(redis_client):
    lz = lease(redis_client)
    fences = []
    for _ in range(3):
        t = new_token()
        fences.append(lz.acquire(t, ttl_ms=10_000).fence)
        lz.release(t)
    # When Redis comes back empty (its data lost)
    redis_client.flushdb()
    time.sleep(0.002)
    t = new_token()
    after = lz.acquire(t, ttl_ms=10_000).fence
    # Then the next token is still above every token granted before
    assert after > max(fences), (fences, after)


# -- the quick grant (plain commands, no script) ------------------------------------------------

def quick(client, token: str, *, ttl_ms: int = 10_000, label: str = "task q", name: str = NAME) -> Grant | None:
    """One quick try, as the preflight makes it: its commands in one pipeline, then its reply read."""
    lz = lease(client, name)
    now_ms = redis_now_ms(client)
    pipe = client.pipeline(transaction=False)
    n = lz.queue_quick_acquire(pipe, token, ttl_ms=ttl_ms, label=label, now_ms=now_ms)
    return lz.quick_reply(token, pipe.execute()[:n], ttl_ms=ttl_ms, now_ms=now_ms)


def test_a_quick_grant_is_the_same_lease_with_its_holder_in_its_value(redis_client):
    # Given a lease whose fencing counter exists (granted once before)
    lz = lease(redis_client)
    first = lz.acquire(new_token(), ttl_ms=10_000)
    lz.release(first.token)
    redis_client.config_resetstat()
    # When a quick try finds it free
    t = new_token()
    g = quick(redis_client, t, label="task t9")
    # Then it is granted, with the next fence, no script run, and its holder readable as ever
    assert isinstance(g, Grant) and g.token == t and g.fence == first.fence + 1 == lz.fence()
    assert "cmdstat_evalsha" not in redis_client.info("commandstats")
    h = lz.holder()
    assert (h.token, h.host, h.pid, h.label) == (t, socket.gethostname(), os.getpid(), "task t9")
    assert 0 < h.pttl_ms <= 10_000 and abs(h.since_ms - g.now_ms) < 5_000
    assert index_score(redis_client) == g.deadline_ms
    # and every script reads it: another token is refused and told who holds it, a renewal and a
    # release compare its token, and only its token's
    other = lz.try_acquire(new_token(), ttl_ms=10_000)
    assert isinstance(other, Holder) and (other.token, other.label, other.pid) == (t, "task t9", os.getpid())
    with pytest.raises(LeaseNotHeld):
        lz.renew(new_token(), ttl_ms=10_000)
    assert lz.renew(t, ttl_ms=20_000) > g.deadline_ms
    assert lz.release(new_token()) is False and lz.holder().token == t
    assert lz.release(t) is True and lz.holder() is None and index_score(redis_client) is None


def test_a_quick_try_on_a_held_lease_leaves_its_holder_and_index_entry_alone(redis_client):
    # Given a lease held by another token (granted by the script)
    lz = lease(redis_client)
    held = lz.acquire(new_token(), ttl_ms=30_000, label="task holder")
    score = index_score(redis_client)
    # When a quick try comes
    assert quick(redis_client, new_token(), ttl_ms=60_000) is None
    # Then the holder, its expiry and its index entry stand; the fence only counted up (still growing)
    h = lz.holder()
    assert (h.token, h.label) == (held.token, "task holder") and h.pttl_ms <= 30_000
    assert index_score(redis_client) == score
    assert lz.fence() == held.fence + 1
    lz.release(held.token)
    assert lz.acquire(new_token(), ttl_ms=10_000).fence == held.fence + 2


def test_a_quick_try_again_after_a_lost_reply_leaves_the_grant_to_the_script_which_sets_the_expiry_anew(
        redis_client):
    lz = lease(redis_client)
    lz.release(lz.acquire(new_token(), ttl_ms=10_000).token)
    t = new_token()
    first = quick(redis_client, t, ttl_ms=1_000)
    time.sleep(0.3)
    # the first reply was lost: the same token tries again, a while later
    lz_name = KEYS.lease(NAME)
    pipe = redis_client.pipeline(transaction=False)
    n = lz.queue_quick_acquire(pipe, t, ttl_ms=1_000, label="task q", now_ms=redis_now_ms(redis_client))
    replies = pipe.execute()[:n]
    # Then it holds the lease but counts no grant: its expiry still runs from the first try ...
    assert lz.quick_reply(t, replies, ttl_ms=1_000, now_ms=0) is None and Lease.quick_held(t, replies)
    assert redis_client.pttl(lz_name) <= 700
    # ... and the script grants it to the same token, with a whole new expiry and a higher fence
    again = lz.try_acquire(t, ttl_ms=1_000)
    assert isinstance(again, Grant) and again.token == t and again.fence > first.fence
    assert redis_client.pttl(lz_name) > 900 and lz.holder().token == t


def test_a_quick_grant_leaves_a_new_counter_to_the_script_and_fences_never_go_backwards(redis_client):
    # Given a lease granted quickly a few times
    lz = lease(redis_client)
    lz.release(lz.acquire(new_token(), ttl_ms=10_000).token)
    fences = []
    for _ in range(3):
        g = quick(redis_client, new_token())
        fences.append(g.fence)
        lz.release(g.token)
    # When Redis comes back empty (its data lost), and a quick try finds the lease free
    redis_client.flushdb()
    time.sleep(0.002)
    t = new_token()
    # Then that try counts as not granted, though it holds the lease (its counter started from 1) ...
    assert quick(redis_client, t) is None and lz.holder().token == t
    # ... and the script grants it to the same token with the counter started from the Redis clock
    g = lz.try_acquire(t, ttl_ms=10_000)
    assert isinstance(g, Grant) and g.fence > max(fences) and lz.fence() == g.fence


# -- waiting ------------------------------------------------------------------------------------

def _blocked_on_signal(client, name: str) -> bool:
    return any(c.get("cmd") == "blpop" for c in client.client_list())


def test_a_waiter_wakes_promptly_on_release_not_at_expiry(redis_client):
    # Given a holder with a 10 s lease and a waiter allowed to wait 8 s
    lz = lease(redis_client)
    holder, waiter = new_token(), new_token()
    lz.acquire(holder, ttl_ms=10_000)
    got: dict = {}

    def wait():
        try:
            got["grant"] = lease(redis_client).acquire(waiter, ttl_ms=10_000, wait_ms=8_000)
        except BaseException as exc:
            got["error"] = exc
        got["at"] = time.monotonic()

    t = threading.Thread(target=wait)
    t.start()
    try:
        # the waiter blocks on the release signal (a BLPOP), it does not poll
        wait_for(lambda: _blocked_on_signal(redis_client, NAME), 5, 0.01, "the waiter to block on BLPOP")
        time.sleep(0.1)
        assert "grant" not in got and "error" not in got
        # When the holder releases
        released_at = time.monotonic()
        assert lz.release(holder) is True
    finally:
        t.join(timeout=10)
    assert not t.is_alive()
    # Then the waiter has the lease well within 200 ms, 10 s before the holder's expiry
    assert "error" not in got, got.get("error")
    assert got["grant"].token == waiter
    woke_after = got["at"] - released_at
    assert woke_after < 0.2, woke_after
    print(f"\nwaiter got the lease {woke_after * 1000:.1f} ms after the release")


def test_lease_busy_when_the_wait_ends_names_the_holder(redis_client):
    lz = lease(redis_client)
    holder = new_token()
    lz.acquire(holder, ttl_ms=10_000, label="task abc attempt 1")
    t0 = time.monotonic()
    with pytest.raises(LeaseBusy) as info:
        lz.acquire(new_token(), ttl_ms=10_000, wait_ms=300)
    waited = time.monotonic() - t0
    assert 0.25 <= waited < 2.0, waited
    msg = str(info.value)
    assert NAME in msg
    assert "task abc attempt 1" in msg
    assert socket.gethostname() in msg
    assert f"pid {os.getpid()}" in msg
    assert "expires in" in msg
    # the holder is unaffected
    assert lz.holder().token == holder


def test_lease_busy_at_once_without_a_wait(redis_client):
    lz = lease(redis_client)
    lz.acquire(new_token(), ttl_ms=10_000)
    t0 = time.monotonic()
    with pytest.raises(LeaseBusy):
        lz.acquire(new_token(), ttl_ms=10_000)
    assert time.monotonic() - t0 < 0.5


def test_should_stop_ends_the_wait_early(redis_client):
    lz = lease(redis_client)
    lz.acquire(new_token(), ttl_ms=10_000)
    calls = []

    def stop():
        calls.append(1)
        return True

    t0 = time.monotonic()
    with pytest.raises(LeaseBusy):
        lz.acquire(new_token(), ttl_ms=10_000, wait_ms=8_000, should_stop=stop)
    assert time.monotonic() - t0 < 1.0 and calls


# -- reaping ------------------------------------------------------------------------------------

def test_reap_clears_an_expired_leases_index_entry_and_leaves_a_live_one(redis_client):
    dead, live = lease(redis_client, "resource:dead"), lease(redis_client, "resource:live")
    g_dead = dead.acquire(new_token(), ttl_ms=100)
    g_live = live.acquire(new_token(), ttl_ms=10_000)
    wait_for(lambda: redis_client.exists(KEYS.lease("resource:dead")) == 0, 5, 0.02, "the short lease to expire")
    assert index_score(redis_client, "resource:dead") == g_dead.deadline_ms  # the zombie's entry

    # not yet due (now before its deadline): left alone
    assert dead.reap(now_ms=g_dead.deadline_ms - 1) is False
    assert index_score(redis_client, "resource:dead") == g_dead.deadline_ms
    # due: cleared, holder description gone
    assert dead.reap(now_ms=g_dead.deadline_ms + 1) is True
    assert index_score(redis_client, "resource:dead") is None
    assert not redis_client.exists(KEYS.lease_holder("resource:dead"))
    # a second run finds nothing to do
    assert dead.reap(now_ms=g_dead.deadline_ms + 1) is False

    # a live lease, even seen from "the future", is not cleared; its entry is corrected from its real expiry
    future = g_live.deadline_ms + 60_000
    assert live.reap(now_ms=future) is False
    assert live.holder().token == g_live.token
    score = index_score(redis_client, "resource:live")
    assert score is not None and future < score <= future + 10_000
    # and a live lease that is not yet due is not touched at all
    assert live.reap(now_ms=redis_now_ms(redis_client)) is False
    assert index_score(redis_client, "resource:live") == score


def test_the_dead_leases_name_is_free_again_after_reaping(redis_client):
    dead = lease(redis_client)
    g = dead.acquire(new_token(), ttl_ms=100)
    wait_for(lambda: redis_client.exists(KEYS.lease(NAME)) == 0, 5, 0.02, "the lease to expire")
    assert dead.reap(now_ms=redis_now_ms(redis_client)) is True
    g2 = dead.acquire(new_token(), ttl_ms=10_000)
    assert g2.fence == g.fence + 1 and index_score(redis_client) == g2.deadline_ms


# -- stealing -----------------------------------------------------------------------------------

def test_steal_takes_over_only_from_the_named_token(redis_client):
    lz = lease(redis_client)
    holder, thief, stranger = new_token(), new_token(), new_token()
    g1 = lz.acquire(holder, ttl_ms=10_000)
    # naming some other token does not take it
    refused = lz.try_acquire(thief, ttl_ms=10_000, steal=stranger)
    assert isinstance(refused, Holder) and refused.token == holder
    assert lz.holder().token == holder and lz.fence() == g1.fence
    # naming the holder does, with a new fence
    g2 = lz.try_acquire(thief, ttl_ms=10_000, steal=holder)
    assert isinstance(g2, Grant) and g2.token == thief and g2.fence == g1.fence + 1
    assert lz.holder().token == thief
    # the old holder can neither release nor renew any more
    assert lz.release(holder) is False
    with pytest.raises(LeaseNotHeld):
        lz.renew(holder, ttl_ms=10_000)
    assert lz.holder().token == thief
    # and a steal naming a token that no longer holds it does not take it from the new holder
    assert isinstance(lz.try_acquire(stranger, ttl_ms=10_000, steal=holder), Holder)
    assert lz.holder().token == thief


def test_a_lease_needs_a_name(redis_client):
    with pytest.raises(ValueError):
        Lease(redis_client, "", keys=KEYS)


def test_a_grant_writes_the_in_flight_record_it_is_for_granted_or_not(redis_client):
    # Given two finished attempts of task t1 in its ledger
    from onelane.coordination.lease import Stamp

    redis_client.rpush(KEYS.attempts("t1"), "{}", "{}")
    record, index = KEYS.inflight("t1"), KEYS.inflight_index("serial")

    def stamp():
        return Stamp(record, index, "t1", due_in_ms=5_000, fields=("task_id", "t1", "owner", "w1"),
                     attempts_key=KEYS.attempts("t1"))

    def read() -> dict:
        return {k.decode(): v.decode() for k, v in redis_client.hgetall(record).items()}

    # When the lease is granted with the record stamped in the same script
    mine, other = new_token(), new_token()
    pipe = redis_client.pipeline(transaction=False)
    lease(redis_client).queue_acquire(pipe, mine, ttl_ms=10_000, stamp=stamp())
    grant = lease(redis_client).acquire_reply(mine, pipe.execute()[0])
    # Then the record holds the grant's lease, token, fence and start, attempt 3, due 5 s after the grant
    assert isinstance(grant, Grant)
    h = read()
    assert (h["lease"], h["lease_token"], int(h["fence"])) == (NAME, mine, grant.fence)
    assert int(h["started_ms"]) == grant.now_ms and int(h["deadline_ms"]) == grant.now_ms + 5_000
    assert h["attempt"] == "3" and h["task_id"] == "t1" and h["owner"] == "w1"
    assert redis_client.zscore(index, "t1") == grant.now_ms + 5_000
    # And when another token tries while it is held, the record is still written, with no fence
    pipe = redis_client.pipeline(transaction=False)
    lease(redis_client).queue_acquire(pipe, other, ttl_ms=10_000, stamp=stamp())
    assert isinstance(lease(redis_client).acquire_reply(other, pipe.execute()[0]), Holder)
    h = read()
    assert h["lease_token"] == other and h["fence"] == "0" and h["attempt"] == "3"


@pytest.mark.parametrize("script", ["lease_acquire", "semaphore_acquire"])
def test_the_scripts_hold_the_fence_floor_lease_py_holds(script):
    """A quick grant's counter is re-seeded by whichever script sees it below the floor: one number."""
    from importlib import resources

    from onelane.coordination.lease import FENCE_FLOOR

    source = resources.files("onelane.coordination").joinpath("lua", f"{script}.lua").read_text()
    declared = re.search(r"^local FENCE_FLOOR = (\S+)$", source, re.M)
    assert declared and float(declared.group(1)) == FENCE_FLOOR
    assert "if fence < FENCE_FLOOR then" in source
