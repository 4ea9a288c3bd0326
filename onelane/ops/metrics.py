"""Prometheus metrics: what onelane knows, read from Redis at each scrape (``onelane exporter``).

Each scrape reads Redis in at most three pipelined round trips whatever the number of lanes
and resources — the registry, counters, histograms and indexes; then every lane's and
resource's keys; then the start of each in-flight attempt — and never scans the key space.
Its one write is the display-only "head seen" mark `onelane status` keeps too: a scrape
cannot disturb a worker. When Redis cannot be reached the exporter
still answers, with ``onelane_redis_up 0``, so the alert on it can fire.

Counters and histograms are kept in Redis by the workers (:mod:`onelane.core.counters`), so
every worker's work is counted once and survives restarts of workers and of this exporter.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import redis

from onelane.coordination.circuit import Circuit
from onelane.coordination.lease import Lease
from onelane.core import counters
from onelane.core.clock import time_ms
from onelane.core.keys import Keys
from onelane.core.text import text, text_map
from onelane.delivery import flow, registry
from onelane.delivery.messages import parse_queued, task_id_of
from onelane.ops.status import live_standbys, outbox_report

log = logging.getLogger(__name__)

DEFAULT_PORT = 9808
DEFAULT_BIND = "127.0.0.1"
#: an exporter's Redis client gives up quickly: a scrape must answer within Prometheus's timeout
SOCKET_TIMEOUT_S = 2.0
#: the in-flight records read per queue for the age of the oldest attempt
INFLIGHT_READ = 100

#: counter -> (metric name without _total, HELP)
COUNTER_HELP = {
    "succeeded": ("onelane_callouts_succeeded", "Callouts whose call succeeded (recorded once, by any worker)."),
    "failed": ("onelane_callouts_failed", "Callouts whose call failed for good (the API was called; dead-lettered)."),
    "dead_lettered": ("onelane_callouts_dead_lettered",
                      "Dead letters written: failed calls, bad input, messages no worker could run."),
    "retried": ("onelane_callouts_retried", "Failed attempts after which another attempt was planned."),
    "attempts": ("onelane_attempts", "Finished HTTP attempts by status class (2xx..5xx, error: no response)."),
    "orphans_requeued": ("onelane_orphans_requeued",
                         "Callouts of dead workers the reaper put back at the head of their queue."),
    "guard_takeovers": ("onelane_guard_takeovers", "Times a standby worker took over a lane's guard."),
}
HISTOGRAM_HELP = {
    "callout_duration_seconds": ("onelane_callout_duration_seconds", "Duration of one HTTP attempt."),
    "slot_wait_seconds": ("onelane_slot_wait_seconds", "Time a callout to a capped resource waited for a slot."),
}


@dataclass
class QueueView:
    name: str
    kind: str
    depth: int = 0
    in_flight: int = 0
    oldest_in_flight_s: float | None = None
    oldest_waiting_s: float | None = None
    dead_letters: int = 0
    delayed: int = 0
    paused: bool = False
    guard: object = None  # a Holder, or None
    standbys: int = 0
    outbox_depth: int | None = None
    outbox_oldest_s: float | None = None


@dataclass
class ResourceView:
    name: str
    lease_held: bool = False
    fence: int = 0
    circuit: str | None = None
    circuit_failures: int = 0
    slots_held: int | None = None
    slots_cap: int | None = None
    adaptive_cap: float | None = None


@dataclass
class Reading:
    """One scrape's worth of Redis, as plain data."""

    now_ms: int
    queues: list[QueueView] = field(default_factory=list)
    resources: list[ResourceView] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    histograms: dict = field(default_factory=dict)
    #: wall time of the Redis round trips of this reading, and their number
    redis_s: float = 0.0
    round_trips: int = 0


class _Timed:
    """Runs pipelines and adds up the time spent waiting for Redis."""

    def __init__(self):
        self.seconds = 0.0
        self.trips = 0

    def run(self, pipe, *, raise_on_error: bool = True) -> list:
        t0 = time.perf_counter()
        try:
            return pipe.execute(raise_on_error=raise_on_error)
        finally:
            self.seconds += time.perf_counter() - t0
            self.trips += 1


def read(client, keys: Keys, settings) -> Reading:
    """Everything the exporter shows, in three pipelined round trips."""
    timed = _Timed()
    # 1. what exists: queues, leases, circuits, the relay's outbox reports, counters, histograms
    p = client.pipeline(transaction=False)
    p.time()
    p.hgetall(keys.queues)
    p.zrange(keys.lease_index, 0, -1)
    p.smembers(keys.circuit_index)
    p.hgetall(keys.outbox_lanes)
    p.hgetall(keys.metric_counters)
    p.hgetall(keys.metric_histograms)
    now, reg_raw, lease_names, circuit_names, outbox_raw, counters_raw, hist_raw = timed.run(p)
    now_ms = time_ms(now)
    reg = registry.registered_from(reg_raw)
    lanes = registry.lanes_of(reg, default_lane=settings.queue, bulk_queue=settings.bulk_queue)
    bulks = registry.bulk_queues_of(reg, bulk_queue=settings.bulk_queue)
    outbox = {k: v for k, v in text_map(outbox_raw).items()}
    lanes += sorted(set(outbox) - set(lanes) - set(bulks))
    reading = Reading(now_ms=now_ms, counters=counters.parse_counters(text_map(counters_raw)),
                      histograms=counters.parse_histograms(text_map(hist_raw)))

    circuits = sorted(text(c) for c in circuit_names)
    resources = _resource_names(keys, lease_names, circuits, settings, reading.counters)

    # 2. every queue's and every resource's keys, in one pipeline
    p = client.pipeline(transaction=False)
    plans = []
    for name in [*lanes, *bulks]:
        n_depth = flow.queue_depth_reads(p, keys, name)
        p.zcard(keys.inflight_index(name))
        p.zrange(keys.inflight_index(name), 0, INFLIGHT_READ - 1)
        p.zcard(keys.dead_letter_index(name))
        p.zcard(keys.delayed(name))
        p.exists(keys.paused(name))
        guard = Lease(client, keys.guard_name(name), keys=keys)
        n_guard = guard.queue_holder_reads(p)
        p.hvals(keys.standbys(name))
        p.hgetall(keys.head_seen(name))
        n_head = _queue_head_reads(p, keys, name)
        plans.append((name, n_depth, n_guard, n_head))
    if resources:  # two commands for every resource's lease and fencing counter
        p.mget([keys.lease(keys.resource_lease(r)) for r in resources])
        p.mget([keys.lease_fence(keys.resource_lease(r)) for r in resources])
    for r in circuits:
        p.hgetall(keys.circuit(r))
    limits = list(settings.limits)
    for r, limit in limits:
        for i in range(1, limit.concurrency + 1):
            p.exists(keys.lease(keys.slot(r, i)))
        p.hget(keys.adaptive(r), "cap")
    replies = iter(timed.run(p))

    inflight_ids = []
    head_moves = []  # (queue, new head id or None): the head's clock starts at this look
    for name, n_depth, n_guard, n_head in plans:
        q = QueueView(name=name, kind=registry.BULK if name in bulks else registry.LANE)
        q.depth = flow.depth_from([next(replies) for _ in range(n_depth)])
        q.in_flight = int(next(replies))
        inflight_ids.append((q, [text(t) for t in next(replies)]))
        q.dead_letters = int(next(replies))
        q.delayed = int(next(replies))
        q.paused = bool(next(replies))
        q.guard = Lease.holder_from(*[next(replies) for _ in range(n_guard)], now_ms)
        q.standbys = len(live_standbys(next(replies)))
        seen = text_map(next(replies))
        head = _head_from([next(replies) for _ in range(n_head)])
        q.oldest_waiting_s, head_id = _waiting_s(head, seen, now_ms)
        if head_id != seen.get("task_id"):
            head_moves.append((name, head_id))
        if name in outbox:
            q.outbox_depth, q.outbox_oldest_s = _outbox(outbox[name], now_ms)
        reading.queues.append(q)
    by_name = {}
    tokens, fences = (next(replies), next(replies)) if resources else ([], [])
    for r, token, fence in zip(resources, tokens, fences):
        by_name[r] = ResourceView(name=r, lease_held=token is not None, fence=int(fence or 0))
        reading.resources.append(by_name[r])
    for r in circuits:
        raw = next(replies)
        if raw:
            c = Circuit(client, keys, r, threshold=0, cooldown_ms=0, cooldown_max_ms=0).state_from(raw, now_ms)
            by_name[r].circuit, by_name[r].circuit_failures = c.state, c.failures
    for r, limit in limits:
        v = by_name[r]
        v.slots_held = sum(int(next(replies)) for _ in range(limit.concurrency))
        v.slots_cap = limit.concurrency
        cap = next(replies)
        if limit.adaptive:
            v.adaptive_cap = float(cap) if cap is not None else float(limit.concurrency)

    # 3. when each attempt in flight started (its record; the index holds deadlines); and, as
    # `onelane status` does, the first look at a new head of a queue starts its waiting clock
    # (the one write of a scrape: a display-only key, never one a worker reads)
    wanted = [(q, tid) for q, tids in inflight_ids for tid in tids]
    if wanted or head_moves:
        p = client.pipeline(transaction=False)
        for _q, tid in wanted:
            p.hget(keys.inflight(tid), "started_ms")
        for name, head_id in head_moves:
            if head_id is None:
                p.delete(keys.head_seen(name))
            else:
                p.hset(keys.head_seen(name), mapping={"task_id": head_id, "since_ms": now_ms})
        # a refused write (OOM, a read-only replica) must not cost the scrape: errors come back
        # as replies here, and the display-only mark is simply set on a later scrape
        for (q, _tid), started in zip(wanted, timed.run(p, raise_on_error=False)):
            if isinstance(started, Exception):
                continue
            started = int(started or 0)
            if started:
                age = max(0.0, (now_ms - started) / 1000)
                q.oldest_in_flight_s = max(q.oldest_in_flight_s or 0.0, age)
    reading.redis_s, reading.round_trips = timed.seconds, timed.trips
    return reading


def _resource_names(keys: Keys, lease_names, circuit_names, settings, counted: dict) -> list[str]:
    """Every resource worth a line: those with a lease or slot in the index, a circuit, a declared
    limit, or a count — never a scan of the key space."""
    capped = {r for r, _limit in settings.limits}
    names = set(capped)
    for raw in lease_names:
        n = text(raw)
        if keys.is_worker_lease(n) or keys.is_relay_lease(n) or not n.startswith("resource:"):
            continue
        name = n[len("resource:"):]
        base, _, slot = name.rpartition("#")
        names.add(base if base in capped and slot.isdigit() else name)  # a capped resource's slot: its resource
    names |= set(circuit_names)
    names |= {k[2] for k in counted if len(k) > 2 and counters.COUNTERS[k[0]][1:2] == ("resource",)}
    return sorted(names)


def _queue_head_reads(pipe, keys: Keys, queue: str) -> int:
    pipe.lindex(keys.ready(queue), -1)
    pipe.lindex(keys.queue_list(queue), -1)
    return 2


def _head_from(replies):
    ready, queued = replies
    return ready if ready is not None else queued


def _waiting_s(head_raw, seen: dict, now_ms: int) -> tuple[float | None, str | None]:
    """How long the head has waited (None: nothing waits), and its task id. Messages carry no
    publish time: the first look (a scrape, or ``onelane status``) at a new head starts its clock,
    so this is a lower bound, as in status."""
    head = parse_queued(head_raw) if head_raw is not None else None
    head_id = task_id_of(head) if head else None
    if head_id is None:
        return None, None
    if seen.get("task_id") != head_id:
        return 0.0, head_id
    return max(0.0, (now_ms - int(seen.get("since_ms") or now_ms)) / 1000), head_id


def _outbox(raw: str, now_ms: int) -> tuple[int, float | None]:
    try:
        depth, oldest_s, _since_ms = outbox_report(json.loads(raw), now_ms)
    except (ValueError, TypeError, AttributeError):
        return 0, None
    return depth, oldest_s


# -- the Prometheus side ---------------------------------------------------------------------------
class OnelaneCollector:
    """A prometheus_client collector that reads Redis at each scrape."""

    def __init__(self, client, keys: Keys, settings):
        self.client = client
        self.keys = keys
        self.settings = settings
        self._lock = threading.Lock()  # one reading at a time, whatever the number of scrapers

    def describe(self):
        return []  # collected at scrape time only (no registration-time read of Redis)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        t0 = time.perf_counter()
        up = GaugeMetricFamily("onelane_redis_up", "1 when the exporter could read Redis at this scrape, else 0.")
        try:
            with self._lock:
                reading = read(self.client, self.keys, self.settings)
        except (redis.RedisError, OSError) as exc:
            log.warning("onelane: exporter: cannot read Redis (%s)", str(exc)[:200])
            up.add_metric([], 0)
            yield up
            yield _scrape_gauge(time.perf_counter() - t0)
            return
        up.add_metric([], 1)
        yield up
        yield from families(reading)
        yield _scrape_gauge(time.perf_counter() - t0)


def _scrape_gauge(seconds: float):
    from prometheus_client.core import GaugeMetricFamily

    g = GaugeMetricFamily("onelane_scrape_duration_seconds", "Time this scrape took, Redis included.")
    g.add_metric([], seconds)
    return g


def families(reading: Reading):
    """The metric families of one reading."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

    def gauge(name, help_text, labels):
        return GaugeMetricFamily(name, help_text, labels=labels)

    g = gauge("onelane_scrape_redis_seconds", "Time this scrape spent waiting for Redis.", [])
    g.add_metric([], reading.redis_s)
    yield g
    g = gauge("onelane_scrape_redis_round_trips", "Redis round trips of this scrape.", [])
    g.add_metric([], reading.round_trips)
    yield g

    lane_gauges = [
        ("onelane_queue_depth", "Callouts waiting in the queue (ready, queued, prioritised, parked).",
         lambda q: q.depth),
        ("onelane_in_flight", "Callout attempts under way.", lambda q: q.in_flight),
        ("onelane_oldest_in_flight_age_seconds", "Age of the oldest attempt under way (0: none).",
         lambda q: q.oldest_in_flight_s or 0.0),
        ("onelane_oldest_waiting_age_seconds",
         "How long the callout at the head of the queue has waited there (0: none; a lower bound).",
         lambda q: q.oldest_waiting_s or 0.0),
        ("onelane_dead_letters", "Dead letters waiting in the lane.", lambda q: q.dead_letters),
        ("onelane_delayed_retries", "Relaxed-order retries waiting in the delay set.", lambda q: q.delayed),
        ("onelane_paused", "1 while the lane is paused (onelane pause).", lambda q: int(q.paused)),
        ("onelane_guard_held", "1 while a worker holds the lane's guard (its one consumer).",
         lambda q: int(q.guard is not None)),
        ("onelane_standbys", "Standby workers waiting to take the lane over.", lambda q: q.standbys),
    ]
    for name, help_text, value in lane_gauges:
        g = gauge(name, help_text, ["lane", "kind"])
        for q in reading.queues:
            g.add_metric([q.name, q.kind], value(q))
        yield g
    info = InfoMetricFamily("onelane_guard_holder", "The worker holding a lane's guard.",
                            labels=["lane"])
    for q in reading.queues:
        if q.guard is not None:
            info.add_metric([q.name], {"label": q.guard.label, "host": q.guard.host, "pid": str(q.guard.pid or "")})
    yield info
    boxes = [q for q in reading.queues if q.outbox_depth is not None]
    g = gauge("onelane_outbox_depth", "Outbox rows waiting to be published, as the relay last reported.", ["lane"])
    g2 = gauge("onelane_outbox_oldest_age_seconds", "Age of the oldest waiting outbox row (0: none).", ["lane"])
    for q in boxes:
        g.add_metric([q.name], q.outbox_depth)
        g2.add_metric([q.name], q.outbox_oldest_s or 0.0)
    yield g
    yield g2

    res = reading.resources
    g = gauge("onelane_lease_held", "1 while the resource's lease is held (a callout to it is under way).",
              ["resource"])
    g2 = gauge("onelane_fencing_token",
               "The resource's fencing counter (grows with every lease granted, and every try before a callout).",
               ["resource"])
    for r in res:
        g.add_metric([r.name], int(r.lease_held))
        g2.add_metric([r.name], r.fence)
    yield g
    yield g2
    g = gauge("onelane_circuit_state", "The resource's circuit breaker: 1 for its current state.",
              ["resource", "state"])
    g2 = gauge("onelane_circuit_failures", "Callouts in a row that failed on the resource.", ["resource"])
    for r in res:
        if r.circuit is None:
            continue
        for state in ("closed", "open", "half-open"):
            g.add_metric([r.name, state], int(r.circuit == state))
        g2.add_metric([r.name], r.circuit_failures)
    yield g
    yield g2
    capped = [r for r in res if r.slots_cap is not None]
    g = gauge("onelane_slots_held", "Slots of a capped resource held now.", ["resource"])
    g2 = gauge("onelane_slots_cap", "The declared cap of a capped resource (ONELANE_LIMITS).", ["resource"])
    g3 = gauge("onelane_adaptive_cap", "The adaptive (AIMD) effective cap of a resource.", ["resource"])
    for r in capped:
        g.add_metric([r.name], r.slots_held)
        g2.add_metric([r.name], r.slots_cap)
        if r.adaptive_cap is not None:
            g3.add_metric([r.name], r.adaptive_cap)
    yield g
    yield g2
    yield g3

    for metric, labels in counters.COUNTERS.items():
        name, help_text = COUNTER_HELP[metric]
        c = CounterMetricFamily(name, help_text, labels=list(labels))
        for key, value in sorted(reading.counters.items()):
            if key[0] == metric:
                c.add_metric(list(key[1:]), value)
        yield c
    for metric, (labels, bounds) in counters.HISTOGRAMS.items():
        name, help_text = HISTOGRAM_HELP[metric]
        h = HistogramMetricFamily(name, help_text, labels=list(labels))
        for key, series in sorted(reading.histograms.items()):
            if key[0] != metric:
                continue
            les = [_le(b) for b in bounds] + ["+Inf"]
            h.add_metric(list(key[1:]), list(zip(les, series["buckets"])), series["sum"])
        yield h


def _le(bound: float) -> str:
    return repr(float(bound))


def exporter_client(settings):
    """A Redis client that gives up within seconds (a scrape must answer even with Redis away)."""
    from onelane.core.clients import client_for

    if settings.uses_sentinel:
        return client_for(settings)
    extra = {}
    if settings.redis_url.startswith("rediss://"):
        extra["ssl_cert_reqs"] = "required"
        if settings.redis_ca_certs:
            extra["ssl_ca_certs"] = settings.redis_ca_certs
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=SOCKET_TIMEOUT_S,
                                socket_timeout=SOCKET_TIMEOUT_S, **extra)


def registry_for(settings, client=None):
    """A prometheus_client registry holding onelane's collector (and nothing of this process's own)."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(OnelaneCollector(client or exporter_client(settings), Keys(settings.key_prefix), settings))
    return reg


def render(settings, client=None) -> bytes:
    """One scrape's text exposition (for tests and ``onelane exporter --once``)."""
    from prometheus_client import generate_latest

    return generate_latest(registry_for(settings, client))


def serve(settings, *, port: int = DEFAULT_PORT, bind: str = DEFAULT_BIND):
    """Serve /metrics on ``bind:port`` in a background thread; returns (server, thread)."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=bind, registry=registry_for(settings))
