"""``make bench``'s intake scenarios: the HTTP intake beside plain ``send_task``, measured in the same run.

1. Accepting: single POSTs over keep-alive connections from a few client processes (a bounded
   Python client on loopback: a fixed number of requests each), against the same number of
   processes publishing with ``send_task``. Requests (publishes) per second, latency p50/p99.
2. End to end on an idle lane: from the POST (or the ``send_task`` call) until the fragile API
   receives the call, one callout at a time, with a worker on the lane.

Each scenario runs on its own private redis-server; nothing touches a shared Redis.
"""
from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import queue
import time

from celery import Celery

from bench.figures import pct
from demo.fragile_api import FragileAPI
from demo.redis_server import RedisServer
from onelane.ops.intake.tokens import TokensFile
from tests.intake_proc import IntakeProcess
from tests.procs import wait_for, worker

LANE = "serial"


def env_for(url: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONELANE_")}
    env.update(REDIS_URL=url, ONELANE_ALLOW_PRIVATE_NETWORKS="1", PYTHONPATH=os.getcwd(), **extra)
    return env


def _intake_client(port: int, token: str, n: int, start_at: float, out) -> None:
    """One keep-alive connection, ``n`` POSTs in a row; puts (latencies in ms, statuses, seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    lat, statuses = [], {}
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.perf_counter()
    for i in range(n):
        body = json.dumps({"url": "http://127.0.0.1:9/bench", "json": {"i": i, "pid": os.getpid()}})
        s = time.perf_counter()
        conn.request("POST", f"/v1/lanes/{LANE}/callouts", body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        lat.append((time.perf_counter() - s) * 1000)
        statuses[r.status] = statuses.get(r.status, 0) + 1
    out.put((lat, statuses, time.perf_counter() - t0))
    conn.close()


def _send_task_client(url: str, n: int, start_at: float, out) -> None:
    """``send_task`` from a producer with only Celery and the broker URL, ``n`` times in a row."""
    app = Celery(broker=url, backend=url)
    app.conf.task_serializer = "json"
    app.send_task("tasks.callout", kwargs={"url": "http://127.0.0.1:9/warm"}, queue=LANE)  # connect first
    lat = []
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        app.send_task("tasks.callout", kwargs={"url": "http://127.0.0.1:9/bench", "json": {"i": i}}, queue=LANE)
        lat.append((time.perf_counter() - s) * 1000)
    out.put((lat, {202: n}, time.perf_counter() - t0))


def _run_clients(target, args_of, clients: int, n: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 2.0  # every client connected and waiting, then all at once
    procs = [ctx.Process(target=target, args=(*args_of(c), n, start_at, out), daemon=True) for c in range(clients)]
    for p in procs:
        p.start()
    results = []
    try:
        give_up = time.monotonic() + 600
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=1))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > give_up:
                    raise RuntimeError(f"bench client(s) failed or took too long: exit codes "
                                       f"{[p.exitcode for p in procs]}") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    lat = [x for r in results for x in r[0]]
    statuses: dict = {}
    for r in results:
        for k, v in r[1].items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    seconds = max(r[2] for r in results)
    return {"requests": len(lat), "clients": clients, "seconds": round(seconds, 3),
            "per_s": round(len(lat) / seconds, 1), "p50_ms": round(pct(lat, 50), 2),
            "p99_ms": round(pct(lat, 99), 2), "statuses": statuses}


def _token(tmp: str) -> tuple[str, str]:
    path = os.path.join(tmp, "tokens.json")
    return TokensFile(path).add([LANE], name="bench")[0], path


def accepting(n: int, clients: int, workers: int = 1) -> dict:
    """Single POSTs with keep-alive against send_task, no worker consuming (only the accepting side)."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(appendonly=False) as server:
        token, path = _token(tmp)
        intake = IntakeProcess(env_for(server.url, ONELANE_INTAKE_TOKENS_FILE=path),
                               extra=["--workers", str(workers), "--no-access-log"]).start()
        try:
            out["intake"] = _run_clients(_intake_client, lambda c: (intake.port, token), clients, n)
        finally:
            intake.stop()
    with RedisServer(appendonly=False) as server:
        out["send_task"] = _run_clients(_send_task_client, lambda c: (server.url,), clients, n)
    out["ratio"] = round(out["intake"]["per_s"] / out["send_task"]["per_s"], 3)
    return out


def end_to_end(samples: int) -> dict:
    """POST (or send_task) to the API receiving the call, one at a time on an idle lane."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(appendonly=False) as server, FragileAPI() as api:
        token, path = _token(tmp)
        env = env_for(server.url, ONELANE_INTAKE_TOKENS_FILE=path)
        w = worker(env, "e2e", queue=LANE).start(timeout_s=60)
        intake = IntakeProcess(env, extra=["--no-access-log"]).start()
        app = Celery(broker=server.url, backend=server.url)
        try:
            def one(i: int, via: str) -> float:
                key = f"{via}-{i}"
                t0 = time.time()
                if via == "intake":
                    r = intake.post(LANE, {"url": f"{api.url}/e2e"}, token=token, key=key)
                    assert r.status_code == 202, r.text
                else:
                    app.send_task("tasks.callout", kwargs={"url": f"{api.url}/e2e", "idempotency_key": key},
                                  queue=LANE)
                call = wait_for(lambda: (api.calls_for(key) or [None])[0], 30, 0.0005, what=f"the call {key}")
                wait_for(lambda: call.end is not None, 30, 0.001, what="the call to end")
                time.sleep(0.05)  # the worker records the outcome and is idle again
                return (call.start - t0) * 1000

            for via in ("intake", "send_task"):
                one(-1, via)  # warm-up: connections made, scripts loaded
                lat = [one(i, via) for i in range(samples)]
                out[via] = {"samples": samples, "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2),
                            "max_ms": round(max(lat), 2)}
            out["overlaps"] = api.overlaps
        finally:
            intake.stop()
            w.stop()
    return out


def run(quick: bool) -> dict:
    n = 200 if quick else 2000
    res = {"accepting": accepting(n, clients=4)}
    if not quick:
        res["accepting_2_workers"] = accepting(n, clients=4, workers=2)
    res["end_to_end"] = end_to_end(10 if quick else 100)
    return res


def report_rows(res: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, label in (("accepting", "1 intake process"), ("accepting_2_workers", "--workers 2")):
        a = res.get(name)
        if not a:
            continue
        i, b = a["intake"], a["send_task"]
        rows.append((f"intake, single POSTs, keep-alive, {i['clients']} clients x {i['requests'] // i['clients']}, "
                     f"{label}: requests/s", str(i["per_s"]), f"send_task {b['per_s']}", f"{a['ratio']:.2f}x"))
        rows.append(("  latency p50 / p99 ms", f"{i['p50_ms']} / {i['p99_ms']}", f"{b['p50_ms']} / {b['p99_ms']}",
                     f"statuses {i['statuses']}"))
    e = res["end_to_end"]
    rows.append((f"intake end to end, idle lane, {e['intake']['samples']} callouts: POST to API p50 / p99 ms",
                 f"{e['intake']['p50_ms']} / {e['intake']['p99_ms']}",
                 f"send_task {e['send_task']['p50_ms']} / {e['send_task']['p99_ms']}", f"overlaps {e['overlaps']}"))
    return rows
