"""``make bench``'s coalescing scenarios, with and without ``coalesce_key``, in the same run.

1. The fetch at depth: kombu's list of a lane holding D callouts (D = 100 and 100 000; keyed
   with 1 000 distinct keys, or without keys), fetched by the fetch script exactly as a worker
   runs it (``onelane.delivery.fetching.QueueFetch``): microseconds per message moved to the
   ready list (once per message), and per take afterwards, with the Redis commands and Redis
   CPU per take — a take must cost the same at any depth.
2. A worker's cost per callout with keys against without: N callouts to an API that answers
   at once, each with its own key (nothing to coalesce) or none: calls/s and the worker's CPU
   per callout.
3. The seed scenario in small: R records, each changed U times at random moments over a window,
   on a lane of 200 ms calls: the calls made and the wall time until every task id has its
   outcome, with keys and without.

Each scenario runs on its own private redis-server; nothing touches a shared Redis.
"""
from __future__ import annotations

import base64
import json
import random
import time
import uuid

from celery import Celery

from demo.fragile_api import FragileAPI
from demo.redis_server import RedisServer
from onelane.core.keys import Keys
from onelane.delivery.fetching import QueueFetch, Step
from tests.procs import children, worker

LANE = "serial"
KEYS = Keys()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children (pool processes), from /proc."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (100/s)
        except (FileNotFoundError, IndexError, ValueError):
            pass
    return total


def _redis_cpu_s(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _commands(client) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


# -- 1. the fetch at depth ---------------------------------------------------------------------
def _envelopes(n: int, keyed: bool, distinct_keys: int):
    """``n`` queued messages as Celery lays them out, built from one real one (ids, tags, bodies differ)."""
    with RedisServer(appendonly=False) as server:
        probe = Celery(broker=server.url)
        probe.send_task("tasks.callout", queue=LANE, kwargs={"url": "http://api.example/x"})
        import redis

        template = json.loads(redis.Redis.from_url(server.url).rpop(LANE))
    embed = json.loads(base64.b64decode(template["body"]))[2]
    for i in range(n):
        tid = str(uuid.uuid4())
        kwargs = {"url": f"https://api.example.com/orders/{i % distinct_keys}", "method": "PUT",
                  "json": {"order": i % distinct_keys, "version": i, "status": "shipped", "lines": [1, 2, 3]}}
        if keyed:
            kwargs["coalesce_key"] = f"order-{i % distinct_keys}"
        env = {**template, "headers": {**template["headers"], "id": tid, "root_id": tid},
               "properties": {**template["properties"], "delivery_tag": str(uuid.uuid4()), "correlation_id": tid}}
        env["body"] = base64.b64encode(json.dumps([[], kwargs, embed]).encode()).decode()
        yield json.dumps(env)


def fetch_at_depth(depth: int, keyed: bool, *, takes: int, distinct_keys: int = 1000) -> dict:
    import redis

    with RedisServer(appendonly=False) as server:
        client = redis.Redis.from_url(server.url)
        pipe = client.pipeline(transaction=False)
        for i, message in enumerate(_envelopes(depth, keyed, distinct_keys)):
            pipe.lpush(LANE, message)
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
        f = QueueFetch(KEYS, LANE, KEYS.fetch_list(LANE, "bench"))

        def take(budget: int) -> Step:
            step = Step.of(client.execute_command(*f.take_command(client)))
            while step.kind == "drain":
                budget -= len(step.drained)
                step = f.absorb(client, step.drained, drain_first=budget > 0)
            return step

        t0 = time.perf_counter()
        first = take(10 ** 9)  # moves the whole backlog to the ready list, then takes the head
        absorb_s = time.perf_counter() - t0
        assert first.kind == "msg"
        ready = client.llen(KEYS.ready(LANE))
        client.config_resetstat()
        cpu0 = _redis_cpu_s(client)
        times = []
        for _ in range(min(takes, ready)):
            t = time.perf_counter()
            step = take(10 ** 9)
            times.append(time.perf_counter() - t)
            assert step.kind == "msg", step.kind
        redis_cpu = _redis_cpu_s(client) - cpu0
        commands = _commands(client)
        n = len(times)
        commands.pop("config|resetstat", None)
        commands.pop("info", None)
        times.sort()
        return {"depth": depth, "keyed": keyed, "absorbed": depth, "carriers": ready + 1,
                "absorb_us_per_message": round(absorb_s / depth * 1e6, 1),
                "takes": n, "take_us_p50": round(times[n // 2] * 1e6, 1),
                "take_us_mean": round(sum(times) / n * 1e6, 1),
                "redis_commands_per_take": {k: round(v / n, 2) for k, v in sorted(commands.items())},
                "redis_cpu_us_per_take": round(redis_cpu / n * 1e6, 1)}


# -- 2. a worker's cost per callout, keyed or not ----------------------------------------------
def per_callout(n: int, keyed: bool, env_for) -> dict:
    with RedisServer(appendonly=False) as server, FragileAPI(delay_s=0) as api:
        env = env_for(server.url)
        app = Celery(broker=server.url, backend=server.url)
        results = []
        for i in range(n):
            kwargs = {"url": f"{api.url}/o", "json": {"i": i}}
            if keyed:
                kwargs["coalesce_key"] = f"rec-{i}"
            results.append(app.send_task("tasks.callout", kwargs=kwargs, queue=LANE))
        w = worker(env, "coal", queue=LANE).start(timeout_s=60)
        try:
            cpu0 = _cpu_s(w.pid)
            for r in results:
                r.get(timeout=600)
            cpu = _cpu_s(w.pid) - cpu0
        finally:
            w.stop()
        calls = api.snapshot()
        span = max(c.end for c in calls) - min(c.start for c in calls)
        return {"calls": len(calls), "per_s": round(len(calls) / span, 1),
                "worker_cpu_ms_per_callout": round(cpu / len(calls) * 1000, 3)}


# -- 3. the seed scenario ----------------------------------------------------------------------
def seed(records: int, updates: int, call_s: float, window_s: float, keyed: bool, env_for) -> dict:
    rng = random.Random(20)
    moments = sorted((rng.uniform(0, window_s), r) for r in range(records) for _ in range(updates))
    with RedisServer(appendonly=False) as server, FragileAPI(delay_s=call_s) as api:
        env = env_for(server.url)
        app = Celery(broker=server.url, backend=server.url)
        w = worker(env, "seed", queue=LANE).start(timeout_s=60)
        try:
            results, version = [], {}
            t0 = time.time()
            for at, r in moments:
                time.sleep(max(0.0, t0 + at - time.time()))
                version[r] = version.get(r, -1) + 1
                kwargs = {"url": f"{api.url}/orders/{r}", "json": {"record": r, "version": version[r]}}
                if keyed:
                    kwargs["coalesce_key"] = f"order-{r}"
                results.append(app.send_task("tasks.callout", kwargs=kwargs, queue=LANE))
            for res in results:
                res.get(timeout=3600)
            wall = time.time() - t0
        finally:
            w.stop()
        calls = api.snapshot()
        last = {}
        for c in sorted(calls, key=lambda c: c.start):
            last[c.json()["record"]] = c.json()["version"]
        return {"updates": len(moments), "calls": len(calls), "wall_s": round(wall, 2),
                "newest_sent_for_every_record": last == version, "overlaps": api.overlaps}


def run(quick: bool, env_for) -> dict:
    """Every scenario; ``quick``: small sizes, and no per-callout run (the smoke run's time is precious)."""
    depths = (100, 1000) if quick else (100, 100_000)
    out = {"fetch": [fetch_at_depth(d, keyed, takes=100 if quick else 1000) for d in depths for keyed in (False, True)]}
    if not quick:
        out["per_callout"] = {"plain": per_callout(1000, False, env_for), "keyed": per_callout(1000, True, env_for)}
    r, u, call_s, window = (8, 4, 0.03, 0.5) if quick else (50, 10, 0.2, 10.0)
    out["seed"] = {"records": r, "updates_each": u, "call_s": call_s, "window_s": window,
                   "keyed": seed(r, u, call_s, window, True, env_for),
                   "plain": seed(r, u, call_s, window, False, env_for)}
    return out


def report_rows(res: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    by = {(f["depth"], f["keyed"]): f for f in res["fetch"]}
    for depth in sorted({d for d, _ in by}):
        k, p = by[(depth, True)], by[(depth, False)]
        rows.append((f"coalescing fetch, depth {depth:,}: us per message moved / per take (p50)",
                     f"keys: {k['absorb_us_per_message']} / {k['take_us_p50']}",
                     f"no keys: {p['absorb_us_per_message']} / {p['take_us_p50']}",
                     f"Redis CPU us per take {k['redis_cpu_us_per_take']} vs {p['redis_cpu_us_per_take']}; "
                     f"{k['carriers']:,} carriers"))
    pc = res.get("per_callout")
    rows.append((f"coalescing, {pc['keyed']['calls']} callouts each with its own key: calls/s; worker CPU ms/callout",
                 f"{pc['keyed']['per_s']}; {pc['keyed']['worker_cpu_ms_per_callout']}",
                 f"no keys {pc['plain']['per_s']}; {pc['plain']['worker_cpu_ms_per_callout']}",
                 f"{pc['keyed']['per_s'] / pc['plain']['per_s']:.2f}x")) if pc else None
    rows = [r for r in rows if r]
    s = res["seed"]
    k, p = s["keyed"], s["plain"]
    rows.append((f"coalescing, {s['records']} records x {s['updates_each']} updates over {s['window_s']} s, "
                 f"{s['call_s'] * 1000:.0f} ms calls: calls, wall s",
                 f"keys: {k['calls']} calls, {k['wall_s']} s", f"no keys: {p['calls']} calls, {p['wall_s']} s",
                 f"{p['wall_s'] / k['wall_s']:.1f}x faster; newest sent: {k['newest_sent_for_every_record']}"))
    return rows
