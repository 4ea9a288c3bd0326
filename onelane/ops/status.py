"""A snapshot of a queue for operators: everything ``onelane status`` shows, read-only.

Reads only (a handful of pipelined commands), so it answers fast and never blocks a worker.
The JSON form (``Snapshot.to_dict``) is the documented, stable shape.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from onelane.coordination.circuit import all_circuits
from onelane.coordination.lease import Lease
from onelane.core.clock import redis_now_ms
from onelane.core.keys import Keys
from onelane.core.text import text, text_map
from onelane.delivery import flow
from onelane.delivery.inflight import Inflight

SCHEMA_VERSION = 1


@dataclass
class Snapshot:
    queue: str
    now_ms: int
    depth: int
    paused: dict | None
    in_flight: list[dict] = field(default_factory=list)
    guard: dict | None = None
    standbys: list[dict] = field(default_factory=list)
    leases: list[dict] = field(default_factory=list)
    delayed: int = 0
    dead_letters: int = 0
    circuits: list[dict] = field(default_factory=list)
    limits: list[dict] = field(default_factory=list)
    completed: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA_VERSION
        return d


def _limits(client, keys: Keys, limits) -> list[dict]:
    from onelane.coordination.adaptive import Adaptive
    from onelane.coordination.slots import Semaphore

    out = []
    for resource, limit in limits:
        waits = {k: float(v) for k, v in text_map(client.hgetall(keys.waits(resource))).items()}
        count = int(waits.get("count", 0))
        out.append({
            "resource": resource, "concurrency": limit.concurrency, "rate_per_s": limit.rate_per_s,
            "adaptive": limit.adaptive, "held": Semaphore(client, keys, resource, limit).held(),
            "effective_cap": int(Adaptive(client, keys, resource, limit.concurrency).cap()) if limit.adaptive
            else limit.concurrency,
            "waits": count, "average_wait_ms": round(waits.get("total_ms", 0) / count, 1) if count else 0.0,
        })
    return out


def snapshot(client, keys: Keys, queue: str, limits=()) -> Snapshot:
    """Everything about ``queue`` an operator looks at; ``limits`` are the settings' (resource, Limit) pairs."""
    now = redis_now_ms(client)
    pipe = client.pipeline(transaction=False)
    pipe.llen(keys.queue_list(queue))
    pipe.zcard(keys.delayed(queue))
    pipe.zcard(keys.dead_letter_index(queue))
    pipe.zcount(keys.stats(queue, "success"), now - 60_000, "+inf")
    pipe.zcount(keys.stats(queue, "success"), now - 3_600_000, "+inf")
    pipe.zcount(keys.stats(queue, "failure"), now - 60_000, "+inf")
    pipe.zcount(keys.stats(queue, "failure"), now - 3_600_000, "+inf")
    pipe.zrange(keys.lease_index, 0, -1)
    depth, delayed, dlq, ok_m, ok_h, bad_m, bad_h, lease_names = pipe.execute()

    snap = Snapshot(queue=queue, now_ms=now, depth=depth, paused=flow.paused_info(client, keys, queue),
                    delayed=delayed, dead_letters=dlq, completed={"last_minute": ok_m, "last_hour": ok_h},
                    failed={"last_minute": bad_m, "last_hour": bad_h})
    inflight = Inflight(client, keys)
    for tid in inflight.task_ids(queue):
        rec = inflight.get(tid)
        if rec is None:
            continue
        snap.in_flight.append({
            "task_id": rec.task_id, "resource": rec.resource, "attempt": rec.attempt,
            "started_ms": rec.started_ms, "elapsed_s": round((now - rec.started_ms) / 1000, 3),
            "deadline_ms": rec.deadline_ms, "host": rec.host, "pid": rec.pid,
            # the record travels with the acquire, before the fence is known: read it from the lease
            "fence": rec.fence or (Lease(client, rec.lease, keys=keys).fence() if rec.lease else 0),
        })
    guard = Lease(client, keys.guard_name(queue), keys=keys).holder()
    if guard is not None:
        snap.guard = {"label": guard.label, "host": guard.host, "pid": guard.pid,
                      "renewed_ago_s": round(guard.renewed_ago_s, 3), "expires_in_s": guard.pttl_ms / 1000}
    ttl_ms = 30_000
    for raw in client.hvals(keys.standbys(queue)):
        info = json.loads(raw)
        if time.time() * 1000 - info.get("seen_ms", 0) < ttl_ms:
            snap.standbys.append(info)
    for raw in lease_names:
        name = text(raw)
        if keys.is_worker_lease(name):
            continue  # the guard and worker presence are shown apart
        lease = Lease(client, name, keys=keys)
        h = lease.holder()
        snap.leases.append({"name": name, "fence": lease.fence(), "held": h is not None,
                            "holder": h.label if h else None, "expires_in_s": h.pttl_ms / 1000 if h else None})
    for c in all_circuits(client, keys):
        snap.circuits.append({"resource": c.resource, "state": c.state, "failures": c.failures,
                              "open_for_s": c.blocked_for_ms / 1000, "cooldown_s": c.cooldown_ms / 1000})
    snap.limits = _limits(client, keys, limits)
    return snap


def dumps(snap: Snapshot) -> str:
    return json.dumps(snap.to_dict(), indent=2, sort_keys=True)


def lanes_overview(client, keys: Keys, settings) -> list[dict]:
    """One entry per known lane: name, depth, callouts in flight, guard holder, paused, dead letters.

    Read-only, like :func:`snapshot`. For now the known lanes are the default queue and the bulk
    queue (``settings.queue``, ``settings.bulk_queue``).
    """
    out = []
    for queue in (settings.queue, settings.bulk_queue):
        snap = snapshot(client, keys, queue)
        g = snap.guard
        out.append({
            "name": queue, "depth": snap.depth, "in_flight": len(snap.in_flight),
            "guard": {"label": g["label"], "host": g["host"], "pid": g["pid"]} if g else None,
            "paused": snap.paused is not None, "dead_letters": snap.dead_letters,
        })
    return out
