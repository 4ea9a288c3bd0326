"""The worker's consumer: a message it cannot run ends visibly, never silently.

Celery's own consumer drops a message it cannot decode (a pickled body, JSON nested too
deep), one of a disallowed content type, one in an unknown format, or one naming a task
it does not know (a misspelt ``tasks.Callout``): it logs and discards it, and the first
three never reach FAILURE, so a producer waits for ever and nothing can be fixed and
replayed. Here each such message, before Celery discards it, is

* dead-lettered in its lane with the task name, the message's safe headers, the reason,
  and the arguments when they can be read (secrets masked; never an undecodable body), and
* marked FAILURE on its task id with that reason.

Unlike Celery's, these hooks never write the message body to the log (it may hold secrets).
The dead letter of a misspelt task name can be replayed as ``tasks.callout`` with
``onelane dlq replay``.

It also sends the worker's task events in batches (:mod:`onelane.task_events`).
"""
from __future__ import annotations

import base64
import json
import logging
import time

from celery import signals
from celery.exceptions import NotRegistered
from celery.utils.collections import AttributeDict
from celery.worker.consumer import Consumer as CeleryConsumer

from onelane.callout.ledger import Ledger
from onelane.core.clients import client_for
from onelane.core.errors import CalloutRejected
from onelane.core.keys import Keys
from onelane.core.redaction import redact_kwargs
from onelane.core.settings import get_settings
from onelane.task_events import BatchedTaskEvents

log = logging.getLogger(__name__)

#: message headers kept in a dead letter (argsrepr/kwargsrepr may hold secrets: not kept)
SAFE_HEADERS = ("id", "task", "lang", "root_id", "parent_id", "group", "retries", "eta", "expires", "origin",
                "timelimit")
#: the largest body whose arguments a dead letter keeps
MAX_KEPT_BODY = 64 * 1024


class Consumer(BatchedTaskEvents, CeleryConsumer):
    """Celery's consumer, with the four "cannot run this message" hooks replaced, and its task
    events sent in batches (:mod:`onelane.task_events`).

    Each hook does what Celery's does with the message (reject it, or ack one it cannot decode)
    and sends the same events and signals, but logs one line without the message body
    (Celery's logs the body, secrets and all) and dead-letters the message first.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events_batch_s = self.batch_s_for(self.pool, get_settings().task_events_batch_ms)

    def on_unknown_task(self, body, message, exc):
        headers = _headers(message)
        task_id, name = headers.get("id"), headers.get("task")
        self._dead_letter(message, f"no task named {name!r} here (is the name spelt 'tasks.callout'?)",
                          keep_arguments=True)
        message.reject_log_error(log, self.connection_errors)
        if task_id:
            self.app.backend.mark_as_failure(task_id, NotRegistered(name), request=_request(task_id, headers))
            if self.event_dispatcher:
                self.event_dispatcher.send("task-failed", uuid=task_id, exception=f"NotRegistered({name!r})")
        signals.task_unknown.send(sender=self, message=message, exc=exc, name=name, id=task_id)

    def on_invalid_task(self, body, message, exc):
        reason = f"the message cannot run: {type(exc).__name__}: {str(exc)[:300]}"
        self._dead_letter(message, reason, keep_arguments=False, fail_with=reason)
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_decode_error(self, message, exc):
        reason = f"the message body cannot be decoded: {type(exc).__name__}: {str(exc)[:300]}"
        self._dead_letter(message, reason, keep_arguments=False, fail_with=reason)
        message.ack()

    def on_unknown_message(self, body, message):
        reason = "the message is not in Celery's task format (no task name in its headers)"
        self._dead_letter(message, reason, keep_arguments=False, fail_with=reason)
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    # -- the dead letter ----------------------------------------------------------------------
    def _dead_letter(self, message, reason: str, *, keep_arguments: bool, fail_with: str | None = None) -> None:
        """Record the message in its lane's dead letters and, if asked, FAILURE on its task id.

        Never raises: Celery discards the message next whatever happens here.
        """
        try:
            s = get_settings()
            headers = _headers(message)
            task_id = str(headers.get("id") or (getattr(message, "properties", None) or {}).get("correlation_id")
                          or f"unrunnable-{getattr(message, 'delivery_tag', '') or time.time_ns()}")
            queue = (getattr(message, "delivery_info", None) or {}).get("routing_key") or s.queue
            request = _arguments(message, s.redact_headers) if keep_arguments else {
                "omitted": "the body could not be read; it is not kept"}
            entry = {"id": task_id, "task_id": task_id, "queue": queue, "kind": "unrunnable",
                     "task": headers.get("task"), "reason": reason, "request": request,
                     "headers": {k: headers[k] for k in SAFE_HEADERS if k in headers},
                     "content_type": getattr(message, "content_type", None),
                     "body_bytes": len(getattr(message, "body", b"") or b""),
                     "attempts": [], "dead_lettered_at": time.time()}
            client = client_for(s)
            keys = Keys(s.key_prefix)
            Ledger(client, keys, window_s=s.dedupe_window_s).record_failure(
                task_id=task_id, queue=queue, error=reason, dead_letter=entry, now_ms=int(time.time() * 1000))
            log.error("onelane: %s on %r dead-lettered, it never ran: %s", task_id, queue, reason)
            if fail_with and headers.get("id"):
                self.app.backend.mark_as_failure(
                    task_id, CalloutRejected(f"{fail_with}; dead-lettered in {queue!r}"),
                    request=_request(task_id, headers))
                if self.event_dispatcher:
                    self.event_dispatcher.send("task-failed", uuid=task_id, exception=fail_with)
        except Exception as exc:  # Redis away: Celery still logs the message itself
            log.exception("onelane: could not dead-letter an unrunnable message (%s)", exc)


def _request(task_id: str, headers: dict) -> AttributeDict:
    """The little of a task request the result backend needs to store a failure."""
    return AttributeDict(id=task_id, name=headers.get("task"), chord=None, errbacks=None,
                         root_id=headers.get("root_id"), parent_id=headers.get("parent_id"),
                         correlation_id=task_id, reply_to=None, group=None, delivery_info={},
                         ignore_result=False)


def _headers(message) -> dict:
    headers = getattr(message, "headers", None)
    return headers if isinstance(headers, dict) else {}


def _arguments(message, redact: frozenset) -> dict:
    """The callout arguments of a JSON task message (secrets masked), or a note why not."""
    body = getattr(message, "body", b"") or b""
    if len(body) > MAX_KEPT_BODY:
        return {"omitted": f"a body of {len(body)} bytes is not kept"}
    if (getattr(message, "content_type", "") or "").split(";")[0].strip() != "application/json":
        return {"omitted": f"a body of type {getattr(message, 'content_type', None)!r} is not kept"}
    raw = body if isinstance(body, (bytes, str)) else bytes(body)
    try:
        args, kwargs, _embed = _json_triple(raw)
    except (ValueError, TypeError, RecursionError):
        return {"omitted": "the body is not [args, kwargs, embed] JSON"}
    out = redact_kwargs(kwargs, redact) if isinstance(kwargs, dict) else {"kwargs": repr(kwargs)[:500]}
    if args:
        out["args"] = [repr(a)[:200] for a in args]
    return out


def _json_triple(raw):
    """The [args, kwargs, embed] of a body kombu has decoded already, or still base64 (a raw read)."""
    try:
        return json.loads(raw)
    except ValueError:
        return json.loads(base64.b64decode(raw, validate=True))
