"""A circuit breaker per resource: after K consecutive retryable failures no callout to it
starts for a cool-down (doubling up to a cap); a success closes it.

The state lives in Redis, so every worker sees it and ``onelane status`` can show it.
"""
from __future__ import annotations

from dataclasses import dataclass

from tasks.keys import Keys
from tasks.lease import redis_now_ms
from tasks.scripts import queue_on, script


@dataclass(frozen=True)
class CircuitState:
    resource: str
    state: str  # "closed", "open" or "half-open"
    failures: int
    open_until_ms: int
    cooldown_ms: int
    now_ms: int

    @property
    def blocked_for_ms(self) -> int:
        return max(0, self.open_until_ms - self.now_ms) if self.state == "open" else 0


class Circuit:
    def __init__(self, client, keys: Keys, resource: str, *, threshold: int, cooldown_ms: int,
                 cooldown_max_ms: int):
        self.client = client
        self.keys = keys
        self.resource = resource
        self.threshold = threshold
        self.cooldown_ms = cooldown_ms
        self.cooldown_max_ms = cooldown_max_ms

    def state(self) -> CircuitState:
        """The circuit now: open (with time left), half-open (cool-down over) or closed."""
        return self.state_from(self.client.hgetall(self.keys.circuit(self.resource)),
                               redis_now_ms(self.client))

    def state_from(self, h: dict, now: int) -> CircuitState:
        """The state from a raw HGETALL reply and the Redis time (for pipelined reads)."""
        h = {k.decode(): v.decode() for k, v in h.items()}
        open_until = int(h.get("open_until") or 0)
        state = h.get("state", "closed")
        if state == "open" and open_until <= now:
            state = "half-open"
        return CircuitState(self.resource, state, int(h.get("failures") or 0), open_until,
                            int(h.get("cooldown") or 0), now)

    def record(self, ok: bool, *, pipe=None) -> CircuitState | None:
        """Record one attempt's outcome; with ``pipe``, queued on that pipeline (returns None)."""
        keys = [self.keys.circuit(self.resource), self.keys.circuit_index]
        args = ["ok" if ok else "fail", self.resource, self.threshold, self.cooldown_ms, self.cooldown_max_ms]
        if pipe is not None:
            queue_on(pipe, self.client, "circuit_record", keys, args)
            return None
        res = script(self.client, "circuit_record")(keys=keys, args=args)
        state = res[0].decode() if isinstance(res[0], bytes) else res[0]
        return CircuitState(self.resource, state, int(res[1]), int(res[2]), int(res[3]),
                            redis_now_ms(self.client))


def all_circuits(client, keys: Keys, **kw) -> list[CircuitState]:
    names = sorted(m.decode() for m in client.smembers(keys.circuit_index))
    return [Circuit(client, keys, n, threshold=0, cooldown_ms=0, cooldown_max_ms=0).state() for n in names]
