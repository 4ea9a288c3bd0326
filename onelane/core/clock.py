"""Time on the Redis server's clock: every deadline onelane stores is in these milliseconds."""
from __future__ import annotations


def redis_now_ms(client) -> int:
    """Now on the Redis server's clock, in ms."""
    return time_ms(client.time())


def time_ms(reply) -> int:
    """A Redis TIME reply (seconds, microseconds), e.g. from a pipeline, in ms."""
    sec, usec = reply
    return int(sec) * 1000 + int(usec) // 1000
