"""A producer process for the tests: publishes callouts with plain send_task at random moments."""
from __future__ import annotations

import random
import time


def publish(redis_url: str, url: str, producer: int, count: int, max_gap_s: float, out, lanes=None) -> None:
    """Publish ``count`` callouts with ``send_task`` only (no onelane import), in order.

    ``lanes`` ({lane: API URL}) publishes each callout to every lane in turn, interleaved.
    """
    from celery import Celery

    app = Celery(broker=redis_url, backend=redis_url)
    app.conf.task_serializer = "json"
    rng = random.Random(producer)
    ids = []
    for n in range(count):
        for lane, base in (lanes or {"serial": url}).items():
            r = app.send_task(
                "tasks.callout",
                kwargs={"url": f"{base}/p/{producer}", "json": {"producer": producer, "n": n, "lane": lane},
                        "idempotency_key": f"{lane}-p{producer}-{n}" if lanes else f"p{producer}-{n}"},
                queue=lane,
            )
            ids.append(r.id)
        time.sleep(rng.uniform(0, max_gap_s))
    out.put((producer, ids))


class Producers:
    """Several producer processes publishing at once; stopped by pid when the block ends."""

    def __init__(self, redis_url: str, url: str, *, processes: int, count: int, max_gap_s: float, lanes=None):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.out = ctx.Queue()
        self.procs = [ctx.Process(target=publish, args=(redis_url, url, p, count, max_gap_s, self.out, lanes))
                      for p in range(processes)]

    def __enter__(self) -> "Producers":
        for p in self.procs:
            p.start()
        return self

    def published(self, timeout_s: float) -> dict[int, list[str]]:
        """Each producer's task ids, in the order it published them; every producer exited 0."""
        ids = dict(self.out.get(timeout=timeout_s) for _ in self.procs)
        for p in self.procs:
            p.join(timeout=30)
            assert p.exitcode == 0, f"producer pid {p.pid} exited with {p.exitcode}"
        return ids

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
