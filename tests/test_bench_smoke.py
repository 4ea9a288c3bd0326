"""A short benchmark run: every scenario measures onelane and its baseline (no timed assertions)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import procs

pytestmark = pytest.mark.e2e


def run_bench(args: list[str], env: dict, *, timeout_s: float) -> subprocess.CompletedProcess:
    """``python -m bench ARGS``; past ``timeout_s`` it is asked to stop with SIGTERM, which unwinds
    through its ``finally`` blocks and so stops every server and worker it started (each in a session
    of its own, out of reach of a kill of its group), and killed only if it has not within 60 s."""
    proc = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=str(procs.ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"the bench ran over {timeout_s} s and was stopped:\n{stdout[-2000:]}{stderr[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# the smoke run takes about 140 s alone, mostly starting workers and servers; beside the rest of the
# suite on two cores it took over 300 s once, so its bound is twice that
@pytest.mark.timeout(720)
def test_bench_quick_measures_onelane_and_baselines(base_env, tmp_path):
    out = tmp_path / "results.json"
    run = run_bench(["--quick", "--calls", "60", "--jobs", "6", "--out", str(out)], base_env, timeout_s=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    res = json.loads(out.read_text())
    over = res["overhead"]["prefork"]
    assert over["onelane"]["calls"] == 60 and over["bare"]["calls"] == 60
    assert over["onelane"]["overlaps"] == 0 and over["ratio"] > 0
    assert over["onelane"]["rss_mb"] > 0 and over["bare"]["rss_mb"] > 0
    for pool in ("prefork", "solo"):  # per-callout costs of both, in the same run
        o = res["overhead"][pool]
        assert o["onelane"]["calls"] == o["bare"]["calls"] == 60 and o["onelane"]["overlaps"] == 0
        for side in ("onelane", "bare"):
            cost = o[side]["cost"]
            assert cost["worker_cpu_ms_per_callout"] > 0 and cost["redis_cpu_ms_per_callout"] >= 0
            assert cost["redis_round_trips_per_callout"] > 0 and cost["redis_commands"]
        assert o["onelane"]["cost"]["redis_commands"].get("evalsha", 0) > 0  # onelane's scripts ran
        assert "brpop" in o["bare"]["cost"]["redis_commands"]  # kombu's own fetch
        assert set(o["cost_ratio"]) == {"worker_cpu_ms_per_callout", "redis_cpu_ms_per_callout",
                                        "redis_round_trips_per_callout", "redis_commands_per_callout"}
    c = res["contention"]
    assert c["onelane"]["overlaps"] == 0 and c["onelane"]["requeues"] == 0
    assert c["spinlock"]["seconds"] > 0
    for kind in ("child", "worker"):
        r = res["recovery"]["onelane"][kind]
        assert r["overlaps"] == 0 and r["seconds_after_deadline"] >= 0
    assert res["recovery"]["bare"]["child"]["seconds_after_kill"] is not None
    cap = res["capacity"]
    assert cap["onelane_cap_25"]["failed_calls"] == 0 and cap["onelane_cap_25"]["max_concurrency"] <= 25
    assert {"unlimited", "sleep_between_calls", "cost_ratio"} <= set(cap)
    assert "unlimited_all_succeed" not in cap  # the same-work baseline: full runs only
    for name in ("onelane_cap_25", "unlimited"):
        ceil = cap[name]["cost"]["ceilings"]
        assert ceil["cap_calls_per_s"] == 500 and ceil["bound_by"] and 0 < ceil["utilisation_ceiling"] <= 1
    ln = res["lanes"]
    assert ln["lanes"] == 3 and ln["overlaps_within_a_lane"] == 0 and ln["max_lanes_in_flight_at_once"] >= 2
    assert ln["one_lane_rss_mb_prefork"] > 0 and ln["one_lane_rss_mb_solo"] > 0 and ln["total_rss_mb"] > 0
    mem = res["redis_memory"]
    assert mem["queued"] == 2000 and mem["bytes_per_queued_callout"] > 100 and mem["bytes_per_dead_letter"] > 100
    ob = res["outbox"]
    for mode in ("notify", "poll", "send_task"):  # commit-to-API latency, each callout once
        lat = ob["latency"][mode]
        assert lat["calls"] == 30 and lat["once_each"] and lat["overlaps"] == 0 and lat["p99_ms"] >= lat["p50_ms"] > 0
    relay = ob["throughput"]["relay"]
    assert relay["queued"] == relay["rows"] == 500 and relay["rows_per_s"] > 0
    assert ob["throughput"]["send_task"]["rows_per_s"] > 0
    intake = res["intake"]
    assert intake["accepting"]["intake"]["statuses"] == {"202": intake["accepting"]["intake"]["requests"]}
    assert intake["accepting"]["send_task"]["per_s"] > 0 and intake["end_to_end"]["overlaps"] == 0
    assert "overhead" in run.stdout and "calls/s" in run.stdout and "outbox relay: rows/s" in run.stdout
    assert "intake" in run.stdout
    assert "worker CPU ms / callout" in run.stdout and "Redis commands per callout" in run.stdout
    assert "issue 14 targets" in run.stdout and all({"target", "measured", "goal", "met"} <= set(t)
                                                    for t in res["targets"]) and len(res["targets"]) == 13
    co = res["coalescing"]
    fetch = {(f["depth"], f["keyed"]): f for f in co["fetch"]}
    assert set(fetch) == {(100, False), (100, True), (1000, False), (1000, True)}
    assert fetch[(1000, True)]["carriers"] == 1000 and fetch[(1000, False)]["carriers"] == 1000
    assert all(f["takes"] > 0 and f["redis_commands_per_take"]["evalsha"] == 1.0 for f in fetch.values())
    seed = co["seed"]
    assert seed["plain"]["calls"] == seed["plain"]["updates"] == 32 and seed["keyed"]["calls"] < 32
    assert seed["keyed"]["newest_sent_for_every_record"] and seed["keyed"]["overlaps"] == 0
    assert "coalescing" in run.stdout
    ha = res["replication"]
    for k in ("single", "sentinel_min_replicas_0", "sentinel_min_replicas_1"):
        assert ha[k]["calls"] == ha["calls"] == 50 and ha[k]["overlaps"] == 0 and ha[k]["per_s"] > 0
    assert ha["replica_wait_ratio"] > 0 and "replica wait" in run.stdout
