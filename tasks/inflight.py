"""The in-flight registry, and putting an orphaned message back at the head of its queue.

Before a callout's HTTP attempt starts, the task records itself here (task id,
queue, resource, owner, start, deadline, attempt, delivery tag, the arguments).
The record goes when the outcome is recorded. A record whose owner is gone and
whose deadline passed is an orphan: :func:`requeue_at_head` moves its message from
kombu's unacked hash back to the head of the queue in one atomic step.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from tasks.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, Keys
from tasks.scripts import script

log = logging.getLogger(__name__)

MOVED, NOT_HELD, OWNER_CHANGED, CHANGED = 1, 0, -1, -2


@dataclass(frozen=True)
class InflightRecord:
    task_id: str
    queue: str
    resource: str
    owner: str
    lease: str
    lease_token: str
    fence: int
    started_ms: int
    deadline_ms: int
    attempt: int
    delivery_tag: str
    host: str
    pid: int
    kwargs: dict

    def to_redis(self) -> dict:
        d = self.__dict__.copy()
        d["kwargs"] = json.dumps(self.kwargs)
        return {k: str(v) for k, v in d.items()}

    @classmethod
    def from_redis(cls, h: dict) -> "InflightRecord":
        h = {_t(k): _t(v) for k, v in h.items()}
        ints = ("fence", "started_ms", "deadline_ms", "attempt", "pid")
        vals = {k: (int(h.get(k) or 0) if k in ints else h.get(k, "")) for k in cls.__dataclass_fields__}
        vals["kwargs"] = json.loads(h.get("kwargs") or "{}")
        return cls(**vals)


class Inflight:
    """In-flight records of callouts, per task id, indexed per queue by deadline."""

    def __init__(self, client, keys: Keys):
        self.client = client
        self.keys = keys

    def record(self, rec: InflightRecord, pipe=None) -> None:
        """Write (or overwrite) the record of an attempt that is about to start."""
        p = pipe or self.client.pipeline(transaction=True)
        key = self.keys.inflight(rec.task_id)
        p.delete(key)
        p.hset(key, mapping=rec.to_redis())
        p.zadd(self.keys.inflight_index(rec.queue), {rec.task_id: rec.deadline_ms})
        if pipe is None:
            p.execute()

    def get(self, task_id: str) -> InflightRecord | None:
        h = self.client.hgetall(self.keys.inflight(task_id))
        return InflightRecord.from_redis(h) if h else None

    def task_ids(self, queue: str, *, due_by_ms: float = float("inf")) -> list[str]:
        """Task ids of the queue's in-flight records whose deadline is at or before ``due_by_ms``."""
        top = "+inf" if due_by_ms == float("inf") else int(due_by_ms)
        return [_t(m) for m in self.client.zrangebyscore(self.keys.inflight_index(queue), "-inf", top)]

    def forget(self, task_id: str, queue: str, pipe=None) -> None:
        p = pipe or self.client.pipeline(transaction=True)
        p.delete(self.keys.inflight(task_id))
        p.zrem(self.keys.inflight_index(queue), task_id)
        if pipe is None:
            p.execute()


def requeue_at_head(client, keys: Keys, *, queue: str, delivery_tag: str, task_id: str,
                    expect_owner: str = "", unclaimed: bool = False) -> int:
    """Move the unacked message ``delivery_tag`` to the head of ``queue``, atomically.

    Guarantees: the message is pushed at most once (kombu's unacked copy is removed
    in the same script, and a copy changed since it was read is left alone); a
    message whose in-flight record now names another owner is not touched; with
    ``unclaimed`` a message that has an in-flight record or a receiver record is not
    touched either (checked in the same script, so a worker claiming it meanwhile wins).
    Returns MOVED, NOT_HELD, OWNER_CHANGED or CHANGED (see the Lua header).
    """
    for _ in range(3):
        raw = client.hget(KOMBU_UNACKED, delivery_tag)
        payload = ""
        if raw is not None:
            payload = _mark_redelivered(_t(raw))
        res = int(script(client, "requeue_at_head")(
            keys=[KOMBU_UNACKED, KOMBU_UNACKED_INDEX, keys.queue_list(queue), keys.inflight(task_id),
                  keys.inflight_index(queue), keys.reserved(queue)],
            args=[delivery_tag, _t(raw) if raw is not None else "", payload, task_id, expect_owner,
                  "1" if unclaimed else ""],
        ))
        if res != CHANGED:
            return res
    return CHANGED


def _mark_redelivered(raw: str) -> str:
    message, _exchange, _rk = json.loads(raw)
    message.setdefault("headers", {})["redelivered"] = True
    props = message.setdefault("properties", {})
    props.setdefault("delivery_info", {})["redelivered"] = True
    return json.dumps(message)


def _t(v) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))
