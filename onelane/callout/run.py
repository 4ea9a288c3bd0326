"""One run of ``tasks.callout``: the steps a callout takes, each a method named for what it does.

The task (:mod:`onelane.task`) strings them together::

    run = CalloutRun.begin(request, args, kwargs)     # checked, or dead-lettered at once
    loop:
        check = run.preflight()                       # one read: outcome, attempts, pause, circuit
        a recorded outcome -> return it                # a redelivered copy never calls twice
        run.wait_until_open(check)                    # paused queue, open circuit
        with run.permit(check) as attempt:            # the lease (or a slot); recorded in flight
            reply = run.send(attempt)                 # one HTTP attempt under a hard deadline
            verdict = classify(reply, ...)            # success / retry after N s / failed for good
            success -> run.record_success(...)        # outcome + release, one transaction
        run.record_attempt(...); dead-letter or run.wait_before_retry(...)

Guarantees kept here: no attempt starts without the resource's permit, and its in-flight
record exists before it starts; an outcome is recorded (with the release) before the task
returns, so the message is acknowledged only after it; a copy of a task whose outcome is
recorded returns that outcome without calling the API; bad input never reaches the API.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import requests
from celery.exceptions import Ignore

from onelane.callout import credentials, http
from onelane.callout.classify import Reply, RetryPolicy, Verdict
from onelane.callout.egress import EgressPolicy
from onelane.callout.ledger import FAILURE, SUCCESS, Ledger, Outcome, count_batch_outcome
from onelane.callout.permit import Permit, permit_for
from onelane.callout.result import attempt_entry, dead_letter_entry, storable, success_result
from onelane.callout.validation import CalloutRequest, validate
from onelane.coordination.circuit import Circuit, CircuitState
from onelane.coordination.lease import Grant, new_token
from onelane.core.clients import client_for, ride_out
from onelane.core import counters
from onelane.core.clock import note_redis_now, redis_now_ms, time_ms
from onelane.core.errors import CalloutFailed, CalloutRejected, EgressRefused, LeaseBusy, ValidationError
from onelane.core.keys import Keys
from onelane.core.redaction import redact_url
from onelane.core.replication import NotReplicated, Replicas
from onelane.core.scripts import forget
from onelane.core.settings import WORKER_ID_ENV, Settings, get_settings
from onelane.delivery import coalescing, flow
from onelane.delivery.fetching import claim_fetched, fetched_of
from onelane.delivery.inflight import Inflight, InflightRecord, queue_acknowledge, requeue_at_head

log = logging.getLogger(__name__)

#: how long a task waits on a paused queue before giving its message back at the head
PAUSE_WAIT_S = 5.0
#: with strict order, a task whose resource's circuit is open looks again this often
CIRCUIT_NAP_S = 1.0


class SystemClock:
    """The clock a run sleeps and measures by; tests inject their own."""

    sleep = staticmethod(time.sleep)
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


@dataclass(frozen=True)
class Delivery:
    """Where a message came from, and which worker runs it."""

    task_id: str
    queue: str
    delivery_tag: str
    batch: str | None
    #: the worker's token (ONELANE_WORKER_ID), written as the owner of in-flight records
    owner: str
    #: the message as the worker's fetch list holds it, when the fast take delivered it (its callout
    #: runs from the fetch list); None when the take script recorded it as unacked already
    fetched: str | None = None
    exchange: str = ""

    @classmethod
    def of(cls, request, settings: Settings) -> "Delivery":
        """From Celery's task request (an eager call has no delivery info: the default queue)."""
        info, props = request.delivery_info or {}, request.properties or {}
        return cls(task_id=request.id,
                   queue=info.get("routing_key") or settings.queue,
                   delivery_tag=props.get("delivery_tag") or "",
                   batch=getattr(request, "onelane_batch", None),
                   owner=os.environ.get(WORKER_ID_ENV, ""),
                   fetched=fetched_of(props), exchange=info.get("exchange") or "")


@dataclass
class Preflight:
    """Everything an attempt must know before it starts, read in one round trip."""

    #: the recorded outcome of this task id (or a success with its idempotency key); first read only
    prior: Outcome | None
    #: the number of the attempt about to start (1-based, counted across retries and kills)
    attempt: int
    paused: bool
    circuit: CircuitState
    redis_ms: int
    #: the run's clock.monotonic() when the read came back (as it was sent, when it waited for a slot)
    read_at: float
    #: the token of the permit tried ahead, and its grant if the try won (None: not tried, or busy)
    token: str = ""
    grant: Grant | None = None
    #: the try ahead wrote this attempt's whole in-flight record, and it stands (a wait only stamps it)
    recorded: bool = False
    #: ms the try ahead waited for the permit, in the preflight's round trip (a task queued behind
    #: its process's waiters for a slot)
    waited_ms: float = 0.0


@dataclass
class Attempt:
    """One attempt under way: its number and the permit it holds."""

    number: int
    grant: Grant
    waited_ms: float
    released: bool = False
    #: the resource's circuit was closed with no failures when the attempt began (nothing to reset)
    circuit_clean: bool = False


@dataclass(frozen=True)
class Coalescing:
    """A callout with a coalesce key: its key, and the task ids it carries."""

    key: str
    carried: list

    def queue_end(self, pipe, s: Settings, client, keys: Keys, delivery: Delivery, *, status: str,
                  result: dict | None, error: str | None, now_ms: int) -> None:
        """Queue, on the transaction recording the callout's outcome, the same outcome for every id
        it carried, and the end of its hold on its key (parked callouts go back to the head)."""
        if self.carried:
            coalescing.queue_carried_outcomes(pipe, keys, self.carried, carrier=delivery.task_id, status=status,
                                              result=result, error=error, window_s=s.dedupe_window_s,
                                              result_expires_s=s.result_expires_s, now_ms=now_ms)
        coalescing.queue_release(pipe, client, keys, queue=delivery.queue, key=self.key, task_id=delivery.task_id)


class CalloutRun:
    """One run of one callout message, from its check to its recorded outcome."""

    def __init__(self, settings: Settings, delivery: Delivery, request: CalloutRequest, stored_kwargs: dict, *,
                 clock=None):
        s = self.settings = settings
        self.delivery = delivery
        self.request = request
        #: the caller's arguments as stored (in-flight record, dead letter): secrets masked
        self.stored_kwargs = stored_kwargs
        self.clock = clock or SystemClock()
        self.client = client_for(s)
        self.keys = Keys(s.key_prefix)
        self.resource = request.resource or delivery.queue
        self.idempotency_key = request.idempotency_key or delivery.task_id
        self.timeout_ms = int((request.timeout_s or s.callout_timeout_s) * 1000)
        self.policy = RetryPolicy.of(s, request.retry_on)
        self.ledger = Ledger(self.client, self.keys, window_s=s.dedupe_window_s)
        self.inflight = Inflight(self.client, self.keys)
        self.circuit = Circuit(self.client, self.keys, self.resource, threshold=s.circuit_threshold,
                               cooldown_ms=int(s.circuit_cooldown_s * 1000),
                               cooldown_max_ms=int(s.circuit_cooldown_max_s * 1000))
        self.replicas = Replicas.of(s)
        self.permits: Permit = permit_for(self.client, self.keys, self.resource, s.limit_for(self.resource),
                                          self.inflight, lease_grace_ms=s.lease_grace_ms, replicas=self.replicas)
        self.egress = EgressPolicy(s.allowed_hosts, s.allow_private_networks)
        self._first_read = True
        #: the number the next attempt should have (its in-flight record may be written before the
        #: preflight reads how many attempts finished: the number is checked then)
        self._next_attempt = 1
        #: a message the fast take delivered stays in the worker's fetch list, which says whose it is,
        #: while its callout runs: its success's ack takes it from there (in the outcome's
        #: transaction), and a step that needs it unacked claims it first (a give-back, a deferral).
        #: Four commands less a serial callout, five a bulk one, than a claim by the preflight (README,
        #: "Callouts run from the worker's fetch list").
        self._unclaimed = delivery.fetched is not None and bool(delivery.delivery_tag and delivery.owner)
        self._said_circuit_open = False
        #: the task ids this callout carries (coalescing), read before each attempt
        self.carried: list[dict] = []

    # -- begin ------------------------------------------------------------------------------
    @classmethod
    def begin(cls, task_request, args, kwargs, *, settings: Settings | None = None, clock=None) -> "CalloutRun":
        """Check the message's arguments and start a run.

        Raises CalloutRejected for bad input, after dead-lettering it: the API is never called.
        """
        s = settings or get_settings()
        delivery = Delivery.of(task_request, s)
        stored = storable(kwargs, s.redact_headers)
        try:
            if args:
                raise ValidationError("args", "tasks.callout takes keyword arguments only (kwargs={...})")
            request = validate(kwargs, max_bytes=s.max_message_bytes)
        except ValidationError as exc:
            raise _reject(s, delivery, stored, args, kwargs, exc) from None
        return cls(s, delivery, request, stored, clock=clock)

    @property
    def task_id(self) -> str:
        return self.delivery.task_id

    # -- before an attempt --------------------------------------------------------------------
    def preflight(self) -> Preflight:
        """One round trip for everything before an attempt: recorded outcome, attempts so far,
        pause, circuit, the Redis clock — and the permit (the lease, or a slot) and the in-flight
        record, tried ahead (a task queued behind its process's waiters for a slot waits for a release
        in this round trip, then tries); on the bulk queue, the receiver record again of a message
        the take script delivered (one the fast take delivered stays in the worker's fetch list,
        which says whose it is, and is claimed by nobody: :meth:`_claim_now`). When something
        stands in the way (an outcome, a pause, an open circuit, no attempts left) a lease won ahead
        is given back at once."""
        # one token for every try of this read: a try whose reply was lost (a failover) may have won
        # the lease, and the next try is then a re-grant to the same token, not a second lease
        token = new_token()
        return self._redis(lambda: self._preflight(token))

    def _preflight(self, token: str, waited_before_ms: float = 0.0) -> Preflight:
        d, s = self.delivery, self.settings
        record = self._record(attempt=self._next_attempt)
        pipe = self.client.pipeline(transaction=False)
        receipts = 0  # replies before the reads: the receiver record's
        if self._first_read and d.owner and d.delivery_tag and d.queue == s.bulk_queue and not self._unclaimed:
            # the receiver record (again: the take script or the worker on receipt wrote it, and this
            # covers a Redis error then), before the try ahead: a wait for a slot may follow it in
            # this round trip, and the reaper finds a dead receiver's messages by this record
            pipe.hset(self.keys.reserved(d.queue), d.delivery_tag, d.owner)
            receipts += 1
        # the recorded outcome and the pause flag: one MGET
        outcome_values = self.ledger.preflight(pipe, d.task_id, self.idempotency_key,
                                               also=[self.keys.paused(d.queue)])
        pipe.hgetall(self.keys.circuit(self.resource))
        pipe.time()
        keyed = self.request.coalesce_key is not None
        if keyed:  # the ids it carries: fixed once a worker took it
            coalescing.read_carried(self.client, self.keys, queue=d.queue, task_id=d.task_id, pipe=pipe)
        try:
            ahead = self.permits.speculate(pipe, record, token=token, ttl_ms=self._ttl_ms(),
                                           timeout_ms=self.timeout_ms)
            waited = ahead and self.replicas.queue_wait(pipe)  # the grant counts only once replicated
            sent_at = self.clock.monotonic()
            replies = pipe.execute()
        except redis.exceptions.NoScriptError:  # Redis lost its script cache (a restart): load again
            replies = None
        finally:  # whatever happened (a wait for a slot counts the task as waiting until this)
            waited_ms = waited_before_ms + self.permits.speculation_over()
        if replies is None:
            forget(self.client)
            return self._preflight(token, waited_ms)  # a wait in it is over: the permit tries at once
        values, finished, circuit_raw, now = replies[receipts:receipts + 4]
        recorded, paused = values[:outcome_values], values[outcome_values]
        first = receipts + 4
        if keyed:
            self.carried = coalescing.carried_of(replies[first])
            first += 1
        grant = self.permits.speculated(replies[first:first + ahead], token=token) if ahead else None
        redis_ms = time_ms(now)
        if not waited and not waited_ms:  # a reading that waited (replicas, a slot) is too old to estimate the clock by
            note_redis_now(redis_ms)
        # the clock was read before a wait for a slot in the same round trip: the circuit is judged at its end
        circuit_now_ms = redis_ms + int(waited_ms)
        prior = None
        if self._first_read:
            self._first_read = False
            prior = self.ledger.outcome_from(recorded)
        check = Preflight(prior=prior, attempt=int(finished) + 1, paused=paused is not None,
                          circuit=self.circuit.state_from(circuit_raw, circuit_now_ms), redis_ms=redis_ms,
                          # the Redis clock was read as the round trip began: before a wait for a slot in it
                          read_at=sent_at if waited_ms else self.clock.monotonic(), token=token, grant=grant,
                          recorded=bool(ahead), waited_ms=waited_ms)
        self._next_attempt = check.attempt
        if ahead and (prior is not None or check.attempt > self.policy.max_attempts or check.paused
                      or check.circuit.blocked_for_ms):
            self._give_back_ahead(check)
            return check
        if waited and grant is not None and not self.replicas.confirmed(replies[-waited:]):
            self._give_back_ahead(check)
            self.replicas.resync(self.client)
            raise NotReplicated(f"the grant of {self.resource!r}", self.replicas.confirmations(replies[-waited:]),
                                self.replicas.needed)
        if ahead and not self.permits.stamps_attempt and check.attempt != record.attempt:
            self.inflight.set_attempt(self.task_id, check.attempt)  # more attempts finished than it knew of
        return check

    def _give_back_ahead(self, check: Preflight) -> None:
        """Release a lease won ahead (or held by the try without a grant), and drop the in-flight
        record written with it."""
        pipe = self.client.pipeline(transaction=True)
        if check.grant is not None:
            self.permits.release(check.grant, pipe=pipe)
        else:
            self.permits.release_try(check.token, pipe=pipe)
        self.inflight.forget(self.task_id, self.delivery.queue, pipe=pipe)
        pipe.execute()
        check.grant = None
        check.recorded = False

    def _record(self, *, attempt: int) -> InflightRecord:
        d = self.delivery
        return InflightRecord(
            task_id=d.task_id, queue=d.queue, resource=self.resource, owner=d.owner, lease="", lease_token="",
            fence=0, started_ms=0, deadline_ms=0, attempt=attempt, delivery_tag=d.delivery_tag,
            host=socket.gethostname(), pid=os.getpid(), kwargs=self.stored_kwargs)

    def _ttl_ms(self) -> int:
        """A grant outlives the attempt's deadline by the lease grace."""
        return self.timeout_ms + self.settings.lease_grace_ms

    def recorded(self, prior: Outcome) -> dict:
        """The recorded result of a callout that already ran; a recorded failure is raised again."""
        log.info("onelane: %s already has a recorded outcome (%s); not calling the API again",
                 self.task_id, prior.status)
        if self.request.coalesce_key is not None:  # an outcome whose coalescing was not finished (a kill)
            self._redis(lambda: self._finish_coalescing(prior.status, result=prior.result, error=prior.error))
        if prior.status == FAILURE:
            raise CalloutFailed(prior.error or "failed earlier")
        if self.delivery.delivery_tag:  # every success acknowledges its message itself (see record_success)
            self._redis(lambda: self._acknowledge_now())
        return prior.result

    def _acknowledge_now(self) -> None:
        pipe = self.client.pipeline(transaction=True)
        self._queue_ack(pipe)
        pipe.execute()

    def _queue_ack(self, pipe) -> None:
        """Queue the message's ack on ``pipe``: its removal from the worker's fetch list while it waits
        there unclaimed, else the removal of kombu's unacked copy, and of a bulk message's receiver
        record with it (the reaper needs that only for a message still unacked, and would drop it later,
        a round trip and a script each)."""
        d = self.delivery
        if self._unclaimed:
            pipe.lrem(self.keys.fetch_list(d.queue, d.owner), 1, d.fetched)
            return
        queue_acknowledge(pipe, d.delivery_tag)
        if d.queue == self.settings.bulk_queue:
            pipe.hdel(self.keys.reserved(d.queue), d.delivery_tag)

    def _claim_now(self) -> bool:
        """Before a step that moves the message from kombu's unacked copy (a give-back, a deferral): a
        message still in the worker's fetch list is claimed first (on the bulk queue with its
        receiver record), in one step. False: the fetch list no longer held it (given back meanwhile, its
        worker counted as gone): nothing was written, and this run leaves the message alone."""
        if not self._unclaimed:
            return True
        d = self.delivery
        receiver = d.owner if d.queue == self.settings.bulk_queue else ""  # a lane's guard says whose it is
        claimed = self._redis(lambda: claim_fetched(
            self.client, self.keys, fetch_list=self.keys.fetch_list(d.queue, d.owner), delivery_tag=d.delivery_tag,
            message=d.fetched, exchange=d.exchange, queue=d.queue, receiver=receiver))
        self._unclaimed = False
        if not claimed:
            log.warning("onelane: %s was given back to its queue while this worker held it (counted as gone); "
                        "this run ends without moving it", d.task_id)
        return claimed

    def wait_until_open(self, check: Preflight) -> bool:
        """Wait while the queue is paused or the resource's circuit is open.

        True: the attempt may start. False: the circuit is open and this run waited a while
        (strict order); read again. Ends the run (Ignore) when it hands its message back: a
        queue paused longer than PAUSE_WAIT_S gives it back at the head, order kept; with
        relaxed order an open circuit moves it to the delay set.
        """
        d = self.delivery
        if check.paused and not self._redis(
                lambda: flow.wait_resumed(self.client, self.keys, d.queue, timeout_s=PAUSE_WAIT_S)):
            raise self.give_back_at_head("queue paused")
        blocked_s = check.circuit.blocked_for_ms / 1000
        if not blocked_s:
            return True
        if self.settings.ordering == "relaxed":
            self._defer_or_sleep(blocked_s, f"circuit of {self.resource!r} open")
        else:
            if not self._said_circuit_open:  # once per run: the opening itself was logged with its end
                log.info("onelane: %s waits for the circuit of %r to close (%.1f s)", self.task_id,
                         self.resource, blocked_s)
                self._said_circuit_open = True
            self.clock.sleep(min(blocked_s, CIRCUIT_NAP_S))
        return False

    # -- the attempt ---------------------------------------------------------------------------
    @contextmanager
    def permit(self, check: Preflight):
        """Hold the resource's permit (its lease, or a slot) for one attempt, recorded in flight.

        Waits as long as the permit can legitimately be held by another; longer than that
        dead-letters the callout. Released when the block ends, unless the outcome's
        transaction released it already.
        """
        if check.grant is not None:  # won ahead, in the preflight's round trip
            grant, waited_ms = check.grant, check.waited_ms
        else:
            # the Redis clock now, estimated from the preflight read (no extra round trip)
            now_ms = check.redis_ms + int((self.clock.monotonic() - check.read_at) * 1000)
            record = self._record(attempt=check.attempt)
            token = check.token or new_token()
            try:
                grant, waited_ms = self._redis(lambda: self.permits.acquire(
                    record, token=token, ttl_ms=self._ttl_ms(), timeout_ms=self.timeout_ms, redis_now_ms=now_ms,
                    recorded=check.recorded))
            except LeaseBusy as exc:
                raise self.dead_letter(f"{exc}; gave up waiting") from None
            waited_ms += check.waited_ms  # a wait in the preflight that ended without a slot
        attempt = Attempt(check.attempt, grant, waited_ms,
                          circuit_clean=check.circuit.state == "closed" and not check.circuit.failures)
        try:
            yield attempt
        except BaseException:
            if not attempt.released:
                self._release_quietly(attempt)
            raise
        if not attempt.released:
            self._redis(lambda: self.permits.release(grant))
            attempt.released = True

    def send(self, attempt: Attempt) -> Reply:
        """Make one HTTP attempt under its hard deadline; never raises for a failed call.

        Worker-side credentials are merged here, at call time, and stored nowhere. The
        permit learns from the reply (the adaptive cap, a Retry-After for the rate limit).
        """
        req = self.request
        headers = {**req.headers, **credentials.headers_for(self.settings.credentials_file, self.resource),
                   "Idempotency-Key": self.idempotency_key, "X-Fencing-Token": str(attempt.grant.fence)}
        started = self.clock.time()
        try:
            response = http.attempt(
                req.method, req.url, timeout_s=self.timeout_ms / 1000, headers=headers, params=req.params,
                json=req.json, has_json=req.has_json, data=req.data,
                max_bytes=self.settings.max_response_bytes, redirects=self.settings.redirects,
                egress=self.egress)
            error, permanent = None, False
        except requests.RequestException as exc:
            response, (error, permanent) = None, describe_failure(exc)
        except EgressRefused as exc:
            response, error, permanent = None, f"refused: {exc}", True
        except Exception as exc:  # anything unforeseen: release the permit and dead-letter, never wedge
            log.exception("onelane: %s attempt %d raised an unexpected error", self.task_id, attempt.number)
            response, error, permanent = None, f"{type(exc).__name__}: {exc}", True
        reply = Reply(response=response, error=error, permanent=permanent, started=started,
                      elapsed_ms=(self.clock.time() - started) * 1000)
        try:
            self.permits.feedback(reply, retry_after_max_s=self.settings.retry_after_max_s)
        except redis.RedisError as exc:  # best effort: the adaptive cap learns from the next reply
            log.warning("onelane: %s: could not tell the permit how the API coped (%s)", self.task_id, exc)
        return reply

    # -- after the attempt ----------------------------------------------------------------------
    def record_success(self, attempt: Attempt, reply: Reply, verdict: Verdict, *, store_result=None) -> dict:
        """Record the outcome, drop the in-flight record, release the permit and close the
        circuit in one transaction; return the result.

        ``store_result(pipe, result)`` may queue the result's own storage (Celery's result
        backend) in that same transaction. The call has happened: while Redis refuses (out of
        memory, loading, away) this keeps trying to record it, never calling the API again.
        """
        def write():
            return self._redis(lambda: self._record_success(attempt, reply, verdict, store_result))

        result = write()
        # the message is acknowledged when this returns: not before the outcome is replicated
        self.replicas.ensure(self.client, self.keys.replication_probe, what=f"the outcome of {self.task_id}", log=log,
                             written_key=self.keys.done(self.task_id), rewrite=write, sleep=self.clock.sleep)
        return result

    def _record_success(self, attempt: Attempt, reply: Reply, verdict: Verdict, store_result) -> dict:
        d, req = self.delivery, self.request
        result = success_result(reply, attempt=attempt.number, fence=attempt.grant.fence, task_id=d.task_id,
                                idempotency_key=self.idempotency_key, resource=self.resource, lane=d.queue,
                                method=req.method, url=req.url, redact=self.settings.redact_headers)
        if self.permits.capped:
            result["waited_ms"] = round(attempt.waited_ms, 1)
        entry = attempt_entry(reply, verdict, attempt=attempt.number, fence=attempt.grant.fence)
        finished_ms = attempt.grant.now_ms + int(entry["elapsed_ms"])
        done = self.client.pipeline(transaction=True)
        self.ledger.record_success(task_id=d.task_id, queue=d.queue, idempotency_key=self.idempotency_key,
                                   result=result, now_ms=finished_ms, pipe=done)
        if not attempt.circuit_clean:  # a closed circuit with no failures needs no write
            self.circuit.record(ok=True, pipe=done)
        if store_result is not None:
            store_result(done, result)
        if d.batch:
            count_batch_outcome(done, self.keys, d.batch, "done", now_ms=finished_ms)
        counters.count(done, self.keys, "succeeded", d.queue, self.resource)
        self._count_attempt(done, attempt, reply)
        self._queue_coalescing_end(done, SUCCESS, result=result, error=None, now_ms=finished_ms)
        if d.delivery_tag:  # acknowledged with its outcome (the worker's ack then stays in memory)
            self._queue_ack(done)
        # the permit last: released, or a slot handed on to a task of this process waiting for one,
        # who learns how the transaction went whatever happens
        settle = self.permits.hand_off(attempt.grant, pipe=done)
        try:
            replies = done.execute()
        except redis.exceptions.NoScriptError:
            # Redis lost its scripts (restart): the writes went through; release again directly
            settle(None)
            forget(self.client)
            self.permits.release(attempt.grant)
            if not attempt.circuit_clean:
                self.circuit.record(ok=True)
            self._release_key()
        except BaseException:
            settle(None)
            raise
        else:
            settle(replies)
        attempt.released = True
        return result

    def record_attempt(self, attempt: Attempt, reply: Reply, verdict: Verdict) -> None:
        """Keep a failed attempt (for the attempt count and the dead letter); the circuit learns from it."""
        entry = attempt_entry(reply, verdict, attempt=attempt.number, fence=attempt.grant.fence)

        def keep() -> None:  # the attempt and its counters: one transaction
            pipe = self.client.pipeline(transaction=True)
            self.ledger.add_attempt(self.task_id, entry, pipe=pipe)
            self._count_attempt(pipe, attempt, reply)
            if not verdict.final:
                counters.count(pipe, self.keys, "retried", self.delivery.queue, self.resource)
            pipe.execute()

        self._redis(keep)
        self._next_attempt = attempt.number + 1
        if verdict.api_up is None:
            return
        after = self._redis(lambda: self.circuit.record(ok=verdict.api_up, task_id=self.task_id))
        if after.opened_now:
            closes = time.strftime("%H:%M:%S", time.localtime(time.time() + after.cooldown_ms / 1000))
            log.warning("onelane: circuit of %r opened after %d failing callout(s) in a row (last: %s); no "
                        "callout to it starts until %s (cool-down %.0f s)", self.resource, after.failures,
                        verdict.reason, closes, after.cooldown_ms / 1000)

    def wait_before_retry(self, attempt: Attempt, verdict: Verdict) -> None:
        """Wait the verdict's time before the next attempt: strict order holds the queue (sleeps);
        relaxed order moves the message to the delay set and ends the run (Ignore)."""
        log.warning("onelane: %s attempt %d/%d failed (%s); next attempt in %.2f s",
                    self.task_id, attempt.number, self.policy.max_attempts, verdict.reason, verdict.wait_s)
        if self.settings.ordering == "relaxed":
            self._defer_or_sleep(verdict.wait_s, f"attempt {attempt.number} failed: {verdict.reason}")
        else:
            self.clock.sleep(verdict.wait_s)

    # -- ending ----------------------------------------------------------------------------------
    def dead_letter(self, reason: str) -> CalloutFailed:
        """Record the callout as failed for good, with its request and every attempt; return the
        error to raise (the task ends in FAILURE)."""
        error = f"{self.request.method} {self.request.url}: {reason}"
        attempts = self._redis(lambda: self.ledger.attempts(self.task_id))

        def write():
            self._redis(lambda: _record_dead_letter(self.settings, self.client, self.keys, self.delivery,
                                                    self.stored_kwargs, error=error, kind="failed", attempts=attempts,
                                                    coalesce=self._coalescing(), resource=self.resource))

        write()
        self.replicas.ensure(self.client, self.keys.replication_probe, what=f"the dead letter of {self.task_id}",
                             log=log, written_key=self.keys.done(self.task_id), rewrite=write, sleep=self.clock.sleep)
        return CalloutFailed(f"{error}; dead-lettered as {self.task_id}")

    def give_back_at_head(self, why: str) -> Ignore:
        """Put this message back at the head of its queue (order kept); return the Ignore that ends the run."""
        d = self.delivery
        if not self._claim_now():
            return Ignore()
        self._redis(lambda: requeue_at_head(self.client, self.keys, queue=d.queue, delivery_tag=d.delivery_tag,
                                            task_id=d.task_id))
        log.info("onelane: %s given back at the head of %r (%s)", d.task_id, d.queue, why)
        return Ignore()

    # -- coalescing ------------------------------------------------------------------------------
    def _coalescing(self) -> "Coalescing | None":
        key = self.request.coalesce_key
        return None if key is None else Coalescing(key, self.carried)

    def _queue_coalescing_end(self, pipe, status: str, *, result: dict | None, error: str | None,
                              now_ms: int) -> None:
        """Queue, on the outcome's transaction, the outcomes of the ids this callout carried and
        the end of its hold on its coalesce key."""
        c = self._coalescing()
        if c is not None:
            c.queue_end(pipe, self.settings, self.client, self.keys, self.delivery, status=status, result=result,
                        error=error, now_ms=now_ms)

    def _finish_coalescing(self, status: str, *, result: dict | None, error: str | None) -> None:
        pipe = self.client.pipeline(transaction=True)
        self._queue_coalescing_end(pipe, status, result=result, error=error, now_ms=redis_now_ms(self.client))
        try:
            pipe.execute()
        except redis.exceptions.NoScriptError:
            forget(self.client)
            self._release_key()

    def _release_key(self) -> None:
        if self.request.coalesce_key is not None:
            coalescing.release(self.client, self.keys, queue=self.delivery.queue, key=self.request.coalesce_key,
                               task_id=self.task_id)

    # -- helpers ---------------------------------------------------------------------------------
    def _count_attempt(self, pipe, attempt: Attempt, reply: Reply) -> None:
        """Queue the counters of one finished HTTP attempt: its status class, its duration, and what its
        permit counts (a slot's wait)."""
        lane = self.delivery.queue
        self.permits.queue_counts(pipe, waited_ms=attempt.waited_ms, lane=lane)
        counters.count(pipe, self.keys, "attempts", lane, self.resource, counters.status_class(reply.status))
        counters.observe(pipe, self.keys, "callout_duration_seconds", reply.elapsed_ms / 1000, lane, self.resource)

    def _defer_or_sleep(self, wait_s: float, why: str) -> None:
        """Move the message to the delay set, due in ``wait_s``, and end the run (Ignore); a message
        not delivered through kombu (an eager call) cannot move, so sleep instead."""
        d = self.delivery

        if d.delivery_tag and not self._claim_now():
            raise Ignore()

        def defer() -> bool:
            due_ms = redis_now_ms(self.client) + int(wait_s * 1000)
            return flow.defer(self.client, self.keys, queue=d.queue, delivery_tag=d.delivery_tag,
                              task_id=d.task_id, due_ms=due_ms)

        if self._redis(defer):
            log.warning("onelane: %s deferred %.2f s (%s); the queue moves on", d.task_id, wait_s, why)
            raise Ignore()
        self.clock.sleep(wait_s)

    def _redis(self, fn):
        """Run a Redis step of this run, waiting out a Redis that refuses for a while (out of memory,
        loading, busy, read-only) or is away: such a spell delays a callout, it never fails or repeats it."""
        return ride_out(fn, what=f"callout {self.task_id}", log=log, sleep=self.clock.sleep,
                        monotonic=self.clock.monotonic)

    def _release_quietly(self, attempt: Attempt) -> None:
        try:
            self.permits.release(attempt.grant)
            attempt.released = True
        except Exception as exc:  # Redis away: the permit expires at its deadline
            log.warning("onelane: could not release the permit of %s (%s); it expires by itself",
                        self.task_id, exc)


def describe_failure(exc: Exception) -> tuple[str, bool]:
    """A failed request as a readable error, and whether it is permanent (no retry can help)."""
    if isinstance(exc, http.RedirectRefused):
        return f"redirect refused: {exc}", True
    if http.is_name_resolution_error(exc):
        return f"the host name does not resolve: {exc}", True
    if isinstance(exc, (http.DeadlineExceeded, requests.Timeout)):
        return f"timeout: {exc}", False
    if isinstance(exc, requests.ConnectionError):
        return f"connection error: {exc}", False
    return f"{type(exc).__name__}: {exc}", False


def _reject(s: Settings, delivery: Delivery, stored: dict, args, kwargs, exc: ValidationError) -> CalloutRejected:
    """Dead-letter a message whose arguments are wrong; return the error to raise."""
    if exc.field == "payload":  # too large or not JSON: keep a summary, not the payload
        stored = {"url": redact_url(str(kwargs.get("url")))[:2000], "omitted": "arguments too large or not JSON"}
    if args:
        stored = {**stored, "args": [repr(a)[:200] for a in args]}
    log.warning("onelane: rejected %s: %s (dead-lettered, the API was not called)", delivery.task_id, exc)
    client, keys = client_for(s), Keys(s.key_prefix)
    key = kwargs.get(coalescing.ARGUMENT) if isinstance(kwargs, dict) else None
    coalesce = None
    if coalescing.coalesce_key_problem(key) is None:  # the fetch honoured its key: end its hold
        coalesce = Coalescing(key, coalescing.read_carried(client, keys, queue=delivery.queue,
                                                           task_id=delivery.task_id))
    _record_dead_letter(s, client, keys, delivery, stored, error=str(exc), kind="invalid", attempts=[],
                        coalesce=coalesce)
    return CalloutRejected(f"{exc}; the API was not called and the task is dead-lettered")


def _record_dead_letter(s: Settings, client, keys: Keys, delivery: Delivery, stored: dict, *, error: str,
                        kind: str, attempts: list, coalesce: "Coalescing | None" = None,
                        resource: str | None = None) -> None:
    entry = dead_letter_entry(delivery.task_id, delivery.queue, stored, reason=error, kind=kind,
                              attempts=attempts, batch=delivery.batch)
    now_ms = redis_now_ms(client)

    def also(pipe) -> None:
        if kind == "failed" and attempts:  # the API was called and failed for good (not bad input, not
            # a give-up before any attempt, such as no permit in time)
            counters.count(pipe, keys, "failed", delivery.queue, resource or delivery.queue)
        if coalesce is not None:
            entry["carried"] = [c["id"] for c in coalesce.carried]
            coalesce.queue_end(pipe, s, client, keys, delivery, status=FAILURE, result=None, error=error,
                               now_ms=now_ms)

    try:
        Ledger(client, keys, window_s=s.dedupe_window_s).record_failure(
            task_id=delivery.task_id, queue=delivery.queue, error=error, dead_letter=entry, now_ms=now_ms, also=also,
            resource=resource)
    except redis.exceptions.NoScriptError:  # Redis lost its scripts (a restart): the writes went through
        forget(client)
        if coalesce is not None:
            coalescing.release(client, keys, queue=delivery.queue, key=coalesce.key, task_id=delivery.task_id)
    if delivery.batch:
        count_batch_outcome(client, keys, delivery.batch, "failed" if kind == "invalid" else "dead_lettered",
                            now_ms=now_ms)
    log.error("onelane: %s dead-lettered: %s", delivery.task_id, error)
