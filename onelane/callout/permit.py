"""Permits: the right to make one attempt on a resource.

A serial resource (the default) has one lease: one attempt at a time, anywhere. A capped
resource (declared in ONELANE_LIMITS) has N slots, optionally a global rate and an
adaptive cap. Both are :class:`Permit`\\ s with the same three steps, so the callout does
not care which it holds:

* :meth:`Permit.acquire` waits as long as it must (blocking on Redis release signals,
  never polling), records the attempt in flight, and returns the grant whose fencing
  token goes to the API;
* :meth:`Permit.feedback` tells the permit how the API coped (the adaptive cap and the
  rate limit learn from it);
* :meth:`Permit.release` frees it, directly or queued on the transaction that records
  the outcome.

Guarantees: the in-flight record exists before any attempt starts (for a capped resource
even before the wait for a slot, so the reaper finds a dead worker's waiting task at
once); a grant is held at most its TTL (the attempt's deadline plus the lease grace).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Protocol

from onelane.callout.classify import Reply, overloaded, retry_after_s
from onelane.coordination import handoff
from onelane.coordination.adaptive import Adaptive
from onelane.coordination.lease import Grant, Lease
from onelane.coordination.rate import RateLimiter
from onelane.coordination.slots import QUEUED_MS, Semaphore, SlotGrant
from onelane.core import counters
from onelane.core.keys import Keys
from onelane.core.clock import estimated_redis_now_ms
from onelane.core.limits import Limit
from onelane.core.replication import Replicas
from onelane.core.settings import MAX_CALLOUT_TIMEOUT_S
from onelane.delivery.inflight import Inflight, InflightRecord

#: the longest anyone waits for a permit: a holder never keeps it longer than this
MAX_WAIT_MS = int(MAX_CALLOUT_TIMEOUT_S * 1000)
#: the early in-flight record's deadline is this much later than the estimate: it only says
#: when the reaper may requeue, and late is the safe side
_EARLY_DEADLINE_SLACK_MS = 100


class Permit(Protocol):
    #: True for a capped resource (its result reports the time waited for a slot)
    capped: bool

    def speculate(self, pipe, record: InflightRecord, *, token: str, ttl_ms: int, timeout_ms: int) -> int:
        """Queue a first try for the permit, with the in-flight record, on the preflight's pipeline;
        return how many replies it adds (0: this permit does not try ahead). The try may follow a
        wait for a release in the same round trip (at most 2 s: a slot, queued behind this process's
        waiters)."""

    def speculated(self, replies: list, *, token: str) -> Grant | None:
        """The grant the queued try won, or None (the permit is busy: :meth:`acquire` waits)."""

    def speculation_over(self) -> float:
        """The preflight's round trip ended, replied or not (called whatever happened, after each
        :meth:`speculate` or its attempt; a second call is a no-op); return the ms the queued try
        waited for the permit in it (0: no wait)."""

    def acquire(self, record: InflightRecord, *, token: str, ttl_ms: int, timeout_ms: int,
                redis_now_ms: int, recorded: bool = False) -> tuple[Grant, float]:
        """Wait for the permit and record the attempt in flight; return (grant, ms waited).

        ``recorded``: the try queued by :meth:`speculate` wrote ``record`` whole and it stands, so the
        grant only stamps its lease, token, fence and deadline into it."""

    def feedback(self, reply: Reply, *, retry_after_max_s: float) -> None:
        """Learn from the attempt's reply."""

    def queue_counts(self, pipe, *, waited_ms: float, lane: str) -> None:
        """Queue, on the transaction recording an attempt's outcome, what this permit counts per grant."""

    def release(self, grant: Grant, *, pipe=None) -> None:
        """Free the permit if ``grant`` still holds it (queued on ``pipe`` when given)."""

    def hand_off(self, grant: Grant, *, pipe) -> Callable[[list | None], None]:
        """Queue on ``pipe`` (the transaction recording the attempt's success) the end of ``grant``:
        its release, or a slot's handoff to a task of this process waiting for one. Returns what to
        call with the transaction's replies once it ran, or with None if it failed."""

    def release_try(self, token: str, *, pipe) -> None:
        """Queue on ``pipe`` the release of whatever a try ahead with ``token`` holds without a grant."""

    @property
    def stamps_attempt(self) -> bool:
        """Whether the try ahead numbered the attempt in its in-flight record itself (from the count
        of finished attempts, read in the same step) rather than taking the run's expectation."""


class SerialPermit:
    """The resource's one lease: one attempt at a time across every worker and host."""

    capped = False

    def __init__(self, client, keys: Keys, resource: str, inflight: Inflight, *, wait_ms: int = MAX_WAIT_MS,
                 wait_grace_ms: int = 0, replicas: Replicas = Replicas()):
        self.lease = Lease(client, keys.resource_lease(resource), keys=keys, replicas=replicas)
        self.inflight = inflight
        self.replicas = replicas
        self.wait_ms = wait_ms + wait_grace_ms
        #: (estimated Redis now, ttl) of the try ahead in plain commands; None: by the script
        self._quick: tuple[int, int] | None = None
        #: the try ahead holds the lease but won no grant: the acquire script grants it (or a give-back frees it)
        self._held_ungranted = False

    def speculate(self, pipe, record, *, token, ttl_ms, timeout_ms):
        # Usually the lease is free: the grant and the in-flight record travel with the
        # preflight's reads (one round trip for everything before the attempt), written granted
        # or not. In plain commands once this process knows the Redis clock (the record's start and
        # deadline are estimates on it, the deadline late on purpose); before that, by the acquire
        # script, which reads the clock itself.
        label = f"task {record.task_id}"
        now_ms = estimated_redis_now_ms()
        self._quick = None if now_ms is None else (now_ms, ttl_ms)
        if now_ms is None:
            stamp = self.inflight.stamp(record, due_in_ms=timeout_ms + _EARLY_DEADLINE_SLACK_MS)
            self.lease.queue_acquire(pipe, token, ttl_ms=ttl_ms, label=label, stamp=stamp)
            return 1
        n = self.lease.queue_quick_acquire(pipe, token, ttl_ms=ttl_ms, label=label, now_ms=now_ms)
        self.inflight.record(replace(record, lease=self.lease.name, lease_token=token, fence=0, started_ms=now_ms,
                                     deadline_ms=now_ms + timeout_ms + _EARLY_DEADLINE_SLACK_MS), pipe=pipe)
        return n + 2

    def speculated(self, replies, *, token):
        self._held_ungranted = False
        if self._quick is not None:
            now_ms, ttl_ms = self._quick
            got = self.lease.quick_reply(token, replies[:4], ttl_ms=ttl_ms, now_ms=now_ms)
            self._held_ungranted = got is None and self.lease.quick_held(token, replies[:4])
            return got
        got = self.lease.acquire_reply(token, replies[0])
        return got if isinstance(got, Grant) else None

    def speculation_over(self):
        return 0.0  # the try ahead never waits: a busy lease is rare (a killed attempt's), acquire blocks

    @property
    def stamps_attempt(self) -> bool:
        return self._quick is None  # the script counted the attempt; plain commands wrote the run's

    def acquire(self, record, *, token, ttl_ms, timeout_ms, redis_now_ms, recorded=False):
        # (a busy lease is rare, after a kill: the record is written whole again either way)
        label = f"task {record.task_id} attempt {record.attempt}"
        # The in-flight record travels with the acquire (one round trip). Its deadline is an
        # estimate on the Redis clock, a little late on purpose.
        early = replace(record, lease=self.lease.name, lease_token=token, started_ms=redis_now_ms,
                        deadline_ms=redis_now_ms + timeout_ms + _EARLY_DEADLINE_SLACK_MS)
        got = self.lease.try_acquire(token, ttl_ms=ttl_ms, label=label,
                                     along=lambda pipe: self.inflight.record(early, pipe=pipe))
        if isinstance(got, Grant):
            return got, 0.0
        # Busy (a killed attempt's lease runs to its deadline): block on the release signal.
        grant = self.lease.acquire(token, ttl_ms=ttl_ms, wait_ms=self.wait_ms, label=label)
        pipe = self.lease.client.pipeline(transaction=True)
        self.inflight.record(record.granted(grant, deadline_ms=grant.now_ms + timeout_ms), pipe=pipe)
        pipe.execute()
        return grant, 0.0

    def feedback(self, reply, *, retry_after_max_s):
        pass  # one at a time already: nothing to adapt

    def queue_counts(self, pipe, *, waited_ms, lane):
        pass  # nothing counted per grant

    def release(self, grant, *, pipe=None):
        self.lease.release(grant.token, pipe=pipe)

    def hand_off(self, grant, *, pipe):
        self.lease.release(grant.token, pipe=pipe)  # one holder at a time: nobody of this process waits
        return _nothing_to_tell

    def release_try(self, token, *, pipe):
        # a quick try may hold the lease without a grant (a new counter, or a try again of its own)
        if self._held_ungranted:
            self.lease.release(token, pipe=pipe)


class SlotPermit:
    """A slot of a capped resource: at most N at once, at most its rate, N lowered under overload."""

    capped = True

    def __init__(self, client, keys: Keys, resource: str, limit: Limit, inflight: Inflight, *,
                 wait_ms: int = MAX_WAIT_MS, replicas: Replicas = Replicas()):
        self.client = client
        self.keys = keys
        self.resource = resource
        self.inflight = inflight
        self.wait_ms = wait_ms
        self.replicas = replicas
        self.slots = Semaphore(client, keys, resource, limit, replicas=replicas)
        self.rate = RateLimiter(client, keys, resource, limit.rate_per_s) if limit.rate_per_s else None
        self.adaptive = Adaptive(client, keys, resource, limit.concurrency) if limit.adaptive else None
        self._refused_ms: int | None = None
        #: slots are handed on between this process's tasks (not under an adaptive cap or a rate, which
        #: every grant must ask, nor with replicas to confirm each grant)
        self._handoffs = not limit.adaptive and not limit.rate_per_s and replicas.needed <= 0
        #: the preflight queued this task behind the process's waiters: it waits for a handoff first
        self._local = False
        #: monotonic time the queued preflight began to wait (counted as waiting till it is over)
        self._queued_at: float | None = None
        #: the last preflight waited for a slot: the next one (a paused lane's, a try again) tries at once
        self._waited_last = False

    def speculate(self, pipe, record, *, token, ttl_ms, timeout_ms):
        if self.rate is not None:
            return 0  # the rate is asked for while the slot is held: only once the attempt is sure
        self._local = False
        # a token whose try went unanswered may hold a slot: it tries at once (granted that slot again)
        queued = self.slots.others_waiting() and not self._waited_last and not self.slots.may_hold(token)
        self._waited_last = False
        if queued and self._handoffs:
            # Another task of this process waits for a slot in Redis: this one waits in the process for
            # a slot one of its tasks hands on (acquire), with no Redis step before its attempt
            self._local = True
            return 0
        stamp = self.inflight.stamp(record, due_in_ms=timeout_ms + _EARLY_DEADLINE_SLACK_MS)
        if queued:
            # Another task of this process waits for a slot: a try now would most likely be refused,
            # and a try is a script, the dearest step of a capped callout. The task queues behind:
            # its first wait for a release, and the try that follows it, are in the preflight's round
            # trip too (its reads come first; a grant is given back if they say the attempt must not
            # start). It counts as waiting meanwhile, so newcomers queue behind it in turn. The try
            # writes the in-flight record, granted or not (waiting, due at once), as a first try
            # does; during the wait before it the message is covered as before any attempt: by its
            # worker's fetch list, or (taken by the script) by its receiver record on the bulk
            # queue and as an unacked message nobody claims on a lane.
            n = self.slots.queue_try(pipe, token, ttl_ms=ttl_ms, stamp=stamp, after_wait_ms=QUEUED_MS)
            self.slots.begin_waiting()
            self._queued_at = time.monotonic()
            return n
        # Usually a slot is free: the grant and the in-flight record travel with the preflight's
        # reads, as for a serial lease (given back if the preflight finds the attempt must not start)
        return self.slots.queue_try(pipe, token, ttl_ms=ttl_ms, stamp=stamp)

    def speculated(self, replies, *, token):
        got = self.slots.grant_of(replies[-1], token)
        #: the refusal of the try ahead (ms until the soonest slot expires), so acquire waits first
        self._refused_ms = None if isinstance(got, SlotGrant) else got
        if isinstance(got, SlotGrant):
            self.slots.keep_one_waiting()
        return got if isinstance(got, SlotGrant) else None

    def speculation_over(self):
        if self._queued_at is None:
            return 0.0
        waited_ms = (time.monotonic() - self._queued_at) * 1000
        self.slots.end_waiting()
        self._queued_at = None
        self._waited_last = True
        return waited_ms

    def acquire(self, record, *, token, ttl_ms, timeout_ms, redis_now_ms, recorded=False):
        # The in-flight record is written by the first try for a slot, granted or not (a waiting task
        # of a dead worker comes back at once), and stamped with the slot, fence and deadline by the
        # try that wins: one round trip when a slot is free. A try ahead that found none wrote it, and
        # was refused a moment ago: the wait comes first then, not a second try straight away.
        # Both hold once: an acquire tried again (a lost connection, replicas that did not confirm)
        # may follow a grant that stamped the record, so it writes the record whole and tries first.
        stamp = self.inflight.stamp(record, due_in_ms=timeout_ms + _EARLY_DEADLINE_SLACK_MS)
        local_ms, wait_first_ms = 0.0, None
        if self._local:  # queued behind this process's waiters: a slot handed on by one of its tasks
            self._local = False
            started = time.monotonic()
            waiter = self.slots.wait_handed(token, ttl_ms=ttl_ms, stamp=stamp, budget_ms=self.wait_ms)
            local_ms = (time.monotonic() - started) * 1000
            if waiter.outcome == handoff.HANDED:
                return waiter.grant, local_ms
            if waiter.outcome == handoff.WAIT:  # in place of the process's waiter in Redis: every slot is held
                wait_first_ms = QUEUED_MS
        refused_ms, self._refused_ms = self._refused_ms, None
        if recorded and refused_ms is not None:
            stamp = replace(stamp, fields=())
        else:
            refused_ms = wait_first_ms
        grant, waited_ms = self.slots.acquire(token, ttl_ms=ttl_ms, wait_ms=max(1, int(self.wait_ms - local_ms)),
                                              stamp=stamp, refused_ms=refused_ms)
        waited_ms += local_ms
        if self.rate is not None:
            # the rate is checked while holding the slot, so starts never bunch up above the rate
            rate_wait_ms = self.rate.acquire()
            if rate_wait_ms > 0:
                waited_ms += rate_wait_ms
                deadline = self.slots.renew(grant, ttl_ms=ttl_ms)
                grant = replace(grant, now_ms=deadline - ttl_ms, deadline_ms=deadline)
                self.inflight.record(record.granted(
                    grant, deadline_ms=grant.now_ms + timeout_ms + _EARLY_DEADLINE_SLACK_MS))
        return grant, waited_ms

    def queue_counts(self, pipe, *, waited_ms, lane):
        # the wait for the slot, counted on the transaction that records the attempt's outcome (its
        # count and sum are status's waits and average wait too)
        counters.observe(pipe, self.keys, "slot_wait_seconds", waited_ms / 1000, lane, self.resource)

    def feedback(self, reply, *, retry_after_max_s):
        if self.adaptive is not None:
            self.adaptive.record(overloaded(reply))
        if self.rate is not None and reply.response is not None:
            asked = retry_after_s(reply.header("Retry-After"))
            if asked:
                self.rate.push_back(min(asked, retry_after_max_s))

    def release(self, grant, *, pipe=None):
        self.slots.release(grant, pipe=pipe)

    def hand_off(self, grant, *, pipe):
        if self._handoffs:
            return self.slots.hand_off(grant, pipe=pipe)
        self.slots.release(grant, pipe=pipe)
        return _nothing_to_tell

    def release_try(self, token, *, pipe):
        pass  # a refused try for a slot holds none

    @property
    def stamps_attempt(self) -> bool:
        return True  # the slot's script counts it, whether the try came at once or after a wait


def _nothing_to_tell(replies) -> None:
    """After a plain release in the outcome's transaction: nobody waits on it."""


def permit_for(client, keys: Keys, resource: str, limit: Limit, inflight: Inflight, *,
               lease_grace_ms: int, replicas: Replicas = Replicas()) -> Permit:
    """The permit kind the resource's declared limit calls for."""
    if limit.capped:
        return SlotPermit(client, keys, resource, limit, inflight, replicas=replicas)
    return SerialPermit(client, keys, resource, inflight, wait_grace_ms=lease_grace_ms, replicas=replicas)
