"""What a measured window costs: worker CPU, Redis CPU, Redis commands and round trips, per callout.

A window opens when the workers are started, warmed and idle, and the callouts wait in a
staging list of the private Redis (published there beforehand, exactly as ``send_task`` laid
them out); ``release`` hands them to the queue with one ``RENAME`` (which wakes a blocked
BLMOVE or BRPOP), and the window closes when every callout has its result. So the figures
hold the consumption of N callouts only: no worker start-up, no publishing, no producer
subscribed to results.

Sources: ``/proc/<pid>/stat`` (utime + stime, plus the times of reaped children, of every
process of each worker: the parent and its pool children), ``/proc/self/stat`` for the bench
process (which serves the API), ``/proc/stat`` for the whole machine, and on the private
redis-server ``CONFIG RESETSTAT`` then ``INFO cpu`` (used_cpu_user + used_cpu_sys),
``INFO commandstats`` and ``INFO stats`` (``total_reads_processed``: one per request batch a
client sends, so a pipeline counts once — the round trips). The bench's own commands in the
window are counted and subtracted.
"""
from __future__ import annotations

import os
import time
from collections import Counter

from tests.procs import descendants

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_cpu_s(pid) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[11..14]: utime, stime, cutime, cstime (reaped children), in clock ticks
    return sum(int(x) for x in fields[11:15]) / TICKS_PER_S


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and every process below it (a worker and its pool)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            total += _stat_cpu_s(p)
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass  # gone between the listing and the read: its time is in its parent's cutime now
    return total


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    total = sum(v[:8])  # up to steal; guest time is already in user
    return (total - idle) / TICKS_PER_S, total / TICKS_PER_S


def redis_cpu_s(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class Window:
    """Counters between ``open()`` and ``close()``; ``own`` counts the bench's commands in between."""

    def __init__(self, client, worker_pids: list[int]):
        self.client = client
        self.worker_pids = list(worker_pids)
        self.own: Counter = Counter()

    def open(self) -> "Window":
        self.client.config_resetstat()
        self.own.update({"config|resetstat": 1, "info": 1})
        self.redis0 = redis_cpu_s(self.client)
        self.workers0 = [tree_cpu_s(p) for p in self.worker_pids]
        self.bench0 = _stat_cpu_s("self")
        self.machine0 = machine_cpu_s()
        self.t0 = time.monotonic()
        return self

    def command(self, name: str, *args):
        """Run one of the bench's own commands inside the window (counted, then subtracted)."""
        self.own[name.lower()] += 1
        return self.client.execute_command(name, *args)

    def close(self) -> "Window":
        self.wall_s = time.monotonic() - self.t0
        self.worker_cpu = [tree_cpu_s(p) - c0 for p, c0 in zip(self.worker_pids, self.workers0)]
        self.bench_cpu = _stat_cpu_s("self") - self.bench0
        busy, total = machine_cpu_s()
        self.machine_busy, self.machine_total = busy - self.machine0[0], total - self.machine0[1]
        self.redis_cpu = redis_cpu_s(self.client) - self.redis0
        self.own["info"] += 2  # the INFO cpu just above, the INFO stats just below
        stats = self.client.info("stats")
        commands = Counter({k.removeprefix("cmdstat_"): v["calls"]
                            for k, v in self.client.info("commandstats").items()})
        commands.subtract(self.own)
        self.commands = {k: v for k, v in commands.items() if v > 0}
        self.round_trips = int(stats["total_reads_processed"]) - sum(self.own.values())
        return self

    def per_callout(self, calls: int) -> dict:
        """The figures of the window divided by ``calls``; CPU in ms, cores as a fraction of one."""
        worker_s = sum(self.worker_cpu)
        cores = os.cpu_count() or 1
        return {
            "calls": calls,
            "window_s": round(self.wall_s, 3),
            "worker_cpu_ms_per_callout": round(worker_s / calls * 1000, 3),
            "redis_cpu_ms_per_callout": round(self.redis_cpu / calls * 1000, 3),
            "redis_round_trips_per_callout": round(self.round_trips / calls, 2),
            "redis_commands_per_callout": round(sum(self.commands.values()) / calls, 2),
            "redis_commands": {k: round(v / calls, 2) for k, v in sorted(self.commands.items(), key=lambda kv: -kv[1])},
            # where the machine's CPU went during the window, in cores (of os.cpu_count())
            "cores": {
                "available": cores,
                "workers": [round(c / self.wall_s, 2) for c in self.worker_cpu],
                "redis": round(self.redis_cpu / self.wall_s, 2),
                "api_and_bench": round(self.bench_cpu / self.wall_s, 2),
                "machine_busy": round(self.machine_busy / self.wall_s, 2),
                "everything_else": round((self.machine_busy - worker_s - self.redis_cpu - self.bench_cpu)
                                         / self.wall_s, 2),
            },
        }


#: the API's count of calls standing still this long means some callouts will never reach it (a baseline
#: without a cap whose connections the overloaded API refused): their results say so
STALLED_S = 3.0


def wait_results(window: Window, api, task_ids: list[str], timeout_s: float, settle_s: float = 0.1) -> None:
    """Until the API has seen every callout (counted in this process; or its count stood still for
    STALLED_S) and every task id has its result in the backend (then one EXISTS over all of them per
    poll)."""
    give_up = time.monotonic() + timeout_s
    seen, moved = len(api.calls), time.monotonic()
    while len(api.calls) < len(task_ids):
        now = time.monotonic()
        if now > give_up:
            raise TimeoutError(f"the API saw {len(api.calls)} of {len(task_ids)} callouts within {timeout_s} s")
        if len(api.calls) != seen:
            seen, moved = len(api.calls), now
        elif now - moved > STALLED_S:
            break
        time.sleep(0.02)
    keys = [f"celery-task-meta-{t}" for t in task_ids]
    while window.command("EXISTS", *keys) < len(keys):
        if time.monotonic() > give_up:
            raise TimeoutError(f"not every callout had its result within {timeout_s} s")
        time.sleep(0.01)
    time.sleep(settle_s)  # the acknowledgement follows the stored result


def ceilings(cost: dict, *, slots: int, call_s: float) -> dict:
    """Which resource limits a run of ``slots`` concurrent calls of ``call_s`` each, from its costs.

    The cap allows ``slots / call_s`` calls/s. The machine's CPU allows ``cores available / CPU
    per callout`` (workers + Redis + the API and bench process), and each worker process at most
    ``1 core / its CPU per callout`` (the GIL: its Python runs on one core at a time). The
    smallest is the ceiling; its ratio to the cap's is the utilisation the machine can reach.
    """
    c = cost["cores"]
    window_s, calls = cost["window_s"], cost["calls"]
    worker_ms = cost["worker_cpu_ms_per_callout"]
    api_ms = c["api_and_bench"] * window_s / calls * 1000
    total_ms = worker_ms + cost["redis_cpu_ms_per_callout"] + api_ms
    cap = slots / call_s
    cpu = c["available"] / total_ms * 1000 if total_ms else float("inf")
    gil = len(c["workers"]) / worker_ms * 1000 if worker_ms else float("inf")
    limit = min(("cap", cap), ("machine CPU", cpu), ("GIL of the worker processes", gil), key=lambda kv: kv[1])
    return {"cpu_ms_per_callout_all": round(total_ms, 3), "cap_calls_per_s": round(cap, 1),
            "cpu_calls_per_s": round(cpu, 1), "gil_calls_per_s": round(gil, 1),
            "bound_by": limit[0], "utilisation_ceiling": round(min(1.0, limit[1] / cap), 3)}
