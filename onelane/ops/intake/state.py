"""How a callout accepted by the intake is doing, read from onelane's own records (read-only).

One pipelined read (a second only for a failure): the intake's task record (which lane), the
ledger's outcome (``done``), the in-flight record, the finished attempts, Celery's result; for
a failure, whether its dead letter is still there. Never blocks a worker, never writes.

States: ``queued`` (published, not started), ``running`` (started: an attempt is under way or
the callout waits between attempts), ``succeeded``, ``failed`` (failed for good, its dead letter
since replayed or purged), ``dead-lettered`` (failed for good; ``onelane dlq show TASK_ID``).
"""
from __future__ import annotations

import json

from onelane.core.keys import Keys
from onelane.core.redaction import redact_headers
from onelane.core.text import text

QUEUED, RUNNING, SUCCEEDED, FAILED, DEAD_LETTERED = "queued", "running", "succeeded", "failed", "dead-lettered"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, DEAD_LETTERED)


def _masked(result, names: frozenset):
    if isinstance(result, dict) and isinstance(result.get("headers"), dict):
        return {**result, "headers": redact_headers(result["headers"], names)}
    return result


def _reason_of(meta: dict) -> str:
    res = meta.get("result")
    if isinstance(res, dict):
        msg = res.get("exc_message")
        if isinstance(msg, (list, tuple)):
            msg = " ".join(str(m) for m in msg)
        return f"{res.get('exc_type', 'error')}: {msg}" if msg else str(res.get("exc_type", "failed"))
    return str(res)


def callout_state(client, keys: Keys, task_id: str, *, redact: frozenset) -> dict | None:
    """The state of ``task_id``, or None when the intake did not accept it within the dedupe window."""
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.intake_task(task_id))
    pipe.get(keys.done(task_id))
    pipe.hget(keys.inflight(task_id), "attempt")
    pipe.llen(keys.attempts(task_id))
    pipe.get(keys.celery_result(task_id))
    lane_raw, done_raw, inflight_attempt, finished, meta_raw = pipe.execute()
    if lane_raw is None:
        return None
    lane = text(lane_raw)
    out = {"task_id": task_id, "lane": lane, "state": QUEUED, "attempts": int(finished), "result": None,
           "reason": None, "error": None}
    meta = json.loads(meta_raw) if meta_raw is not None else {}
    if done_raw is not None:
        done = json.loads(done_raw)
        if done.get("status") == "success":
            out["state"] = SUCCEEDED
            out["result"] = _masked(done.get("result"), redact)
        else:
            in_dlq = client.hexists(keys.dead_letters(lane), task_id)
            out["state"] = DEAD_LETTERED if in_dlq else FAILED
            out["reason"] = done.get("error")
    elif meta.get("status") == "SUCCESS":
        # a redelivered copy, or a key whose call had already succeeded: Celery holds the recorded result
        out["state"] = SUCCEEDED
        out["result"] = _masked(meta.get("result"), redact)
    elif meta.get("status") == "FAILURE":
        out["state"] = FAILED
        out["reason"] = _reason_of(meta)
    elif inflight_attempt is not None or finished or meta.get("status") == "STARTED":
        out["state"] = RUNNING
        if inflight_attempt is not None:
            out["attempts"] = max(int(finished), int(text(inflight_attempt) or 0))
    if out["state"] == SUCCEEDED and isinstance(out["result"], dict) and isinstance(out["result"].get("attempts"), int):
        out["attempts"] = out["result"]["attempts"]
    return out
