"""``make bench``'s high-availability scenario: what waiting for a replica costs per callout.

The same N callouts to an API that answers at once, through one worker (prefork ``-c 1``),
three ways in the same run:

1. a single redis-server (``redis://``), as the overhead scenario runs it;
2. a master with one replica behind three sentinels, ``ONELANE_MIN_REPLICAS=0``: the cost of
   the Sentinel connection alone;
3. the same with ``ONELANE_MIN_REPLICAS=1`` (the default behind Sentinel): every lease grant,
   fetch claim and outcome waits for the replica's ``WAIT`` acknowledgement.

Calls/s and the handoff gap (end of one call to the start of the next, at the API), each
against the single Redis. Every server is private, on a free port; nothing touches a shared Redis.
"""
from __future__ import annotations

from celery import Celery

from bench.figures import gaps_ms, pct
from demo.fragile_api import FragileAPI
from demo.redis_server import RedisServer, SentinelCluster
from tests.procs import worker


def _flow(env: dict, producer: Celery, api: FragileAPI, n: int) -> dict:
    results = [producer.send_task("tasks.callout", kwargs={"url": f"{api.url}/r", "json": {"i": i}}, queue="serial")
               for i in range(n)]
    w = worker(env, name="ha-bench").start(timeout_s=60)
    try:
        for r in results:
            r.get(timeout=600)
    finally:
        w.stop()
    calls = sorted(api.snapshot(), key=lambda c: c.start)
    span = calls[-1].end - calls[0].start
    gaps = gaps_ms(calls)
    return {"calls": len(calls), "per_s": round(len(calls) / span, 1), "gap_p50_ms": round(pct(gaps, 50), 2),
            "gap_p99_ms": round(pct(gaps, 99), 2), "overlaps": api.overlaps}


def run(quick: bool, env_for) -> dict:
    """Single Redis, Sentinel without and with the replica wait: calls/s and gaps, in one run."""
    n = 50 if quick else 1000
    out = {"calls": n}
    with RedisServer(appendonly=False) as server, FragileAPI(delay_s=0) as api:
        out["single"] = _flow(env_for(server.url), Celery(broker=server.url, backend=server.url), api, n)
    with SentinelCluster(replicas=1) as cluster:
        cluster.wait_settled(60)
        opts = {"master_name": cluster.master_name}
        producer = Celery(broker=cluster.url, backend=cluster.url)
        producer.conf.update(broker_transport_options=opts, result_backend_transport_options=opts)
        for needed in (0, 1):  # one after the other on the same servers, a worker each
            env = env_for(cluster.url, ONELANE_SENTINEL_MASTER=cluster.master_name,
                          ONELANE_MIN_REPLICAS=str(needed))
            with FragileAPI(delay_s=0) as api:
                out[f"sentinel_min_replicas_{needed}"] = _flow(env, producer, api, n)
    base = out["single"]["per_s"]
    for k in ("sentinel_min_replicas_0", "sentinel_min_replicas_1"):
        out[k]["ratio_to_single"] = round(out[k]["per_s"] / base, 3)
    out["replica_wait_ratio"] = round(out["sentinel_min_replicas_1"]["per_s"]
                                      / out["sentinel_min_replicas_0"]["per_s"], 3)
    return out


def report_rows(res: dict) -> list[tuple[str, str, str, str]]:
    """Rows of the bench table: each Sentinel run against the single Redis."""
    single = res["single"]
    rows = []
    for k, label in (("sentinel_min_replicas_0", "Sentinel + 1 replica, ONELANE_MIN_REPLICAS=0"),
                     ("sentinel_min_replicas_1", "Sentinel + 1 replica, ONELANE_MIN_REPLICAS=1 (WAIT)")):
        r = res[k]
        rows.append((f"HA, {res['calls']} callouts: {label} — calls/s; gap p50 / p99 ms",
                     f"{r['per_s']}; {r['gap_p50_ms']} / {r['gap_p99_ms']}",
                     f"single Redis {single['per_s']}; {single['gap_p50_ms']} / {single['gap_p99_ms']}",
                     f"{r['ratio_to_single']:.2f}x single; overlaps {r['overlaps']}"))
    rows.append(("  the replica wait alone (MIN_REPLICAS=1 against 0)", "", "", f"{res['replica_wait_ratio']:.2f}x"))
    return rows
