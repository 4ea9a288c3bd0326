"""Capacity primitives of a capped resource: a semaphore of N leases, a global rate limit
(GCRA) and an adaptive cap (AIMD). All state is in Redis, so limits hold across every
worker and host.

Guarantees: at most ``cap`` slots are held at once (one script checks and takes a slot);
each slot is a lease with the same deadline, fencing and reaping rules as the serial
lease, so a killed holder's slot comes back when its deadline passes; waiting blocks on a
release signal with a bounded timeout, never polling Redis in a loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from tasks.errors import LeaseBusy
from tasks.keys import Keys
from tasks.lease import Grant, Lease
from tasks.limits import Limit
from tasks.scripts import queue_on, script

_SIGNAL_TTL_MS = 10_000
_MAX_BLOCK_MS = 2_000
RATE_SAFETY = 1.02
#: one burst of overload halves the adaptive cap once
AIMD_DECREASE_EVERY_MS = 200


@dataclass(frozen=True)
class SlotGrant(Grant):
    slot: int = 0
    cap: int = 1


class Semaphore:
    """N slots of ``resource``; the fencing counter is shared with the plain lease's."""

    def __init__(self, client, keys: Keys, resource: str, limit: Limit):
        self.client = client
        self.keys = keys
        self.resource = resource
        self.limit = limit
        self.names = [keys.slot(resource, i) for i in range(1, limit.concurrency + 1)]
        self.fence_name = f"resource:{resource}"

    def try_acquire(self, token: str, *, ttl_ms: int):
        k = self.keys
        res = script(self.client, "semaphore_acquire")(
            keys=[k.lease_fence(self.fence_name), k.lease_index, k.adaptive(self.resource),
                  *[k.lease(n) for n in self.names]],
            args=[token, int(ttl_ms), self.limit.concurrency, 1 if self.limit.adaptive else 0, *self.names],
        )
        if int(res[0]) == 1:
            slot = int(res[1])
            return SlotGrant(self.names[slot - 1], token, int(res[2]), int(res[3]), int(res[4]),
                             slot=slot, cap=int(res[5]))
        return int(res[1])  # ms until the soonest slot expires

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
        """Free the slot if this grant still holds it, and wake one waiter."""
        k = self.keys
        keys = [k.lease(grant.name), k.lease_holder(grant.name), k.lease_index, k.slot_signal(self.resource)]
        args = [grant.token, grant.name, _SIGNAL_TTL_MS]
        if pipe is not None:
            return queue_on(pipe, self.client, "lease_release", keys, args)
        return script(self.client, "lease_release")(keys=keys, args=args)

    def held(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for n in self.names:
            pipe.exists(self.keys.lease(n))
        return sum(pipe.execute())

    def lease(self, slot_name: str) -> Lease:
        return Lease(self.client, slot_name, keys=self.keys)


class RateLimiter:
    """A global rate limit per resource (GCRA in Redis)."""

    def __init__(self, client, keys: Keys, resource: str, per_s: float, burst_ms: int = 0):
        self.client = client
        self.key = keys.rate(resource)
        # 2% wider than the rate: jitter between our start and the API's clock cannot push a
        # window seen by the API above the rate (the average stays within 2% of it)
        self.interval_ms = 1000.0 / per_s * RATE_SAFETY
        self.burst_ms = burst_ms

    def wait_ms(self) -> int:
        """0 if a call may start now (and it is counted), else how long to wait before asking again."""
        return int(script(self.client, "rate_acquire")(keys=[self.key], args=[self.interval_ms, self.burst_ms]))

    def acquire(self, *, max_wait_s: float = 3600) -> float:
        """Wait (sleeping exactly as long as needed) until a call may start; return ms waited."""
        started = time.monotonic()
        while True:
            w = self.wait_ms()
            if w == 0:
                return (time.monotonic() - started) * 1000
            if time.monotonic() - started > max_wait_s:
                raise LeaseBusy(f"rate limit of {self.key} did not admit a call within {max_wait_s} s")
            time.sleep(w / 1000)

    def push_back(self, delay_s: float) -> None:
        """Honour a Retry-After: no call to the resource starts before now + delay."""
        script(self.client, "rate_push")(keys=[self.key], args=[int(delay_s * 1000)])


class Adaptive:
    """The adaptive cap of a resource: multiplicative decrease, additive increase, within [1, N]."""

    def __init__(self, client, keys: Keys, resource: str, n: int):
        self.client = client
        self.key = keys.adaptive(resource)
        self.n = n

    def record(self, overloaded: bool, *, pipe=None):
        return script(self.client, "aimd")(
            keys=[self.key], args=["down" if overloaded else "up", self.n, AIMD_DECREASE_EVERY_MS], client=pipe)

    def cap(self) -> float:
        raw = self.client.hget(self.key, "cap")
        return float(raw) if raw is not None else float(self.n)
