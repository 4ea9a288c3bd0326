"""Task events in batches (onelane.task_events): fewer publishes, every event still delivered."""
from __future__ import annotations

import base64
import json
import threading
import time

import pytest
import redis

from tests import procs
from tests.procs import wait_for


class EventTap:
    """Every task-event publish on the private Redis, as (time seen, [events]), from a real subscriber."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("*celeryev/task.*")
        self.publishes: list[tuple[float, list[dict]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def __enter__(self) -> "EventTap":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.pubsub.close()
        self.client.close()

    def _listen(self) -> None:
        while not self._stop.is_set():
            m = self.pubsub.get_message(timeout=0.1)
            if m is not None:
                self.publishes.append((time.monotonic(), events_in(m["data"])))

    def events_of(self, task_id: str) -> list[str]:
        return [e["type"] for _, events in list(self.publishes) for e in events if e.get("uuid") == task_id]


def events_in(data: bytes) -> list[dict]:
    """The events one kombu message on the event exchange carries (task.multi: a list of them)."""
    message = json.loads(data)
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    payload = json.loads(body)
    return payload if isinstance(payload, list) else [payload]


def run_callouts(celery_app, api, tap: EventTap, n: int) -> list[str]:
    """``n`` callouts at once; returns their task ids once each has its three events."""
    results = [celery_app.send_task("tasks.callout", kwargs={"url": f"{api.url}/ev", "json": {"i": i}},
                                    queue="serial") for i in range(n)]
    for r in results:
        r.get(timeout=60)
    ids = [r.id for r in results]
    wait_for(lambda: all(len(tap.events_of(t)) >= 3 for t in ids), 20, 0.05, what="every callout's events")
    return ids


@pytest.mark.e2e
def test_a_busy_lane_publishes_its_task_events_in_batches_and_loses_none(base_env, redis_server, api, start,
                                                                         celery_app):
    publishes = {}
    for batch_ms in ("0", "200"):
        with EventTap(redis_server.url) as tap:
            worker = start(procs.worker(dict(base_env, ONELANE_TASK_EVENTS_BATCH_MS=batch_ms), name=f"w{batch_ms}"))
            ids = run_callouts(celery_app, api, tap, 30)
            worker.stop()
            for t in ids:  # each event exactly once, in the order Celery sends them
                assert tap.events_of(t) == ["task-received", "task-started", "task-succeeded"], t
            publishes[batch_ms] = sum(1 for _, events in tap.publishes if any(e.get("uuid") in ids for e in events))
    # Celery's own flush (0): about one publish per event; in batches, many events per publish
    assert publishes["0"] >= 60, publishes
    assert publishes["200"] <= publishes["0"] / 2, publishes


@pytest.mark.e2e
def test_a_worker_that_shuts_down_publishes_the_events_it_still_holds(base_env, redis_server, api, start,
                                                                      celery_app):
    with EventTap(redis_server.url) as tap:
        worker = start(procs.worker(dict(base_env, ONELANE_TASK_EVENTS_BATCH_MS="10000")))
        r = celery_app.send_task("tasks.callout", kwargs={"url": f"{api.url}/ev"}, queue="serial")
        r.get(timeout=30)
        assert tap.events_of(r.id) == [], "held for 10 s, the events cannot be out yet"
        assert worker.stop() is not None
        wait_for(lambda: len(tap.events_of(r.id)) >= 3, 10, 0.05, what="the events flushed at shutdown")
        assert tap.events_of(r.id) == ["task-received", "task-started", "task-succeeded"]


@pytest.mark.e2e
def test_with_the_solo_pool_each_callouts_events_leave_before_the_next_callout_runs(base_env, redis_server, api,
                                                                                  start, celery_app):
    # solo runs a task on the event loop's thread: a held event would wait out the whole next callout,
    # so there the events go out at the loop's next turn, as Celery sends them, whatever the batch time
    with EventTap(redis_server.url) as tap:
        start(procs.worker(dict(base_env, ONELANE_TASK_EVENTS_BATCH_MS="10000"), extra=["--pool", "solo"]))
        r = celery_app.send_task("tasks.callout", kwargs={"url": f"{api.url}/ev"}, queue="serial")
        r.get(timeout=30)
        wait_for(lambda: len(tap.events_of(r.id)) >= 3, 5, 0.05, what="the events, not held 10 s")
        assert tap.events_of(r.id) == ["task-received", "task-started", "task-succeeded"]
