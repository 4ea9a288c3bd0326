"""The semaphore of a capped resource: N slots, each a lease.

Guarantees: at most ``cap`` slots are held at once (one script checks and takes a slot);
each slot is a lease with the same deadline, fencing and reaping rules as the serial
lease, so a killed holder's slot comes back when its deadline passes; waiting blocks on a
release signal with a bounded timeout, never polling Redis in a loop. A release wakes one
waiter, and a waiter that wins a slot wakes the next while another slot is free, so no waiter
sleeps out its block beside a free slot; a task whose process already has one waiting can
queue behind it without a try of its own (:meth:`Semaphore.others_waiting`), its first wait and
the try after it queued on its preflight's round trip (:meth:`Semaphore.queue_try`). A try again
with a token whose last try's reply was lost is granted the slot that try may have won, never a
second one. Within a worker process a slot can pass straight from a task whose attempt ended to
one waiting (:meth:`Semaphore.hand_off`, :mod:`onelane.coordination.handoff`), never coming free.
The fencing counter is the resource's own (shared with its serial lease), so tokens grow across
both.

A grant or a refusal reads one member of a sorted set holding every slot (``Keys.slots_held``:
slot number -> deadline; a free slot scores its own number, a time long past) instead of the
PTTL of every slot: O(1) commands per try whatever the cap. The set is a hint kept beside the
slot leases by the grant, the release and the renewal; the lease key stays the truth (a slot
is taken with SET NX, and a hint that disagrees sends the script to read every key), so a
stale hint costs a slower grant, never a slot held twice.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

from redis.exceptions import NoScriptError

from onelane.coordination import handoff
from onelane.coordination.lease import Grant, Lease, Stamp
from onelane.core.errors import LeaseBusy, UnexpectedReply
from onelane.core.keys import Keys
from onelane.core.limits import Limit
from onelane.core.replication import NotReplicated, Replicas
from onelane.core.scripts import LuaScript, forget

_ACQUIRE = LuaScript(__package__, "semaphore_acquire")
_RELEASE = LuaScript(__package__, "lease_release")
_HANDOFF = LuaScript(__package__, "slot_handoff")

_SIGNAL_TTL_MS = 10_000
_MAX_BLOCK_MS = 2_000

#: the first wait of a task that queues behind this process's waiters without a try, in its
#: preflight's round trip (the longest block: a release, or a waiter passing the wake-up on, ends it)
QUEUED_MS = _MAX_BLOCK_MS

#: tasks of this process waiting for a slot, per semaphore (its slot set's key), and their lock
_waiting: Counter = Counter()
_waiting_lock = threading.Lock()


@dataclass(frozen=True)
class SlotGrant(Grant):
    """A granted slot: a lease grant plus which slot (1-based) and the cap it was taken under."""

    slot: int = 0
    cap: int = 1
    #: when (time.monotonic(), this process) the slot was taken from Redis; a handoff keeps it
    kept_since: float = 0.0


class Semaphore:
    """N slots of ``resource`` (N from its declared limit)."""

    def __init__(self, client, keys: Keys, resource: str, limit: Limit, *, replicas: Replicas = Replicas()):
        self.client = client
        self.keys = keys
        self.resource = resource
        self.limit = limit
        self.replicas = replicas
        self.names = [keys.slot(resource, i) for i in range(1, limit.concurrency + 1)]
        self.fence_name = keys.resource_lease(resource)
        # the script's keys and the arguments that never change, built once
        self._keys = [keys.lease_fence(self.fence_name), keys.lease_index, keys.adaptive(resource),
                      keys.slots_held(resource), keys.slot_signal(resource), *[keys.lease(n) for n in self.names]]
        #: the count of this process's waiters (:meth:`others_waiting`) goes by the slot set's key
        self._waiting_key = keys.slots_held(resource)
        self._name_prefix = keys.slot(resource, "")
        self._fixed_args = [limit.concurrency, 1 if limit.adaptive else 0, self._name_prefix]
        #: tokens whose last try was sent and its reply not read (lost with a connection): a try
        #: again with one first looks for the slot the lost try may have won
        self._unanswered: set[str] = set()

    def try_acquire(self, token: str, *, ttl_ms: int, stamp: Stamp | None = None) -> SlotGrant | int:
        """A :class:`SlotGrant`, or the ms until the soonest slot expires.

        ``stamp``: the in-flight record of the attempt the slot is for, written by the same script
        (granted: with its slot, token, fence, start and deadline; not granted and with its fields:
        as a task waiting for a slot, due at once). With replicas required, a slot they did not
        confirm in time is freed and :class:`NotReplicated` raised: it never counts as had.
        """
        return self._try(token, ttl_ms=ttl_ms, stamp=stamp)

    def _try(self, token: str, *, ttl_ms: int, stamp: Stamp | None, after_wait_ms: float = 0) -> SlotGrant | int:
        """:meth:`try_acquire`; with ``after_wait_ms``, first block that long (at most) on the release
        signal, in the same round trip: Redis runs the try the moment the wait ends."""
        if self.replicas.needed <= 0 and not after_wait_ms:
            keys, args = self._call(token, ttl_ms, stamp)
            return self.grant_of(_ACQUIRE(self.client, keys=keys, args=args), token)
        pipe = self.client.pipeline(transaction=False)
        queued = self.queue_try(pipe, token, ttl_ms=ttl_ms, stamp=stamp, after_wait_ms=after_wait_ms)
        self.replicas.queue_wait(pipe)
        try:
            replies = pipe.execute()
        except NoScriptError:
            forget(self.client)  # Redis lost its script cache (a restart): the wait, if any, is over
            return self._try(token, ttl_ms=ttl_ms, stamp=stamp)
        res, *confirmed = replies[queued - 1:]
        got = self.grant_of(res, token)
        if isinstance(got, SlotGrant) and self.replicas.needed > 0 and not self.replicas.confirmed(confirmed):
            self.release(got)
            self.replicas.resync(self.client)
            raise NotReplicated(f"slot {got.slot} of {self.resource!r}", self.replicas.confirmations(confirmed),
                                self.replicas.needed)
        return got

    def queue_try(self, pipe, token: str, *, ttl_ms: int, stamp: Stamp | None = None, after_wait_ms: float = 0) -> int:
        """Queue one :meth:`try_acquire` on ``pipe``; return how many replies it adds (read the last
        with :meth:`grant_of`). With ``after_wait_ms``, a block on the release signal first (at most
        that long, as :meth:`acquire`'s waits: one waiter woken per release, passing the wake-up on
        while a slot is free): the try runs the moment the wait ends, in the same round trip."""
        keys, args = self._call(token, ttl_ms, stamp, after_wait=bool(after_wait_ms))
        if after_wait_ms:
            pipe.blpop([self.keys.slot_signal(self.resource)], timeout=min(after_wait_ms, _MAX_BLOCK_MS) / 1000)
        _ACQUIRE.queue_on(pipe, self.client, keys=keys, args=args)
        return 2 if after_wait_ms else 1

    def grant_of(self, res, token: str) -> SlotGrant | int:
        """The :class:`SlotGrant` a try answered, or the ms until the soonest slot expires."""
        self._unanswered.discard(token)
        if not isinstance(res, list) or len(res) < 2:
            raise UnexpectedReply(f"script semaphore_acquire answered {res!r}")
        if int(res[0]) != 1:
            return int(res[1])
        slot = int(res[1])
        return SlotGrant(self.names[slot - 1], token, int(res[2]), int(res[3]), int(res[4]), slot=slot,
                         cap=int(res[5]), kept_since=time.monotonic())

    def _call(self, token: str, ttl_ms: int, stamp: Stamp | None, *, after_wait: bool = False) -> tuple[list, list]:
        again = 1 if token in self._unanswered else 0
        self._unanswered.add(token)  # until grant_of reads the reply
        keys, args = self._keys, [token, int(ttl_ms), *self._fixed_args, _SIGNAL_TTL_MS if after_wait else 0, again]
        if stamp is not None:
            keys = [*keys, stamp.record_key, stamp.index_key, *([stamp.attempts_key] if stamp.attempts_key else [])]
            args += [stamp.member, int(stamp.due_in_ms), *stamp.fields]
        return keys, args

    def acquire(self, token: str, *, ttl_ms: int, wait_ms: int, stamp: Stamp | None = None,
                refused_ms: int | None = None) -> tuple[SlotGrant, float]:
        """Take a slot, blocking on the release signal; return (grant, ms waited). LeaseBusy on timeout.

        Each wait and the try after it are one round trip (a pipelined BLPOP, then the script).
        ``stamp`` as for :meth:`try_acquire`; its fields are written by the first try only (the
        record exists from then on, and each later try only stamps a grant into it).
        ``refused_ms``: a try just made was refused, the soonest slot expiring in that many ms
        (:meth:`grant_of`), or every slot is known to be held: the first step is then a wait (at most
        that long), not a try straight away. A try after a wait that wins a slot wakes the next
        waiter if another slot is still free."""
        started = time.monotonic()
        give_up = started + wait_ms / 1000
        got = refused_ms if refused_ms is not None else self._try(token, ttl_ms=ttl_ms, stamp=stamp)
        tried = refused_ms is None
        with self._counted_waiting():
            while not isinstance(got, SlotGrant):
                if tried and stamp is not None and stamp.fields:
                    stamp = replace(stamp, fields=())  # written by the first try: later ones only stamp
                tried = True
                left_ms = (give_up - time.monotonic()) * 1000
                if left_ms <= 0:
                    raise LeaseBusy(f"no free slot of {self.resource!r} (cap {self.limit.concurrency}) in time")
                block_ms = max(10, min(got + 5, left_ms, _MAX_BLOCK_MS))
                got = self._try(token, ttl_ms=ttl_ms, stamp=stamp, after_wait_ms=block_ms)
        return got, (time.monotonic() - started) * 1000

    def others_waiting(self) -> bool:
        """Whether a task of this process waits for a slot of this semaphore now (every slot was held
        when it last tried, or it queued behind such a one), and a release wakes a waiter (who passes
        the wake-up on while slots stay free), so a try by a newcomer would most likely be refused."""
        return _waiting[self._waiting_key] > 0

    def begin_waiting(self) -> None:
        """Count a task of this process as waiting for a slot (:meth:`others_waiting`) until
        :meth:`end_waiting`, which must follow whatever happens."""
        with _waiting_lock:
            _waiting[self._waiting_key] += 1

    def end_waiting(self) -> None:
        with _waiting_lock:
            _waiting[self._waiting_key] -= 1
        self.keep_one_waiting()  # the last one in Redis left: the oldest in the process's line takes its place

    @contextmanager
    def _counted_waiting(self):
        self.begin_waiting()
        try:
            yield
        finally:
            self.end_waiting()

    def release(self, grant: SlotGrant, *, pipe=None):
        """Free the slot if this grant still holds it, and wake one waiter (queued on ``pipe`` if given;
        run now, a task waiting here for a handoff tries for it when none of the process waits in Redis)."""
        k = self.keys
        keys = [k.lease(grant.name), k.lease_holder(grant.name), k.lease_index, k.slot_signal(self.resource),
                k.slots_held(self.resource)]
        args = [grant.token, grant.name, _SIGNAL_TTL_MS, grant.slot]
        if pipe is not None:
            return _RELEASE.queue_on(pipe, self.client, keys=keys, args=args)
        res = _RELEASE(self.client, keys=keys, args=args)
        self.keep_one_waiting(handoff.TRY)
        return res

    # -- handoffs within the process (:mod:`onelane.coordination.handoff`) -------------------------
    def wait_handed(self, token: str, *, ttl_ms: int, stamp: Stamp, budget_ms: float) -> handoff.Waiter:
        """Wait in this process's line for a slot handed on by one of its tasks (at most ``budget_ms``,
        and only while a task of the process waits in Redis). The waiter's ``grant`` holds the slot
        when its ``outcome`` is HANDED; after UNKNOWN a try with ``token`` may be granted the slot the
        handoff gave it (:meth:`acquire` looks for it first)."""
        waiter = handoff.wait(self._waiting_key, handoff.Waiter(token, stamp, ttl_ms), budget_s=budget_ms / 1000,
                              keep_waiting=self.others_waiting)
        if waiter.outcome == handoff.UNKNOWN:
            self._unanswered.add(token)
        return waiter

    def hand_off(self, grant: SlotGrant, *, pipe) -> Callable[[list | None], None]:
        """Queue on ``pipe`` (the transaction ending ``grant``'s attempt) the slot's handoff to the task
        of this process waiting longest for one, or its release when nobody waits or the slot was
        kept for :data:`handoff.KEEP_S` already. Returns what to call with the transaction's replies
        once it ran, or with None if it failed: it tells the waiter."""
        kept = time.monotonic() - grant.kept_since < handoff.KEEP_S
        # the script's SHA first (loading it is a round trip that may fail): a waiter out of line
        # has nothing left to fail before its releaser's transaction
        sha = _HANDOFF.loaded_sha(self.client) if kept else ""
        waiter = handoff.claim(self._waiting_key) if kept else None
        at = len(pipe)
        if waiter is None:
            self.release(grant, pipe=pipe)
            return self._after_release
        try:
            k, st = self.keys, waiter.stamp
            keys = [k.lease(grant.name), k.lease_fence(self.fence_name), st.record_key, st.index_key,
                    st.attempts_key]
            pipe.evalsha(sha, len(keys), *keys, grant.token, waiter.token, int(waiter.ttl_ms), grant.name,
                         st.member, int(st.due_in_ms), *st.fields)
        except BaseException:
            handoff.settle(waiter, handoff.TRY)
            raise

        def settle(replies) -> None:
            if replies is None:
                handoff.settle(waiter, handoff.UNKNOWN)
                return
            res = replies[at]
            if not isinstance(res, list) or not res or int(res[0]) != 1:
                handoff.settle(waiter, handoff.TRY)
                return
            handed = replace(grant, token=waiter.token, fence=int(res[1]), deadline_ms=int(res[2]),
                             now_ms=int(res[3]))
            if not handoff.settle(waiter, handoff.HANDED, handed):
                self.release(handed)  # it stopped waiting for this transaction and went on without it
        return settle

    def may_hold(self, token: str) -> bool:
        """Whether a try with ``token`` went unanswered (its reply lost): it may hold a slot."""
        return token in self._unanswered

    def keep_one_waiting(self, outcome: str = handoff.WAIT) -> None:
        """While tasks of this process wait in its line and none waits in Redis (the last one left, or
        a grant was won with nobody there), the oldest goes to Redis: to wait for a release (WAIT, so
        a release by another worker is not missed) or, after a release to every worker, to try for
        the slot (TRY)."""
        if not self.others_waiting() and handoff.waiting(self._waiting_key):
            handoff.nudge(self._waiting_key, outcome)

    def _after_release(self, replies) -> None:
        """After a release to every worker in the outcome's transaction (None: it failed)."""
        if replies is not None:
            self.keep_one_waiting(handoff.TRY)

    def held(self) -> int:
        """How many slots are held now."""
        pipe = self.client.pipeline(transaction=False)
        for n in self.names:
            pipe.exists(self.keys.lease(n))
        return sum(pipe.execute())

    def renew(self, grant: SlotGrant, *, ttl_ms: int) -> int:
        """Extend the slot ``grant`` holds to ``ttl_ms`` from now; return its new deadline (ms).

        Raises LeaseNotHeld (from the slot's lease) when the grant no longer holds the slot."""
        # the hint follows the key in the same script (a renewal cut off between them cannot leave it stale)
        return Lease(self.client, grant.name, keys=self.keys).renew(
            grant.token, ttl_ms=ttl_ms, slot=(self.keys.slots_held(self.resource), grant.slot))

    def release_named(self, name: str, token: str) -> bool:
        """Free the slot lease ``name`` (a lease name of this semaphore) if ``token`` holds it: a
        release by someone who knows only the in-flight record (a dead holder's, on request)."""
        number = name[len(self._name_prefix):]
        if not name.startswith(self._name_prefix) or not number.isdigit():
            raise ValueError(f"{name!r} is not a slot of {self.resource!r}")
        return int(self.release(SlotGrant(name, token, 0, 0, 0, slot=int(number)))) == 1
