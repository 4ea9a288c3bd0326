"""What a callout leaves behind: its result dict, its attempt entries and its dead letter (pure logic).

Nothing here holds a secret: header values named in ONELANE_REDACT_HEADERS are masked
before anything is stored or returned.
"""
from __future__ import annotations

import json
import time

from onelane.callout.classify import Reply, Verdict
from onelane.core.redaction import redact_headers, redact_kwargs


def success_result(reply: Reply, *, attempt: int, fence: int, task_id: str, idempotency_key: str,
                   resource: str, lane: str, method: str, url: str, redact: frozenset) -> dict:
    """The task's result: status, headers (masked), body as JSON or text, and where it came from."""
    resp = reply.response
    out = {
        "status_code": resp.status_code,
        "headers": redact_headers(resp.headers, redact),
        "elapsed_ms": round(resp.elapsed_ms, 2),
        "attempts": attempt,
        "fencing_token": fence,
        "task_id": task_id,
        "idempotency_key": idempotency_key,
        "resource": resource,
        "lane": lane,
        "method": method,
        "url": url,
        "redirected_to": resp.url if resp.url != url else None,
        "truncated": resp.truncated,
    }
    body = resp.body.decode(resp.encoding or "utf-8", errors="replace")
    if "json" in resp.content_type.lower() and not resp.truncated:
        try:
            out["json"] = json.loads(body)
            return out
        except ValueError:
            out["json_error"] = "the body is not valid JSON; kept as text"
    out["body"] = body
    return out


def attempt_entry(reply: Reply, verdict: Verdict, *, attempt: int, fence: int) -> dict:
    """One finished attempt as the ledger keeps it (shown in the dead letter)."""
    entry = {"attempt": attempt, "started": reply.started, "elapsed_ms": round(reply.elapsed_ms, 1),
             "fencing_token": fence, "status_code": reply.status, "error": reply.error}
    if verdict.retry_after_s is not None:
        entry["retry_after_s"] = verdict.retry_after_s
    if not verdict.succeeded and not verdict.final:
        entry["retry_in_s"] = round(verdict.wait_s, 3)
    return entry


def dead_letter_entry(task_id: str, queue: str, request: dict, *, reason: str, kind: str, attempts: list,
                      batch: str | None = None) -> dict:
    """The dead letter of a callout that failed for good: its request (masked), why, every attempt."""
    entry = {"id": task_id, "task_id": task_id, "queue": queue, "kind": kind, "reason": reason,
             "request": request, "attempts": attempts, "dead_lettered_at": time.time()}
    if batch:
        entry["batch"] = batch
    return entry


def storable(kwargs, names: frozenset) -> dict:
    """The caller's arguments as they may be stored (in-flight record, dead letter): secrets masked."""
    try:
        out = redact_kwargs(kwargs, names)
        json.dumps(out)
        return out
    except (TypeError, ValueError):
        return {k: repr(v) for k, v in dict(kwargs).items()}
