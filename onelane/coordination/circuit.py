"""A circuit breaker per resource: after K callouts in a row fail (retryably) no callout to it
starts for a cool-down (doubling up to a cap); a success closes it. A callout's own retries
count once, so one bad callout cannot open the circuit on its own.

The state lives in Redis, so every worker sees it and ``onelane status`` can show it.
"""
from __future__ import annotations

from dataclasses import dataclass

from onelane.core.clock import redis_now_ms
from onelane.core.keys import Keys
from onelane.core.scripts import LuaScript
from onelane.core.text import text, text_map

_RECORD = LuaScript(__package__, "circuit_record")


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


@dataclass(frozen=True)
class CircuitRecord:
    """What recording an outcome did: the state after it, and whether this failure opened it."""

    state: str
    failures: int
    open_until_ms: int
    cooldown_ms: int
    opened_now: bool


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
        h = text_map(h)
        open_until = int(h.get("open_until") or 0)
        state = h.get("state", "closed")
        if state == "open" and open_until <= now:
            state = "half-open"
        return CircuitState(self.resource, state, int(h.get("failures") or 0), open_until,
                            int(h.get("cooldown") or 0), now)

    def record(self, ok: bool, *, task_id: str = "", pipe=None) -> CircuitRecord | None:
        """Record one attempt's outcome; with ``pipe``, queued on that pipeline (returns None).

        Failures count per callout (``task_id``): a callout's own retries count once, so one
        bad callout cannot open the circuit by itself; ``threshold`` failing callouts in a row do.
        """
        keys = [self.keys.circuit(self.resource), self.keys.circuit_index]
        args = ["ok" if ok else "fail", self.resource, self.threshold, self.cooldown_ms, self.cooldown_max_ms,
                task_id]
        if pipe is not None:
            _RECORD.queue_on(pipe, self.client, keys=keys, args=args)
            return None
        res = _RECORD(self.client, keys=keys, args=args)
        return CircuitRecord(text(res[0]), int(res[1]), int(res[2]), int(res[3]), opened_now=bool(int(res[4])))


def all_circuits(client, keys: Keys, **kw) -> list[CircuitState]:
    names = sorted(text(m) for m in client.smembers(keys.circuit_index))
    return [Circuit(client, keys, n, threshold=0, cooldown_ms=0, cooldown_max_ms=0).state() for n in names]
