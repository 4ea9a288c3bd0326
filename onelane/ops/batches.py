"""Big batches: publish many callouts in chunks, count their outcomes, show progress.

``submit_many`` streams its input (nothing is loaded whole), publishes on one broker
connection, and tags each message with the batch id; the task counts its outcome in the
batch's counters. One bad record never affects another: it is dead-lettered alone.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Mapping

from onelane.callout.ledger import Ledger, count_batch_outcome
from onelane.callout.validation import validate_lane
from onelane.core.clients import client_for
from onelane.core.clock import redis_now_ms
from onelane.core.keys import Keys
from onelane.core.redaction import redact_kwargs
from onelane.core.settings import get_settings
from onelane.core.text import text_map

FIELDS = ("published", "done", "failed", "dead_lettered")


@dataclass
class BatchStatus:
    batch_id: str
    name: str
    queue: str
    published: int
    done: int
    failed: int
    dead_lettered: int
    complete: bool  # every record has been published
    started_ms: int
    now_ms: int
    #: when the last outcome was counted (ms, Redis clock); 0 before the first
    last_ms: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.dead_lettered

    @property
    def pending(self) -> int:
        return max(0, self.published - self.finished)

    @property
    def rate_per_s(self) -> float:
        """Outcomes per second: up to now while it runs, up to its last outcome once it is over."""
        end_ms = self.last_ms if self.over and self.last_ms else self.now_ms
        elapsed = max(0.001, (end_ms - self.started_ms) / 1000)
        return self.finished / elapsed

    @property
    def eta_s(self) -> float | None:
        if not self.complete or self.rate_per_s <= 0:
            return None
        return self.pending / self.rate_per_s

    @property
    def over(self) -> bool:
        return self.complete and self.pending == 0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(finished=self.finished, pending=self.pending, rate_per_s=round(self.rate_per_s, 2),
                 eta_s=None if self.eta_s is None else round(self.eta_s, 1))
        return d


def submit_many(records: Iterable[Mapping], *, batch: str = "batch", lane: str | None = None,
                queue: str | None = None, chunk: int = 500) -> str:
    """Publish one callout per record (keyword arguments of ``tasks.callout``); return the batch id.

    They go to ``lane`` (``queue`` is the same thing, its older name), by default the bulk
    queue. Records are read one at a time. A record that cannot even be encoded as JSON is
    dead-lettered at once and counted as failed; every other record is published and
    checked by the worker, so a bad one fails alone.
    """
    from onelane.celery_app import app

    s = get_settings()
    client = client_for(s)
    keys = Keys(s.key_prefix)
    if lane and queue and lane != queue:
        raise ValueError(f"submit_many: lane={lane!r} and queue={queue!r} disagree; give one")
    q = validate_lane(lane or queue) if (lane or queue) else s.bulk_queue
    batch_id = f"{batch}-{uuid.uuid4().hex[:12]}"
    started_ms = redis_now_ms(client)
    key = keys.batch(batch_id)
    client.hset(key, mapping={"name": batch, "queue": q, "started_ms": started_ms,
                              "published": 0, "done": 0, "failed": 0, "dead_lettered": 0, "complete": 0})
    client.zadd(keys.batch_index, {batch_id: started_ms // 1000})
    ledger = Ledger(client, keys, window_s=s.dedupe_window_s)
    since_count = 0
    with app.producer_or_acquire() as producer:
        for record in records:
            try:
                kwargs = dict(record)
                json.dumps(kwargs, allow_nan=False)
            except (TypeError, ValueError) as exc:
                _reject(ledger, client, keys, batch_id, q, record, exc)
                continue
            app.send_task("tasks.callout", kwargs=kwargs, queue=q, producer=producer, ignore_result=True,
                          headers={"onelane_batch": batch_id},
                          kwargsrepr=repr(redact_kwargs(kwargs, s.redact_headers)))
            since_count += 1
            if since_count >= chunk:
                client.hincrby(key, "published", since_count)
                since_count = 0
    pipe = client.pipeline(transaction=True)
    pipe.hincrby(key, "published", since_count)
    pipe.hset(key, "complete", 1)
    pipe.execute()
    return batch_id


def _reject(ledger, client, keys, batch_id, queue, record, exc) -> None:
    task_id = f"{batch_id}-rejected-{uuid.uuid4().hex[:8]}"
    reason = f"callout argument 'payload': is not JSON-serialisable: {exc}"
    entry = {"id": task_id, "task_id": task_id, "queue": queue, "kind": "invalid", "reason": reason,
             "request": {"repr": repr(record)[:500]}, "attempts": [], "dead_lettered_at": time.time(),
             "batch": batch_id}
    ledger.record_failure(task_id=task_id, queue=queue, error=reason, dead_letter=entry,
                          now_ms=redis_now_ms(client))
    count_batch_outcome(client, keys, batch_id, "failed", now_ms=redis_now_ms(client))



def batch_status(client, keys: Keys, batch_id: str) -> BatchStatus | None:
    h = client.hgetall(keys.batch(batch_id))
    if not h:
        return None
    h = text_map(h)
    return BatchStatus(batch_id, h.get("name", ""), h.get("queue", ""), *(int(h.get(f, 0)) for f in FIELDS),
                       complete=h.get("complete") == "1", started_ms=int(h.get("started_ms", 0)),
                       now_ms=redis_now_ms(client), last_ms=int(h.get("last_ms") or 0))
