"""The ``tasks.callout`` task: one HTTP call at a time, under the resource lease, recorded once.

For each attempt: wait while the queue is paused or the resource's circuit is open,
take the resource lease (a fencing token grows with every grant), record the attempt
in flight, call the API with a hard deadline, then record the outcome and release
the lease. A retry holds the queue (strict order, the default) or waits in the delay
set while the queue moves on (relaxed). A redelivered copy of a task whose outcome
is recorded returns that outcome without calling the API. Bad input fails at once
and is dead-lettered.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import replace

import redis
import requests
from celery.exceptions import Ignore

from tasks import credentials, flow, http, scripts
from tasks.celery import app
from tasks.capacity import Adaptive, RateLimiter, Semaphore
from tasks.circuit import Circuit
from tasks.egress import EgressPolicy
from tasks.errors import CalloutFailed, CalloutRejected, EgressRefused, LeaseBusy, ValidationError
from tasks.inflight import Inflight, InflightRecord, requeue_at_head
from tasks.keys import Keys
from tasks.lease import Grant, Lease, new_token, redis_now_ms, time_ms
from tasks.ledger import FAILURE, Ledger
from tasks.limits import limit_for, parse_limits
from tasks.redaction import redact_headers, redact_kwargs
from tasks.redis_client import client_for
from tasks.retry_policy import backoff_s, retry_after_s
from tasks.settings import MAX_CALLOUT_TIMEOUT_S, WORKER_ID_ENV, get_settings
from tasks.validation import validate

log = logging.getLogger(__name__)

#: how long a task waits on a paused queue before giving its message back at the head
PAUSE_WAIT_S = 5.0


def resource_lease_name(resource: str) -> str:
    return f"resource:{resource}"


class _Ctx:
    """Everything one run of the task needs, built once."""

    def __init__(self, task, kwargs):
        self.s = get_settings()
        self.egress = EgressPolicy(self.s.allowed_hosts, self.s.allow_private_networks)
        self.client = client_for(self.s)
        self.keys = Keys(self.s.key_prefix)
        self.task_id = task.request.id
        self.queue = (task.request.delivery_info or {}).get("routing_key") or self.s.queue
        self.tag = (task.request.properties or {}).get("delivery_tag") or ""
        self.batch = getattr(task.request, "onelane_batch", None)
        self.ledger = Ledger(self.client, self.keys, window_s=self.s.dedupe_window_s)
        # what is stored (in-flight record, dead letter): the caller's arguments, secrets masked
        self.kwargs = _storable(kwargs, self.s.redact_headers)

    def give_back_at_head(self, why: str):
        """Put this message back at the head of its queue and end this run (order kept)."""
        requeue_at_head(self.client, self.keys, queue=self.queue, delivery_tag=self.tag, task_id=self.task_id)
        log.info("onelane: %s given back at the head of %r (%s)", self.task_id, self.queue, why)
        raise Ignore()

    def defer(self, wait_s: float, why: str):
        """Relaxed order: move this message to the delay set and let the queue move on."""
        due = redis_now_ms(self.client) + int(wait_s * 1000)
        if flow.defer(self.client, self.keys, queue=self.queue, delivery_tag=self.tag, task_id=self.task_id,
                      due_ms=due):
            log.warning("onelane: %s deferred %.2f s (%s); the queue moves on", self.task_id, wait_s, why)
            raise Ignore()
        time.sleep(wait_s)  # not delivered through kombu (eager call): hold instead

    def count_batch(self, pipe, field: str) -> None:
        """Count this task's outcome in its batch, if it belongs to one."""
        if self.batch:
            pipe.hincrby(self.keys.batch(self.batch), field, 1)

    def fail(self, error: str, kind: str = "failed"):
        entry = _dead_letter_entry(self.task_id, self.queue, self.kwargs, reason=error, kind=kind,
                                   attempts=self.ledger.attempts(self.task_id))
        if self.batch:
            entry["batch"] = self.batch
        self.ledger.record_failure(task_id=self.task_id, queue=self.queue, error=error, dead_letter=entry,
                                   now_ms=redis_now_ms(self.client))
        pipe = self.client.pipeline(transaction=False)
        self.count_batch(pipe, "failed" if kind == "invalid" else "dead_lettered")
        pipe.execute()
        log.error("onelane: %s dead-lettered: %s", self.task_id, error)
        raise CalloutFailed(f"{error}; dead-lettered as {self.task_id}")


@app.task(name="tasks.callout", bind=True, Request="tasks.celery_request:HeadRequeueRequest")
def callout(self, *args, **kwargs):
    """Call the API (retrying transient failures), never overlapping another callout."""
    c = _Ctx(self, kwargs)
    s = c.s
    try:
        if args:
            raise ValidationError("args", "tasks.callout takes keyword arguments only (kwargs={...})")
        req = validate(kwargs, max_bytes=s.max_message_bytes)
    except ValidationError as exc:
        if exc.field == "payload":  # too large or not JSON: keep a summary, not the payload
            c.kwargs = {"url": str(kwargs.get("url"))[:2000], "omitted": "arguments too large or not JSON"}
        if args:
            c.kwargs = {**c.kwargs, "args": [repr(a)[:200] for a in args]}
        log.warning("onelane: rejected %s: %s (dead-lettered, the API was not called)", c.task_id, exc)
        try:
            c.fail(str(exc), kind="invalid")
        except CalloutFailed:
            pass
        raise CalloutRejected(f"{exc}; the API was not called and the task is dead-lettered") from None
    retryable = frozenset(req.retry_on) if req.retry_on is not None else s.retry_statuses

    resource = req.resource or c.queue
    idem_key = req.idempotency_key or c.task_id
    timeout_s = req.timeout_s or s.callout_timeout_s
    lease = Lease(c.client, resource_lease_name(resource), keys=c.keys)
    circuit = Circuit(c.client, c.keys, resource, threshold=s.circuit_threshold,
                      cooldown_ms=int(s.circuit_cooldown_s * 1000),
                      cooldown_max_ms=int(s.circuit_cooldown_max_s * 1000))
    inflight = Inflight(c.client, c.keys)
    owner = os.environ.get(WORKER_ID_ENV, "")
    limit = limit_for(_limits(s.limits_json), resource)
    cap = _Capped(c, resource, limit) if limit.capped else None
    first = True

    while True:
        # One round trip for everything an attempt must know before it starts.
        pipe = c.client.pipeline(transaction=False)
        c.ledger.preflight(pipe, c.task_id, idem_key)
        pipe.exists(c.keys.paused(c.queue))
        pipe.hgetall(c.keys.circuit(resource))
        pipe.time()
        if first and owner and c.tag and c.queue == s.bulk_queue:
            # the receiver record again (the worker wrote it on receipt; this covers a Redis error then)
            pipe.hset(c.keys.reserved(c.queue), c.tag, owner)
        done_raw, idem_hit, attempts_raw, paused, circuit_raw, now = pipe.execute()[:6]
        preflight_at = time.monotonic()
        redis_ms = time_ms(now)
        if first:
            first = False
            prior = c.ledger.outcome_from(done_raw, idem_hit)
            if prior is not None:
                log.info("onelane: %s already has a recorded outcome (%s); not calling the API again",
                         c.task_id, prior.status)
                if prior.status == FAILURE:
                    raise CalloutFailed(prior.error or "failed earlier")
                return prior.result
        n = len(attempts_raw) + 1
        if n > s.max_attempts:
            c.fail(f"{req.method} {req.url}: no attempts left ({s.max_attempts} made)")
        # The kill switch: a paused queue starts no new attempt.
        if paused:
            if not flow.wait_resumed(c.client, c.keys, c.queue, timeout_s=PAUSE_WAIT_S):
                c.give_back_at_head("queue paused")
        # An open circuit starts no attempt on its resource until the cool-down ends.
        blocked_ms = circuit.state_from(circuit_raw, redis_ms).blocked_for_ms
        if blocked_ms:
            if s.ordering == "relaxed":
                c.defer(blocked_ms / 1000, f"circuit of {resource!r} open")
            else:
                log.warning("onelane: circuit of %r open; %s waits %.1f s", resource, c.task_id, blocked_ms / 1000)
                time.sleep(min(blocked_ms / 1000, 1.0))
            continue

        token = new_token()
        ttl_ms = int(timeout_s * 1000) + s.lease_grace_ms
        waited_ms = 0.0
        recorded = False
        try:
            if cap is None:
                # The in-flight record travels with the acquire (one round trip). Its deadline is an
                # estimate on the Redis clock, a little late on purpose: it only says when the reaper
                # may requeue; the lease itself (granted below) is what keeps calls apart.
                now_est = redis_ms + int((time.monotonic() - preflight_at) * 1000)
                early = InflightRecord(
                    task_id=c.task_id, queue=c.queue, resource=resource, owner=owner, lease=lease.name,
                    lease_token=token, fence=0, started_ms=now_est,
                    deadline_ms=now_est + int(timeout_s * 1000) + 100, attempt=n, delivery_tag=c.tag,
                    host=socket.gethostname(), pid=os.getpid(), kwargs=c.kwargs)
                got = lease.try_acquire(token, ttl_ms=ttl_ms, label=f"task {c.task_id} attempt {n}",
                                        along=lambda pipe: inflight.record(early, pipe=pipe))
                if isinstance(got, Grant):
                    grant, recorded = got, True
                else:  # busy: wait for it (blocking on the release signal), then record for real
                    grant = lease.acquire(token, ttl_ms=ttl_ms,
                                          wait_ms=int(MAX_CALLOUT_TIMEOUT_S * 1000) + s.lease_grace_ms,
                                          label=f"task {c.task_id} attempt {n}")
            else:
                # recorded before waiting: a dead worker's waiting task comes back at once
                inflight.record(InflightRecord(
                    task_id=c.task_id, queue=c.queue, resource=resource, owner=owner, lease="", lease_token="",
                    fence=0, started_ms=0, deadline_ms=0, attempt=n, delivery_tag=c.tag,
                    host=socket.gethostname(), pid=os.getpid(), kwargs=c.kwargs))
                grant, waited_ms = cap.acquire(token, ttl_ms=ttl_ms)
        except LeaseBusy as exc:
            c.fail(f"{exc}; gave up waiting")
        deadline_ms = grant.now_ms + int(timeout_s * 1000)
        if not recorded:
            inflight.record(InflightRecord(
                task_id=c.task_id, queue=c.queue, resource=resource, owner=owner, lease=grant.name,
                lease_token=token, fence=grant.fence, started_ms=grant.now_ms, deadline_ms=deadline_ms,
                attempt=n, delivery_tag=c.tag, host=socket.gethostname(), pid=os.getpid(), kwargs=c.kwargs,
            ))
        # worker-side credentials are merged here, at call time, and stored nowhere
        headers = {**req.headers, **credentials.headers_for(s.credentials_file, resource),
                   "Idempotency-Key": idem_key, "X-Fencing-Token": str(grant.fence)}
        started = time.time()
        resp, error, permanent = None, None, False
        try:
            resp = http.attempt(
                req.method, req.url, timeout_s=timeout_s, headers=headers, params=req.params,
                json=req.json, has_json=req.has_json, data=req.data, max_bytes=s.max_response_bytes,
                redirects=s.redirects, egress=c.egress,
            )
        except requests.RequestException as exc:
            error, permanent = _describe(exc)
        except EgressRefused as exc:
            error, permanent = f"refused: {exc}", True
        except Exception as exc:  # anything unforeseen: release the lease and dead-letter, never wedge
            log.exception("onelane: %s attempt %d raised an unexpected error", c.task_id, n)
            error, permanent = f"{type(exc).__name__}: {exc}", True
        info = {"attempt": n, "started": started, "elapsed_ms": round((time.time() - started) * 1000, 1),
                "fencing_token": grant.fence, "status_code": resp.status_code if resp else None,
                "error": error}

        if cap is not None:
            cap.after(resp, error)
        if resp is not None and resp.status_code < 400 and resp.status_code not in retryable:
            result = _result(resp, n, grant.fence, c.task_id, idem_key, resource, req, s.redact_headers)
            if cap is not None:
                result["waited_ms"] = round(waited_ms, 1)
            # One round trip: outcome recorded, in-flight record gone, lease released, circuit closed.
            done = c.client.pipeline(transaction=True)
            c.ledger.add_attempt(c.task_id, info, pipe=done)
            c.ledger.record_success(task_id=c.task_id, queue=c.queue, idempotency_key=idem_key, result=result,
                                    now_ms=grant.now_ms + int(info["elapsed_ms"]), pipe=done)
            (cap.release(grant, pipe=done) if cap is not None else lease.release(token, pipe=done))
            circuit.record(ok=True, pipe=done)
            c.count_batch(done, "done")
            try:
                done.execute()
            except redis.exceptions.NoScriptError:
                # Redis lost its scripts (restart): the writes went through; release again directly
                scripts.forget(c.client)
                (cap.release(grant) if cap is not None else lease.release(token))
                circuit.record(ok=True)
            return result
        (cap.release(grant) if cap is not None else lease.release(token))
        what = error or f"{resp.status_code} {_snippet(resp)}"
        if permanent or (resp is not None and resp.status_code not in retryable):
            c.ledger.add_attempt(c.task_id, info)
            if resp is not None:
                circuit.record(ok=True)  # the API answered: it is up
            c.fail(f"{req.method} {req.url}: {what} (not retryable)")
        circuit.record(ok=False)
        wait = backoff_s(n, base_s=s.backoff_base_s, max_s=s.backoff_max_s)
        asked = retry_after_s(resp.headers.get("Retry-After")) if resp is not None else None
        if asked is not None:
            wait = min(asked, s.retry_after_max_s)
            info["retry_after_s"] = asked
        info["retry_in_s"] = round(wait, 3)
        c.ledger.add_attempt(c.task_id, info)
        if n >= s.max_attempts:
            c.fail(f"{req.method} {req.url} failed after {n} attempts; last: {what}")
        log.warning("onelane: %s attempt %d/%d failed (%s); next attempt in %.2f s",
                    c.task_id, n, s.max_attempts, what, wait)
        if s.ordering == "relaxed":
            c.defer(wait, f"attempt {n} failed: {what}")
        else:
            time.sleep(wait)


def _dead_letter_entry(task_id, queue, request, *, reason, kind, attempts) -> dict:
    return {"id": task_id, "task_id": task_id, "queue": queue, "kind": kind, "reason": reason,
            "request": request, "attempts": attempts, "dead_lettered_at": time.time()}


def _describe(exc: Exception) -> tuple[str, bool]:
    """A readable error and whether it is permanent (not worth another attempt)."""
    if isinstance(exc, http.RedirectRefused):
        return f"redirect refused: {exc}", True
    if http.is_name_resolution_error(exc):
        return f"the host name does not resolve: {exc}", True
    if isinstance(exc, (http.DeadlineExceeded, requests.Timeout)):
        return f"timeout: {exc}", False
    if isinstance(exc, requests.ConnectionError):
        return f"connection error: {exc}", False
    return f"{type(exc).__name__}: {exc}", False


def _snippet(resp) -> str:
    text = resp.body[:200].decode(resp.encoding or "utf-8", errors="replace")
    return " ".join(text.split())[:200]


_parsed_limits: dict = {}


def _limits(text: str):
    if text not in _parsed_limits:
        _parsed_limits[text] = parse_limits(text)
    return _parsed_limits[text]


class _Capped:
    """A capped resource for one task run: its semaphore, rate limit and adaptive cap."""

    def __init__(self, c, resource, limit):
        self.c = c
        self.resource = resource
        self.sem = Semaphore(c.client, c.keys, resource, limit)
        self.rate = RateLimiter(c.client, c.keys, resource, limit.rate_per_s) if limit.rate_per_s else None
        self.adaptive = Adaptive(c.client, c.keys, resource, limit.concurrency) if limit.adaptive else None

    def acquire(self, token, *, ttl_ms):
        grant, waited = self.sem.acquire(token, ttl_ms=ttl_ms, wait_ms=int(MAX_CALLOUT_TIMEOUT_S * 1000))
        if self.rate is not None:
            # the rate is checked while holding the slot, so starts never bunch up above the rate
            rate_wait = self.rate.acquire()
            if rate_wait > 0:
                waited += rate_wait
                deadline = self.sem.lease(grant.name).renew(token, ttl_ms=ttl_ms)
                grant = replace(grant, now_ms=deadline - ttl_ms, deadline_ms=deadline)
        pipe = self.c.client.pipeline(transaction=False)
        pipe.hincrby(self.c.keys.waits(self.resource), "count", 1)
        pipe.hincrbyfloat(self.c.keys.waits(self.resource), "total_ms", round(waited, 1))
        pipe.execute()
        return grant, waited

    def after(self, resp, error):
        overloaded = (resp is not None and resp.status_code in (429, 503)) or (
            error is not None and error.startswith("timeout"))
        if self.adaptive is not None:
            self.adaptive.record(overloaded)
        if self.rate is not None and resp is not None:
            asked = retry_after_s(resp.headers.get("Retry-After"))
            if asked:
                self.rate.push_back(min(asked, self.c.s.retry_after_max_s))

    def release(self, grant, pipe=None):
        return self.sem.release(grant, pipe=pipe)


def _storable(kwargs, names) -> dict:
    try:
        out = redact_kwargs(kwargs, names)
        json.dumps(out)
        return out
    except (TypeError, ValueError):
        return {k: repr(v) for k, v in dict(kwargs).items()}


def _result(resp, attempts, fence, task_id, idem_key, resource, req, redact) -> dict:
    out = {
        "status_code": resp.status_code,
        "headers": redact_headers(resp.headers, redact),
        "elapsed_ms": round(resp.elapsed_ms, 2),
        "attempts": attempts,
        "fencing_token": fence,
        "task_id": task_id,
        "idempotency_key": idem_key,
        "resource": resource,
        "method": req.method,
        "url": req.url,
        "redirected_to": resp.url if resp.url != req.url else None,
        "truncated": resp.truncated,
    }
    text = resp.body.decode(resp.encoding or "utf-8", errors="replace")
    if "json" in resp.content_type.lower() and not resp.truncated:
        try:
            out["json"] = json.loads(text)
            return out
        except ValueError:
            out["json_error"] = "the body is not valid JSON; kept as text"
    out["body"] = text
    return out
