"""Time on the Redis server's clock: every deadline onelane stores is in these milliseconds."""
from __future__ import annotations

import time

#: Redis's clock minus this process's monotonic clock (ms), as last read; None until first read
_offset_ms: float | None = None
#: when it was read (monotonic s)
_noted_at = 0.0
#: an estimate from a reading older than this is not made (clocks drift, a failover changes hosts)
ESTIMATE_MAX_AGE_S = 10.0


def redis_now_ms(client) -> int:
    """Now on the Redis server's clock, in ms."""
    return time_ms(client.time())


def time_ms(reply) -> int:
    """A Redis TIME reply (seconds, microseconds), e.g. from a pipeline, in ms."""
    sec, usec = reply
    return int(sec) * 1000 + int(usec) // 1000


def note_redis_now(redis_ms: int) -> None:
    """Remember a Redis clock reading just received (so later writes can estimate the Redis clock
    without asking: :func:`estimated_redis_now_ms`). The reading is a little old when it arrives,
    so estimates run early by about half a round trip."""
    global _offset_ms, _noted_at
    _noted_at = time.monotonic()
    _offset_ms = redis_ms - _noted_at * 1000


def estimated_redis_now_ms() -> int | None:
    """Now on the Redis clock as estimated from this process's last reading; None before any, or
    when that reading is older than ESTIMATE_MAX_AGE_S."""
    offset, now = _offset_ms, time.monotonic()
    if offset is None or now - _noted_at > ESTIMATE_MAX_AGE_S:
        return None
    return int(now * 1000 + offset)
