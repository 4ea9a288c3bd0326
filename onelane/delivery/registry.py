"""Which queues exist: every worker registers the one queue it consumes, so lanes are
discovered, not configured.

A *lane* is a serial queue (one integration, one call at a time, in order); the bulk
queue has many consumers and capped resources. The default lane (ONELANE_QUEUE) counts
as a lane even before any worker registered it, so ``submit()``'s queue is always watched.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from onelane.core.keys import Keys
from onelane.core.text import text, text_map

LANE, BULK = "lane", "bulk"


@dataclass(frozen=True)
class QueueInfo:
    name: str
    kind: str  # LANE or BULK
    first_ms: int = 0
    seen_ms: int = 0


def register_queue(client, keys: Keys, queue: str, *, kind: str) -> None:
    """Record that a worker consumes ``queue`` (a lane or the bulk queue); keeps when it was first seen."""
    now_ms = int(time.time() * 1000)
    raw = client.hget(keys.queues, queue)
    first_ms = now_ms
    if raw is not None:
        try:
            first_ms = int(json.loads(text(raw)).get("first_ms") or now_ms)
        except (ValueError, AttributeError):
            pass
    client.hset(keys.queues, queue, json.dumps({"kind": kind, "first_ms": first_ms, "seen_ms": now_ms}))


def registered(client, keys: Keys) -> dict[str, QueueInfo]:
    """Every registered queue by name."""
    return registered_from(client.hgetall(keys.queues))


def registered_from(raw_hash: dict) -> dict[str, QueueInfo]:
    """Every registered queue by name, from an HGETALL reply of the registry (for pipelined reads)."""
    out = {}
    for name, raw in text_map(raw_hash).items():
        try:
            d = json.loads(raw)
            out[name] = QueueInfo(name, d.get("kind", LANE), int(d.get("first_ms") or 0), int(d.get("seen_ms") or 0))
        except (ValueError, AttributeError):
            continue
    return out


def lanes(client, keys: Keys, *, default_lane: str, bulk_queue: str) -> list[str]:
    """Every lane: the registered ones and the default lane, sorted (the bulk queue is not a lane)."""
    return lanes_of(registered(client, keys), default_lane=default_lane, bulk_queue=bulk_queue)


def lanes_of(reg: dict[str, QueueInfo], *, default_lane: str, bulk_queue: str) -> list[str]:
    """:func:`lanes` from what :func:`registered` returned."""
    names = {n for n, q in reg.items() if q.kind == LANE and n != bulk_queue}
    return sorted(names | {default_lane})


def bulk_queues(client, keys: Keys, *, bulk_queue: str) -> list[str]:
    """The bulk queues that have had a worker (today: ONELANE_BULK_QUEUE, once registered)."""
    return bulk_queues_of(registered(client, keys), bulk_queue=bulk_queue)


def bulk_queues_of(reg: dict[str, QueueInfo], *, bulk_queue: str) -> list[str]:
    """:func:`bulk_queues` from what :func:`registered` returned."""
    return sorted(n for n, q in reg.items() if q.kind == BULK or n == bulk_queue)


def is_known(client, keys: Keys, queue: str, *, default_lane: str, bulk_queue: str) -> bool:
    """True for the default lane, the bulk queue and any registered queue."""
    return queue in (default_lane, bulk_queue) or client.hexists(keys.queues, queue)
