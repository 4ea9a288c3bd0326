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
from dataclasses import dataclass, replace
from enum import IntEnum

from onelane.coordination.lease import Stamp
from onelane.core.errors import UnexpectedReply
from onelane.core.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, Keys
from onelane.core.scripts import LuaScript
from onelane.core.text import text, text_map
from onelane.delivery.messages import mark_redelivered

_REQUEUE = LuaScript(__package__, "requeue_at_head")
#: the fields of a record a grant's stamp writes itself
_STAMPED = frozenset({"lease", "lease_token", "fence", "started_ms", "deadline_ms", "attempt"})

log = logging.getLogger(__name__)



class Requeue(IntEnum):
    """What :func:`requeue_at_head` did (the reply of ``lua/requeue_at_head.lua``)."""

    MOVED = 1  #: pushed back at the head, kombu's unacked copy removed
    NOT_HELD = 0  #: kombu held no copy (already restored or acked): only the in-flight record dropped
    OWNER_CHANGED = -1  #: another worker owns the task now, or someone claims it: nothing done
    CHANGED = -2  #: the unacked copy changed since it was read: nothing done, read again

    @classmethod
    def of(cls, reply) -> "Requeue":
        try:
            return cls(int(reply))
        except (TypeError, ValueError):
            raise UnexpectedReply(f"script requeue_at_head answered {reply!r}; expected 1, 0, -1 or -2") from None


MOVED, NOT_HELD, OWNER_CHANGED, CHANGED = Requeue.MOVED, Requeue.NOT_HELD, Requeue.OWNER_CHANGED, Requeue.CHANGED


@dataclass(frozen=True)
class InflightRecord:
    """One attempt under way: what the reaper needs to requeue it, and what status shows."""

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

    def granted(self, grant, *, deadline_ms: int) -> "InflightRecord":
        """This record once its attempt holds ``grant`` (a lease or slot grant), until ``deadline_ms``."""
        return replace(self, lease=grant.name, lease_token=grant.token, fence=grant.fence,
                       started_ms=grant.now_ms, deadline_ms=deadline_ms)

    def to_redis(self) -> dict:
        d = self.__dict__.copy()
        d["kwargs"] = json.dumps(self.kwargs)
        return {k: str(v) for k, v in d.items()}

    @classmethod
    def from_redis(cls, h: dict) -> "InflightRecord":
        h = text_map(h)
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
        # every field is written: nothing of an earlier attempt's record survives (no DEL needed)
        p.hset(self.keys.inflight(rec.task_id), mapping=rec.to_redis())
        p.zadd(self.keys.inflight_index(rec.queue), {rec.task_id: rec.deadline_ms})
        if pipe is None:
            p.execute()

    def stamp(self, rec: InflightRecord, *, due_in_ms: int) -> Stamp:
        """The record of an attempt starting now, for a grant to write in its own script (stamped on
        the Redis clock: started at the grant, due ``due_in_ms`` after it, its attempt number counted
        from the ledger, its lease, token and fence the grant's)."""
        fields = []
        for k, v in rec.to_redis().items():
            if k not in _STAMPED:
                fields += [k, v]
        return Stamp(self.keys.inflight(rec.task_id), self.keys.inflight_index(rec.queue), rec.task_id,
                     int(due_in_ms), tuple(fields), attempts_key=self.keys.attempts(rec.task_id))

    def set_attempt(self, task_id: str, attempt: int) -> None:
        """Correct the attempt number of a record written before the count of finished attempts was read."""
        self.client.hset(self.keys.inflight(task_id), "attempt", int(attempt))

    def get(self, task_id: str) -> InflightRecord | None:
        h = self.client.hgetall(self.keys.inflight(task_id))
        return InflightRecord.from_redis(h) if h else None

    def task_ids(self, queue: str, *, due_by_ms: float = float("inf")) -> list[str]:
        """Task ids of the queue's in-flight records whose deadline is at or before ``due_by_ms``."""
        top = "+inf" if due_by_ms == float("inf") else int(due_by_ms)
        return [text(m) for m in self.client.zrangebyscore(self.keys.inflight_index(queue), "-inf", top)]

    def forget(self, task_id: str, queue: str, pipe=None) -> None:
        p = pipe or self.client.pipeline(transaction=True)
        p.delete(self.keys.inflight(task_id))
        p.zrem(self.keys.inflight_index(queue), task_id)
        if pipe is None:
            p.execute()


def queue_acknowledge(pipe, delivery_tag: str) -> None:
    """Queue, on the transaction that records a callout's outcome, the removal of its message's
    unacked copy (kombu's ack, in kombu's layout): the message is acknowledged in the same step as
    its outcome is recorded, and the worker's own ack then only clears kombu's bookkeeping in
    memory (:func:`onelane.delivery.transport.acked_with_outcome`) — one round trip less a callout."""
    pipe.zrem(KOMBU_UNACKED_INDEX, delivery_tag)
    pipe.hdel(KOMBU_UNACKED, delivery_tag)


def requeue_at_head(client, keys: Keys, *, queue: str, delivery_tag: str, task_id: str,
                    expect_owner: str = "", unclaimed: bool = False) -> Requeue:
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
            payload = mark_redelivered(text(raw))
        res = Requeue.of(_REQUEUE(
            client,
            keys=[KOMBU_UNACKED, KOMBU_UNACKED_INDEX, keys.queue_list(queue), keys.inflight(task_id),
                  keys.inflight_index(queue), keys.reserved(queue), keys.ready(queue)],
            args=[delivery_tag, text(raw), payload, task_id, expect_owner,
                  "1" if unclaimed else ""],
        ))
        if res != CHANGED:
            return res
    return CHANGED
