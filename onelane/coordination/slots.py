"""The semaphore of a capped resource: N slots, each a lease.

Guarantees: at most ``cap`` slots are held at once (one script checks and takes a slot);
each slot is a lease with the same deadline, fencing and reaping rules as the serial
lease, so a killed holder's slot comes back when its deadline passes; waiting blocks on a
release signal with a bounded timeout, never polling Redis in a loop. The fencing counter
is the resource's own (shared with its serial lease), so tokens grow across both.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from redis.exceptions import NoScriptError

from onelane.coordination.lease import Grant, Lease
from onelane.core.errors import LeaseBusy, UnexpectedReply
from onelane.core.keys import Keys
from onelane.core.limits import Limit
from onelane.core.replication import NotReplicated, Replicas
from onelane.core.scripts import LuaScript, forget

_ACQUIRE = LuaScript(__package__, "semaphore_acquire")
_RELEASE = LuaScript(__package__, "lease_release")

_SIGNAL_TTL_MS = 10_000
_MAX_BLOCK_MS = 2_000


@dataclass(frozen=True)
class SlotGrant(Grant):
    """A granted slot: a lease grant plus which slot (1-based) and the cap it was taken under."""

    slot: int = 0
    cap: int = 1


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

    def try_acquire(self, token: str, *, ttl_ms: int) -> SlotGrant | int:
        """A :class:`SlotGrant`, or the ms until the soonest slot expires.

        With replicas required, a slot they did not confirm in time is freed and
        :class:`NotReplicated` raised: it never counts as had.
        """
        k = self.keys
        keys = [k.lease_fence(self.fence_name), k.lease_index, k.adaptive(self.resource),
                *[k.lease(n) for n in self.names]]
        args = [token, int(ttl_ms), self.limit.concurrency, 1 if self.limit.adaptive else 0, *self.names]
        confirmed = None
        if self.replicas.needed <= 0:
            res = _ACQUIRE(self.client, keys=keys, args=args)
        else:
            pipe = self.client.pipeline(transaction=False)
            _ACQUIRE.queue_on(pipe, self.client, keys=keys, args=args)
            self.replicas.queue_wait(pipe)
            try:
                res, *confirmed = pipe.execute()
            except NoScriptError:
                forget(self.client)
                return self.try_acquire(token, ttl_ms=ttl_ms)
        if not isinstance(res, list) or len(res) < 2:
            raise UnexpectedReply(f"script semaphore_acquire answered {res!r}")
        if int(res[0]) == 1:
            slot = int(res[1])
            grant = SlotGrant(self.names[slot - 1], token, int(res[2]), int(res[3]), int(res[4]),
                              slot=slot, cap=int(res[5]))
            if confirmed is not None and not self.replicas.confirmed(confirmed):
                self.release(grant)
                self.replicas.resync(self.client)
                raise NotReplicated(f"slot {slot} of {self.resource!r}", self.replicas.confirmations(confirmed),
                                    self.replicas.needed)
            return grant
        return int(res[1])

    def acquire(self, token: str, *, ttl_ms: int, wait_ms: int) -> tuple[SlotGrant, float]:
        """Take a slot, blocking on the release signal; return (grant, ms waited). LeaseBusy on timeout."""
        started = time.monotonic()
        give_up = started + wait_ms / 1000
        while True:
            got = self.try_acquire(token, ttl_ms=ttl_ms)
            if isinstance(got, SlotGrant):
                return got, (time.monotonic() - started) * 1000
            left_ms = (give_up - time.monotonic()) * 1000
            if left_ms <= 0:
                raise LeaseBusy(f"no free slot of {self.resource!r} (cap {self.limit.concurrency}) in time")
            block = max(10, min(got + 5, left_ms, _MAX_BLOCK_MS))
            self.client.blpop([self.keys.slot_signal(self.resource)], timeout=block / 1000)

    def release(self, grant: SlotGrant, *, pipe=None):
        """Free the slot if this grant still holds it, and wake one waiter (queued on ``pipe`` if given)."""
        k = self.keys
        keys = [k.lease(grant.name), k.lease_holder(grant.name), k.lease_index, k.slot_signal(self.resource)]
        args = [grant.token, grant.name, _SIGNAL_TTL_MS]
        if pipe is not None:
            return _RELEASE.queue_on(pipe, self.client, keys=keys, args=args)
        return _RELEASE(self.client, keys=keys, args=args)

    def held(self) -> int:
        """How many slots are held now."""
        pipe = self.client.pipeline(transaction=False)
        for n in self.names:
            pipe.exists(self.keys.lease(n))
        return sum(pipe.execute())

    def lease(self, slot_name: str) -> Lease:
        """The lease behind one slot (to renew it)."""
        return Lease(self.client, slot_name, keys=self.keys)
