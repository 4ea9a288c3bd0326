"""Recorded outcomes: what makes a redelivered callout a no-op, and the dead letters.

Guarantees: an outcome is written together with the removal of the in-flight
record (one MULTI), before the message is acknowledged. A task id whose outcome
is recorded, or an idempotency key whose call succeeded, is remembered for the
dedupe window, so a redelivered copy returns the recorded outcome without calling
the API again. Failed calls remember the task id only, so a replay with the same
idempotency key is allowed to run.
"""
from __future__ import annotations

import json

from onelane.core import counters, recent
from onelane.core.keys import Keys
from onelane.core.outcome import FAILURE, SUCCESS, Outcome, count_batch_outcome  # noqa: F401 (re-exported)
from onelane.core.text import text
from onelane.delivery.inflight import Inflight


class Ledger:
    def __init__(self, client, keys: Keys, *, window_s: int):
        self.client = client
        self.keys = keys
        self.window_s = int(window_s)

    def record_success(self, *, task_id: str, queue: str, idempotency_key: str, result: dict,
                       now_ms: int, pipe=None) -> None:
        """Record a success; with ``pipe`` the writes are queued there (the caller executes it)."""
        own = pipe is None
        pipe = pipe if pipe is not None else self.client.pipeline(transaction=True)
        pipe.set(self.keys.done(task_id), Outcome(SUCCESS, task_id, result=result).to_json(), ex=self.window_s)
        if idempotency_key != task_id:  # a key that is the task id is found through the outcome itself
            pipe.set(self.keys.idempotency(idempotency_key), task_id, ex=self.window_s)
        recent.count(pipe, self.keys, queue, SUCCESS, now_ms)
        Inflight(self.client, self.keys).forget(task_id, queue, pipe=pipe)
        if own:
            pipe.execute()

    def record_failure(self, *, task_id: str, queue: str, error: str, dead_letter: dict, now_ms: int,
                       also=None, resource: str | None = None) -> None:
        """Record a failure for good and its dead letter (counted by lane and ``resource``, default: the
        lane); ``also(pipe)`` queues more writes on the same transaction (the outcomes of the task ids
        a coalesced callout carried)."""
        pipe = self.client.pipeline(transaction=True)
        counters.count(pipe, self.keys, "dead_lettered", queue, resource or queue)
        pipe.set(self.keys.done(task_id), Outcome(FAILURE, task_id, error=error).to_json(), ex=self.window_s)
        pipe.hset(self.keys.dead_letters(queue), task_id, json.dumps(dead_letter))
        pipe.zadd(self.keys.dead_letter_index(queue), {task_id: now_ms})
        recent.count(pipe, self.keys, queue, FAILURE, now_ms)
        Inflight(self.client, self.keys).forget(task_id, queue, pipe=pipe)
        if also is not None:
            also(pipe)
        pipe.execute()

    def add_attempt(self, task_id: str, info: dict, pipe=None) -> None:
        """Remember one finished attempt (for the attempt count and the dead-letter entry)."""
        p = pipe if pipe is not None else self.client.pipeline(transaction=True)
        p.rpush(self.keys.attempts(task_id), json.dumps(info))
        p.expire(self.keys.attempts(task_id), self.window_s)
        if pipe is None:
            p.execute()

    def preflight(self, pipe, task_id: str, idempotency_key: str | None, *, also=()) -> int:
        """Queue two reads on ``pipe``: one MGET of what :meth:`outcome_from` needs, followed by the
        keys ``also`` (other strings the caller reads in the same command), then the count of
        finished attempts. Returns how many of the MGET's values are :meth:`outcome_from`'s (2, or 3
        with a key of its own); the values of ``also`` follow them."""
        key = idempotency_key or task_id
        keys = [self.keys.done(task_id), self.keys.idempotency(key)]
        if key != task_id:
            # a success whose key was its own task id wrote no idempotency entry: its outcome is the entry
            keys.append(self.keys.done(key))
        pipe.mget(*keys, *also)
        pipe.llen(self.keys.attempts(task_id))
        return len(keys)

    def outcome_from(self, replies) -> Outcome | None:
        """The recorded outcome of this task id, or of a success with this idempotency key.

        Takes the first values of :meth:`preflight`'s MGET (as many as it said); a second read only for
        an idempotency hit.
        """
        done_raw, idem_task_id, *by_key = replies
        if done_raw is not None:
            return Outcome.from_json(done_raw)
        if idem_task_id is not None:
            raw = self.client.get(self.keys.done(text(idem_task_id)))
            return Outcome.from_json(raw) if raw is not None else None
        if by_key and by_key[0] is not None:
            other = Outcome.from_json(by_key[0])
            return other if other.status == SUCCESS else None  # a failure leaves the key free to run
        return None

    def attempts(self, task_id: str) -> list[dict]:
        return [json.loads(r) for r in self.client.lrange(self.keys.attempts(task_id), 0, -1)]

    def dead_letters(self, queue: str) -> list[dict]:
        """Every dead-letter entry of the queue, oldest first."""
        ids = self.client.zrange(self.keys.dead_letter_index(queue), 0, -1)
        if not ids:
            return []
        raws = self.client.hmget(self.keys.dead_letters(queue), ids)
        return [json.loads(r) for r in raws if r is not None]
