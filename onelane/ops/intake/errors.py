"""The intake's one error: an HTTP status with a message that says what to fix."""
from __future__ import annotations

import math

from onelane.core.errors import OnelaneError


class IntakeError(OnelaneError):
    """Raised when a request to the intake cannot be served; answered as JSON ``{"error": ..., "field"?}``.

    ``retry_after_s`` becomes a ``Retry-After`` header (whole seconds, at least 1).
    """

    def __init__(self, status: int, error: str, *, field: str | None = None, retry_after_s: float | None = None,
                 headers: dict | None = None):
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))

    def body(self) -> dict:
        out = {"error": self.error}
        if self.field is not None:
            out["field"] = self.field
        return out


#: Redis refusing for a while, by redis-py's error class, or (unmapped ones) by the reply's first word
_TRANSIENT_CLASSES = ("OutOfMemoryError", "ReadOnlyError", "TryAgainError", "ClusterDownError", "MasterDownError")
TRANSIENT_REPLIES = ("OOM", "LOADING", "BUSY", "READONLY", "MISCONF", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN",
                     "CLUSTERDOWN")


def is_redis_down(exc: BaseException | None) -> bool:
    """True when ``exc`` means Redis is unreachable or refusing for now (the intake answers 503).

    Connection errors and timeouts (LOADING included), and the replies of a Redis that refuses for a
    while: OOM at maxmemory, READONLY replica, BUSY script, MISCONF persistence, no master or replicas.
    """
    import redis
    from kombu.exceptions import OperationalError

    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OperationalError)):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    if type(exc).__name__ in _TRANSIENT_CLASSES or any(
            isinstance(exc, getattr(redis.exceptions, n, ())) for n in _TRANSIENT_CLASSES):
        return True
    return str(exc).upper().startswith(TRANSIENT_REPLIES)
