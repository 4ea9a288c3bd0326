"""What the lanes are doing, for operators: everything ``onelane status`` shows, read-only.

Reads only (a handful of pipelined commands per lane), so it answers fast and never blocks a
worker. Two views, each with a documented JSON form:

* :func:`overview` — one line per lane and bulk queue (depth, in flight, guard holder,
  standbys, paused, dead letters, how long the head of the queue has waited), plus the
  circuits and capped resources, which are shared by every lane;
* :func:`snapshot` — one lane in detail.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from onelane.coordination.circuit import all_circuits
from onelane.coordination.lease import Lease
from onelane.core import counters, recent
from onelane.core.clock import redis_now_ms
from onelane.core.keys import Keys
from onelane.core.text import text, text_map
from onelane.core.clients import eviction_problem
from onelane.delivery import coalescing, flow, registry
from onelane.delivery.epoch import losses
from onelane.delivery.inflight import Inflight
from onelane.delivery.messages import parse_queued, task_id_of

SCHEMA_VERSION = 2
#: a standby that has not announced itself for this long is not shown
STANDBY_SEEN_MS = 30_000


@dataclass
class Snapshot:
    queue: str
    now_ms: int
    depth: int
    paused: dict | None
    kind: str = registry.LANE
    #: a worker has registered this queue (or it is the default lane / the bulk queue)
    known: bool = True
    in_flight: list[dict] = field(default_factory=list)
    guard: dict | None = None
    standbys: list[dict] = field(default_factory=list)
    leases: list[dict] = field(default_factory=list)
    delayed: int = 0
    dead_letters: int = 0
    #: how long the message at the head of the queue has been waiting there (s), if any
    head_waiting_s: float | None = None
    circuits: list[dict] = field(default_factory=list)
    limits: list[dict] = field(default_factory=list)
    redis: dict = field(default_factory=dict)
    completed: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    #: the transactional outbox of this lane, as its relay last reported it (None: no relay ever did)
    outbox: dict | None = None
    #: coalescing: task ids carried by another so far, keys waiting / started, callouts parked
    coalescing: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA_VERSION
        return d


def _slot_waits(client, keys: Keys) -> dict[str, tuple[int, float]]:
    """resource -> (slots granted, seconds waited in all), every lane together (the slot-wait histogram)."""
    out: dict[str, tuple[int, float]] = {}
    for series_key, series in counters.parse_histograms(client.hgetall(keys.metric_histograms)).items():
        metric, _lane, resource = series_key
        if metric == "slot_wait_seconds":
            count, total = out.get(resource, (0, 0.0))
            out[resource] = (count + series["buckets"][-1], total + series["sum"])
    return out


def _limits(client, keys: Keys, limits) -> list[dict]:
    from onelane.coordination.adaptive import Adaptive
    from onelane.coordination.slots import Semaphore

    out = []
    waited = _slot_waits(client, keys)
    for resource, limit in limits:
        count, total_s = waited.get(resource, (0, 0.0))
        total_ms = total_s * 1000
        out.append({
            "resource": resource, "concurrency": limit.concurrency, "rate_per_s": limit.rate_per_s,
            "adaptive": limit.adaptive, "held": Semaphore(client, keys, resource, limit).held(),
            "effective_cap": int(Adaptive(client, keys, resource, limit.concurrency).cap()) if limit.adaptive
            else limit.concurrency,
            "waits": count, "average_wait_ms": round(total_ms / count, 1) if count else 0.0,
        })
    return out


def _circuits(client, keys: Keys) -> list[dict]:
    return [{"resource": c.resource, "state": c.state, "failures": c.failures,
             "open_for_s": c.blocked_for_ms / 1000, "cooldown_s": c.cooldown_ms / 1000}
            for c in all_circuits(client, keys)]


def redis_health(client, keys: Keys, settings=None) -> dict:
    """Redis as onelane depends on it: version, eviction policy, memory used / max, data losses
    noticed, and the master with its replicas (address, state, lag in seconds)."""
    mem = client.info("memory")
    server = client.info("server")
    repl = client.info("replication")
    problem = eviction_problem(mem)
    conn = client.connection_pool.connection_kwargs
    replicas = [{"address": f"{v.get('ip')}:{v.get('port')}", "state": v.get("state"), "lag": int(v.get("lag", -1)),
                 "offset": int(v.get("offset", 0))}
                for k, v in sorted(repl.items()) if k.startswith("slave") and isinstance(v, dict)]
    master = _master_address(client, settings) or f"{conn.get('host', '?')}:{conn.get('port', '?')}"
    return {
        "version": server.get("redis_version"),
        "maxmemory_policy": mem.get("maxmemory_policy"),
        "eviction_safe": problem is None,
        "used_memory": int(mem.get("used_memory", 0)),
        "maxmemory": int(mem.get("maxmemory", 0)),
        "data_losses": losses(client, keys),
        "role": repl.get("role"),
        "master": master,
        "replicas": replicas,
        "min_replicas": getattr(settings, "min_replicas", 0),
    }


def _master_address(client, settings) -> str | None:
    """host:port of the master a Sentinel client follows (None for a plain client)."""
    pool = client.connection_pool
    if not hasattr(pool, "get_master_address"):
        return None
    try:
        host, port = pool.get_master_address()
        return f"{host}:{port}"
    except Exception:
        return None


def head_waiting_s(client, keys: Keys, queue: str, now_ms: int) -> float | None:
    """How long the message now at the head of ``queue`` has been seen there (None: empty).

    Messages carry no publish time, so the first look at a new head starts its clock; every
    look (status, the reaper every few seconds) keeps it. A lower bound on its wait.
    """
    head = parse_queued(flow.head(client, keys, queue))
    head_id = task_id_of(head) if head else None
    if head_id is None:
        client.delete(keys.head_seen(queue))
        return None
    seen = text_map(client.hgetall(keys.head_seen(queue)))
    if seen.get("task_id") != head_id:
        client.hset(keys.head_seen(queue), mapping={"task_id": head_id, "since_ms": now_ms})
        return 0.0
    return max(0.0, (now_ms - int(seen.get("since_ms") or now_ms)) / 1000)


def _guard(client, keys: Keys, queue: str) -> dict | None:
    g = Lease(client, keys.guard_name(queue), keys=keys).holder()
    if g is None:
        return None
    return {"label": g.label, "host": g.host, "pid": g.pid, "renewed_ago_s": round(g.renewed_ago_s, 3),
            "expires_in_s": g.pttl_ms / 1000}


def _standbys(client, keys: Keys, queue: str) -> list[dict]:
    return live_standbys(client.hvals(keys.standbys(queue)))


def live_standbys(values) -> list[dict]:
    """The standbys that announced themselves lately, from an HVALS reply of a lane's standby hash."""
    out = []
    for raw in values:
        info = json.loads(raw)
        if time.time() * 1000 - info.get("seen_ms", 0) < STANDBY_SEEN_MS:
            out.append(info)
    return out


def snapshot(client, keys: Keys, queue: str, settings) -> Snapshot:
    """Everything about one lane (or the bulk queue) an operator looks at."""
    now = redis_now_ms(client)
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.delayed(queue))
    pipe.zcard(keys.dead_letter_index(queue))
    pipe.hgetall(keys.stats(queue))
    pipe.zrange(keys.lease_index, 0, -1)
    delayed, dlq, outcomes, lease_names = pipe.execute()
    minute = recent.totals(outcomes, now_ms=now, window_ms=60_000)
    hour = recent.totals(outcomes, now_ms=now, window_ms=3_600_000)
    kind = registry.BULK if queue == settings.bulk_queue else registry.LANE
    snap = Snapshot(queue=queue, now_ms=now, depth=flow.depth(client, keys, queue),
                    paused=flow.paused_info(client, keys, queue), kind=kind,
                    known=registry.is_known(client, keys, queue, default_lane=settings.queue,
                                            bulk_queue=settings.bulk_queue),
                    delayed=delayed, dead_letters=dlq, completed={"last_minute": minute["success"], "last_hour": hour["success"]},
                    failed={"last_minute": minute["failure"], "last_hour": hour["failure"]},
                    head_waiting_s=head_waiting_s(client, keys, queue, now))
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
    snap.guard = _guard(client, keys, queue)
    snap.standbys = _standbys(client, keys, queue)
    for raw in lease_names:
        name = text(raw)
        if keys.is_worker_lease(name) or keys.is_relay_lease(name):
            continue  # the guard, worker presence and outbox relay are shown apart
        lease = Lease(client, name, keys=keys)
        h = lease.holder()
        snap.leases.append({"name": name, "fence": lease.fence(), "held": h is not None,
                            "holder": h.label if h else None, "expires_in_s": h.pttl_ms / 1000 if h else None})
    snap.circuits = _circuits(client, keys)
    snap.limits = _limits(client, keys, settings.limits)
    snap.redis = redis_health(client, keys, settings)
    snap.outbox = _outbox(client, keys, queue, now)
    snap.coalescing = coalescing.view(client, keys, queue).to_dict()
    return snap


def _outbox(client, keys: Keys, lane: str, now_ms: int) -> dict | None:
    """The lane's outbox as the relay reported it (read from Redis: status never needs the database).

    The oldest row's age goes on growing after the report, so a relay that stopped shows.
    """
    raw = client.hget(keys.outbox_lanes, lane)
    if raw is None:
        return None
    r = json.loads(raw)
    depth, oldest_age_s, since_ms = outbox_report(r, now_ms)
    relay = Lease(client, keys.relay_lease(lane), keys=keys).holder()
    return {"depth": depth,
            "oldest_age_s": None if oldest_age_s is None else round(oldest_age_s, 3),
            "reported_ago_s": round(since_ms / 1000, 3),
            "relay": None if relay is None else {"label": relay.label, "host": relay.host, "pid": relay.pid}}


def outbox_report(r: dict, now_ms: int) -> tuple[int, float | None, int]:
    """A relay's report of a lane (parsed JSON) -> rows waiting, the oldest's age now (s; None: no
    row) and how long ago it reported (ms). The age goes on growing after the report."""
    since_ms = max(0, now_ms - int(r.get("reported_ms", now_ms)))
    age_ms = r.get("oldest_age_ms")
    return int(r.get("depth", 0)), None if age_ms is None else (age_ms + since_ms) / 1000, since_ms


def lane_line(client, keys: Keys, queue: str, settings, now_ms: int) -> dict:
    """One line of the overview: a lane (or bulk queue) at a glance."""
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.inflight_index(queue))
    pipe.zcard(keys.dead_letter_index(queue))
    pipe.zcard(keys.delayed(queue))
    pipe.exists(keys.paused(queue))
    pipe.hgetall(keys.stats(queue))
    pipe.hget(keys.coalesce_counts(queue), "coalesced")
    in_flight, dlq, delayed, paused, outcomes, coalesced = pipe.execute()
    ok_m = recent.totals(outcomes, now_ms=now_ms, window_ms=60_000)["success"]
    guard = _guard(client, keys, queue)
    return {
        "name": queue,
        "kind": registry.BULK if queue == settings.bulk_queue else registry.LANE,
        "depth": flow.depth(client, keys, queue),
        "in_flight": in_flight,
        "delayed": delayed,
        "holder": guard,
        "standbys": len(_standbys(client, keys, queue)),
        "paused": bool(paused),
        "dead_letters": dlq,
        "completed_last_minute": ok_m,
        "coalesced": int(coalesced or 0),
        "head_waiting_s": head_waiting_s(client, keys, queue, now_ms),
        "outbox": _outbox(client, keys, queue, now_ms),
    }


def overview(client, keys: Keys, settings) -> dict:
    """Every lane and bulk queue, one line each, and what they share (circuits, capped resources)."""
    now = redis_now_ms(client)
    lanes = registry.lanes(client, keys, default_lane=settings.queue, bulk_queue=settings.bulk_queue)
    bulks = registry.bulk_queues(client, keys, bulk_queue=settings.bulk_queue)
    # a lane the outbox relay publishes to is listed even before any worker consumes it
    lanes += sorted({text(x) for x in client.hkeys(keys.outbox_lanes)} - set(lanes) - set(bulks))
    return {
        "schema": SCHEMA_VERSION,
        "now_ms": now,
        "lanes": [lane_line(client, keys, q, settings, now) for q in lanes],
        "bulk": [lane_line(client, keys, q, settings, now) for q in bulks],
        "circuits": _circuits(client, keys),
        "limits": _limits(client, keys, settings.limits),
        "redis": redis_health(client, keys, settings),
    }


def lanes_overview(client, keys: Keys, settings) -> list[dict]:
    """The overview's lines, lanes then bulk queues (what the HTTP intake's GET /v1/lanes lists)."""
    o = overview(client, keys, settings)
    return o["lanes"] + o["bulk"]


def dumps(data) -> str:
    """The stable JSON form of a snapshot or an overview."""
    d = data.to_dict() if isinstance(data, Snapshot) else data
    return json.dumps(d, indent=2, sort_keys=True)
