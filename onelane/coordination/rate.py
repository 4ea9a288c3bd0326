"""A global rate limit per resource: GCRA in Redis, so it holds across every worker and host."""
from __future__ import annotations

import time

from onelane.core.errors import LeaseBusy
from onelane.core.keys import Keys
from onelane.core.scripts import LuaScript

_ACQUIRE = LuaScript(__package__, "rate_acquire")
_PUSH = LuaScript(__package__, "rate_push")

#: the interval is 2% wider than the rate: jitter between our start and the API's clock
#: cannot push a window seen by the API above the rate (the average stays within 2% of it)
RATE_SAFETY = 1.02


class RateLimiter:
    """At most ``per_s`` starts per second of ``resource``, whoever starts them."""

    def __init__(self, client, keys: Keys, resource: str, per_s: float, burst_ms: int = 0):
        self.client = client
        self.key = keys.rate(resource)
        self.interval_ms = 1000.0 / per_s * RATE_SAFETY
        self.burst_ms = burst_ms

    def wait_ms(self) -> int:
        """0 if a call may start now (and it is counted), else how long to wait before asking again."""
        return int(_ACQUIRE(self.client, keys=[self.key], args=[self.interval_ms, self.burst_ms]))

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
        _PUSH(self.client, keys=[self.key], args=[int(delay_s * 1000)])
