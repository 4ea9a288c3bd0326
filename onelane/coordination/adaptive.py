"""The adaptive cap of a resource (AIMD): halve on overload, grow by 1/cap on success, within [1, N].

The semaphore reads the cap in its acquire script, so a lowered cap takes effect at the
next slot taken, on every worker.
"""
from __future__ import annotations

from onelane.core.keys import Keys
from onelane.core.scripts import LuaScript

_AIMD = LuaScript(__package__, "aimd")

#: one burst of overload halves the adaptive cap once
AIMD_DECREASE_EVERY_MS = 200


class Adaptive:
    def __init__(self, client, keys: Keys, resource: str, n: int):
        self.client = client
        self.key = keys.adaptive(resource)
        self.n = n

    def record(self, overloaded: bool) -> None:
        """Lower the cap after an overload answer, raise it a little after any other."""
        _AIMD(self.client, keys=[self.key], args=["down" if overloaded else "up", self.n, AIMD_DECREASE_EVERY_MS])

    def cap(self) -> float:
        """The cap now (N until the first overload)."""
        raw = self.client.hget(self.key, "cap")
        return float(raw) if raw is not None else float(self.n)
