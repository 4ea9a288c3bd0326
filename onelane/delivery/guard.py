"""The worker guard: one consumer per lane, as a Celery worker bootstep.

A worker consumes exactly one queue: a *lane* (any queue but the bulk queue: one
integration, one call at a time, in order) or the bulk queue. It registers that queue in
Redis, so beat's reaper and ``onelane status`` find every lane with nothing to configure.
On a lane it takes the lane's guard lease (``guard:<lane>``) and renews it from a
heartbeat thread while it lives; a clean shutdown releases it. Guarantees:

* a second worker on the same lane, while a live one holds the guard, refuses to start
  (non-zero exit, one line naming the holder), or, with ONELANE_STANDBY=1, waits without
  consuming and takes over within one guard TTL after the holder dies;
* a holder on this host whose pid is gone is provably dead: its guard is taken at once;
* before consuming, the new holder puts the orphans of earlier holders back at the
  head of the lane (after their attempt deadlines), so order holds;
* a worker that finds its guard taken by another stops itself (warm shutdown);
* a warm shutdown keeps the guard until the callout in flight is finished and
  acknowledged, so a standby never takes over a lane whose call is still running;
* a worker that would run more than one message of a lane at a time (``-c``,
  ``--autoscale``, ``--prefetch-multiplier``, several queues) refuses to start.

The guard is the second line of defence; the resource lease is the first.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid

import redis
from celery import bootsteps, signals
from celery.worker import state as worker_state

from onelane.coordination.lease import Grant, Lease
from onelane.core.clients import (
    client_for,
    connect_hint,
    eviction_problem,
    exposure_warning,
    is_not_redis,
    is_tls_verify_failure,
    not_redis_message,
    redact_url,
    ride_out,
    sentinel_master_view,
    sentinel_problem,
    transient_reason,
    version_problem,
)
from onelane.core import counters
from onelane.core.errors import GuardHeld, LeaseNotHeld, OnelaneError, WorkerMisconfigured
from onelane.core.keys import Keys
from onelane.core.scripts import forget
from onelane.core.settings import WORKER_ID_ENV, WORKER_QUEUE_ENV, get_settings
from onelane.delivery.epoch import EpochWatch
from onelane.delivery.fetching import register_fetch_list
from onelane.delivery.flow import absorb_priorities, pending_moves, promote_due
from onelane.delivery.recovery import wait_and_requeue_orphans
from onelane.delivery.registry import register_queue
from onelane.delivery.transport import receipt_recorded

log = logging.getLogger(__name__)

#: how often the heartbeat thread moves due relaxed retries and prioritised messages to the queue
PROMOTE_EVERY_S = 0.25
#: the exit status of a worker that refuses to start
EX_REFUSED = 1


def consumed_queues(worker) -> list[str]:
    """The queues this worker was told to consume (``-Q``), or the app's default ones."""
    queues = worker.app.amqp.queues
    return sorted(set(queues.consume_from or {}) or set(queues))


def one_queue_rule(queues: list[str], bulk_queue: str) -> str | None:
    """Why a worker given ``queues`` must not start (None if it may): one worker, one queue."""
    if len(queues) == 1:
        return None
    lanes = [q for q in queues if q != bulk_queue]
    commands = "; ".join(f"celery -A tasks worker -Q {q} -n {q}@%h" for q in queues)
    return (f"this worker was given {len(queues)} queues ({', '.join(queues)}); one worker serves one queue, "
            "so that a slow call of one lane never holds another and no lane ever runs two calls at once"
            + (f" (lanes here: {', '.join(lanes)})" if lanes else "")
            + f". Start one worker per queue: {commands} — or all of them at once with `celery multi` "
            "(see the README, \"Many lanes\")")


class GuardService:
    """Registers this worker's queue, shows its presence and, on a lane, holds the lane's guard."""

    def __init__(self, worker, settings):
        self.worker = worker
        self.s = settings
        self.keys = Keys(settings.key_prefix)
        self.client = client_for(settings)
        # One token for the life of this process: pool children inherit it through the
        # environment and write it as the owner of their in-flight records.
        self.token = uuid.uuid4().hex
        os.environ[WORKER_ID_ENV] = self.token
        self.presence = Lease(self.client, self.keys.presence(self.token), keys=self.keys)
        self.since_ms = int(time.time() * 1000)
        self.label = f"worker {getattr(worker, 'hostname', '?')}"
        #: the one queue this worker consumes, and whether it is a lane (guarded) or the bulk queue
        self.queue = settings.queue
        self.lane: str | None = None
        self.lease: Lease | None = None
        self.epoch: EpochWatch | None = None
        self._master_address: tuple | None = None
        self._stop = threading.Event()
        self._thread = None
        self._terminating = False
        self.held = False

    # -- start ---------------------------------------------------------------------
    def start(self) -> None:
        """Start, or refuse with one line that says why and what to do (non-zero exit)."""
        try:
            self._start()
        except OnelaneError as exc:
            # One clear line, not Celery's "Unrecoverable error" and a traceback: a SystemExit
            # raised in a bootstep's start() stops the worker with that status, quietly.
            log.critical("%s", exc)
            self._leave()
            raise SystemExit(EX_REFUSED) from None

    def _start(self) -> None:
        queues = consumed_queues(self.worker)
        problem = one_queue_rule(queues, self.s.bulk_queue)
        if problem:
            raise WorkerMisconfigured(f"onelane: {problem}")
        self.queue = queues[0]
        os.environ[WORKER_QUEUE_ENV] = self.queue  # the transport fetches this queue loss-proof
        if self.queue != self.s.bulk_queue:
            self.lane = self.queue
            self.lease = Lease(self.client, self.keys.guard_name(self.lane), keys=self.keys)
            self._check_one_at_a_time()
        self._connect()
        self.epoch = EpochWatch(self.client, self.keys, who=self.label)
        self._redis(self.epoch.check, "the worker's start")
        self._redis(lambda: register_queue(self.client, self.keys, self.queue,
                                           kind="lane" if self.lane else "bulk"), "the worker's start")
        # Every worker shows it is alive; the reaper requeues tasks of workers that are not.
        self._redis(lambda: self.presence.try_acquire(self.token, ttl_ms=self.s.guard_ttl_ms, label=self.label),
                    "the worker's start")
        if self.lane is None:
            self._start_heartbeat()
            log.info("onelane: worker %s… present on the bulk queue %r", self.token[:8], self.queue)
            return
        self._take_guard()
        self.held = True
        self._start_heartbeat()
        log.info("onelane: holding the guard of lane %r (token %s…, ttl %d ms, renewed every %d ms)",
                 self.lane, self.token[:8], self.s.guard_ttl_ms, self.s.renew_every_ms)
        report = self._redis(lambda: wait_and_requeue_orphans(
            self.client, self.keys, queue=self.lane, owner=self.token, since_ms=self.since_ms,
            margin_ms=self.s.guard_ttl_ms, should_stop=self._stopping,
        ), "the recovery of orphans before consuming")
        if report.requeued:
            log.warning("onelane: requeued %d orphaned callout(s) at the head of %r before consuming: %s",
                        len(report.requeued), self.lane, ", ".join(report.requeued))

    def _connect(self) -> None:
        """Wait (bounded) for Redis; refuse at once what waiting cannot cure."""
        url = redact_url(self.s.redis_url)
        try:
            self._wait_for_redis(timeout_s=self.s.startup_wait_s)
            problem = version_problem(str(self.client.info("server").get("redis_version", "")))
        except redis.AuthenticationError as exc:
            raise OnelaneError(f"onelane: Redis at {url} refused the password ({exc}); "
                               "check the password in REDIS_URL (redis://:password@host:6379/0)") from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            problem = sentinel_problem(self.s, exc)
            if problem:
                raise OnelaneError(f"onelane: {problem}") from None
            raise OnelaneError(f"onelane: cannot reach Redis at {url} ({exc}); {connect_hint(exc)}") from None
        except redis.RedisError as exc:
            if is_not_redis(exc):
                raise OnelaneError(f"onelane: {not_redis_message(self.s.redis_url, exc)}") from None
            raise
        if problem:
            raise OnelaneError(f"onelane: {problem}")
        eviction = eviction_problem(self.client.info("memory"))
        if eviction and not self.s.allow_eviction:
            raise OnelaneError(f"onelane: {eviction}")
        if eviction:
            log.warning("onelane: %s (starting anyway: ONELANE_ALLOW_EVICTION=1)", eviction)
        warning = exposure_warning(self.client, self.s.redis_url)
        if warning:
            log.warning("onelane: %s", warning)

    def _redis(self, fn, what: str):
        """Run a start-up step, waiting out a Redis that refuses for a while (or is away)."""
        return ride_out(fn, what=what, log=log, should_stop=self._stopping)

    def _take_guard(self) -> None:
        got = self._redis(self._take, "the worker's start")
        if isinstance(got, Grant):
            return
        if not self.s.standby:
            raise GuardHeld(
                f"onelane: {got.describe()} holds the guard of lane {self.lane!r}; this worker will not "
                f"consume it. Stop that worker, or start this one as a hot standby with ONELANE_STANDBY=1")
        log.warning("onelane: standby: %s holds the guard of %r; waiting to take over", got.describe(), self.lane)
        while not isinstance(got, Grant):
            self._announce_standby()
            if self._stopping():
                self._withdraw_standby()
                raise SystemExit(0)
            # blocks on the release signal, or until the holder's expiry is due
            try:
                got = self.lease.acquire(self.token, ttl_ms=self.s.guard_ttl_ms, wait_ms=1000, label=self.label,
                                         since_ms=self.since_ms, should_stop=self._stopping)
            except Exception:
                got = self._redis(self._take, "the standby")
        self._withdraw_standby()
        try:
            counters.count(self.client, self.keys, "guard_takeovers", self.lane)
        except redis.RedisError:  # a count, not a reason to stop taking over
            pass
        log.warning("onelane: standby took over the guard of %r", self.lane)

    def _wait_for_redis(self, *, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for an unreachable Redis, and as long as it takes for one that is
        loading its data (a restart with a large AOF answers LOADING until it is done)."""
        give_up = time.monotonic() + timeout_s
        said_loading = False
        while True:
            try:
                # a data command: PING and INFO answer even while Redis is still loading
                self.client.exists(self.keys.epoch)
                return
            except redis.AuthenticationError:
                raise
            except redis.BusyLoadingError:
                if self._stopping():
                    raise
                if not said_loading:
                    log.warning("onelane: Redis at %s is loading its data; waiting for it before consuming",
                                redact_url(self.s.redis_url))
                    said_loading = True
                time.sleep(0.5)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > give_up or self._stopping() or is_tls_verify_failure(exc):
                    raise
                if self.s.uses_sentinel and "is not known" in (sentinel_problem(self.s, exc) or ""):
                    raise  # the sentinels answer and do not know the master: waiting cannot help
                log.warning("onelane: waiting for Redis at %s (%s)", redact_url(self.s.redis_url),
                            str(exc).split(" : ")[0][:200])
                time.sleep(1.0)

    def _announce_standby(self) -> None:
        info = {"label": self.label, "host": socket.gethostname(), "pid": os.getpid(),
                "seen_ms": int(time.time() * 1000)}
        try:
            self.client.hset(self.keys.standbys(self.lane), self.token, json.dumps(info))
        except redis.RedisError:
            pass

    def _withdraw_standby(self) -> None:
        try:
            self.client.hdel(self.keys.standbys(self.lane), self.token)
        except redis.RedisError:
            pass

    def _take(self):
        got = self.lease.try_acquire(self.token, ttl_ms=self.s.guard_ttl_ms, label=self.label,
                                     since_ms=self.since_ms)
        if not isinstance(got, Grant) and got.is_local_and_dead():
            log.warning("onelane: the guard holder pid %s on this host is gone; taking its guard now", got.pid)
            got = self.lease.try_acquire(self.token, ttl_ms=self.s.guard_ttl_ms, label=self.label,
                                         since_ms=self.since_ms, steal=got.token)
        return got

    def _check_one_at_a_time(self) -> None:
        w = self.worker
        conc = getattr(w, "concurrency", 1)
        prefetch = getattr(w, "prefetch_multiplier", w.app.conf.worker_prefetch_multiplier)
        autoscale = getattr(w, "autoscale", None)
        problems = []
        if autoscale:
            problems.append(f"autoscale is {','.join(map(str, autoscale))} (--autoscale)")
        elif conc != 1:
            problems.append(f"concurrency is {conc} (-c/--concurrency)")
        if prefetch != 1:
            problems.append(f"prefetch multiplier is {prefetch} (--prefetch-multiplier)")
        if not w.app.conf.task_acks_late:
            problems.append("task_acks_late is off")
        if problems:
            raise WorkerMisconfigured(
                f"onelane: lane {self.lane!r} must be consumed one message at a time, but "
                + " and ".join(problems)
                + f". Start it as `celery -A tasks worker -Q {self.lane}` without those options; "
                "run other queues in another worker")

    def _stopping(self) -> bool:
        return self._stop.is_set() or bool(worker_state.should_stop) or bool(worker_state.should_terminate)

    # -- heartbeat -----------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="onelane-guard", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """The heartbeat: every 0.25 s due retries and prioritised messages to the queue; every third
        of the guard TTL the presence and guard renewed and Redis's epoch checked. A Redis that is
        away or refuses (out of memory, loading, busy, read-only) is waited out, never fatal."""
        every = self.s.renew_every_ms / 1000
        failing_since = None
        next_renew = time.monotonic() + every
        while not self._stop.wait(PROMOTE_EVERY_S):
            try:
                # relaxed-order retries that are due, and messages published with a priority,
                # go to the tail of the queue
                self._move_waiting_to_queue()
                self._follow_the_master()
                if time.monotonic() < next_renew and failing_since is None:
                    continue
                next_renew = time.monotonic() + every
                self.epoch.check()
                self._renew_presence()
                if self.lane is not None:
                    self.lease.renew(self.token, ttl_ms=self.s.guard_ttl_ms)
                if failing_since is not None:
                    log.warning("onelane: Redis answers again after %.1f s; guard of %r renewed",
                                time.monotonic() - failing_since, self.queue)
                failing_since = None
            except LeaseNotHeld:
                try:
                    got = self._take_back()
                except redis.RedisError:
                    continue  # Redis away again: the next beat tries once more
                if not isinstance(got, Grant):
                    log.critical("onelane: the guard of %r is now held by %s; stopping this worker so the "
                                 "lane keeps one consumer", self.lane, got.describe())
                    self.held = False
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            except redis.RedisError as exc:
                reason = transient_reason(exc) or f"unexpected Redis error {type(exc).__name__}: {exc}"
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("onelane: cannot renew the guard of %r: %s; retrying", self.queue, reason)

    def _move_waiting_to_queue(self) -> None:
        """Due relaxed retries and prioritised messages to the queue. Usually there are none: one look
        (three plain commands, one round trip) says so, and the scripts that move them run only when
        there is something to move (a second round trip) — a lane idles at 3 commands a tick, not 13."""
        waiting = pending_moves(self.client, self.keys, self.queue)
        if not (waiting.due or waiting.prioritised):
            return
        pipe = self.client.pipeline(transaction=False)
        if waiting.due:
            promote_due(self.client, self.keys, self.queue, pipe=pipe)
        if waiting.prioritised:
            absorb_priorities(self.client, self.keys, self.queue, pipe=pipe)
        try:
            pipe.execute()
        except redis.exceptions.NoScriptError:
            forget(self.client)

    def _follow_the_master(self) -> None:
        """Behind Sentinel: when the sentinels name a new master (a failover), reconnect this
        process's client at once, rather than writing to the old master until that one is turned
        into a replica (seconds later)."""
        if not self.s.uses_sentinel:
            return
        try:
            address, _settled = sentinel_master_view(self.s)
        except redis.RedisError:
            return
        if self._master_address is None:
            self._master_address = address
            return
        if address == self._master_address:
            return
        log.warning("onelane: the sentinels name a new master, %s:%s (a failover); reconnecting to it", *address)
        self._master_address = address
        # idle connections only: another thread may be in the middle of a command on one
        self.client.connection_pool.disconnect(inuse_connections=False)  # (the consumer's fetch: transport.py)

    def _renew_presence(self) -> None:
        try:
            self.presence.renew(self.token, ttl_ms=self.s.guard_ttl_ms)
        except LeaseNotHeld:  # expired while Redis was away: show ourselves again
            self.presence.try_acquire(self.token, ttl_ms=self.s.guard_ttl_ms, label=self.label)
        if self.lane is None or self.held:  # a consuming worker: its fetch list back in the index, if dropped
            register_fetch_list(self.client, self.keys, queue=self.queue, token=self.token)

    def _take_back(self):
        got = self.lease.try_acquire(self.token, ttl_ms=self.s.guard_ttl_ms, label=self.label,
                                     since_ms=self.since_ms)
        if isinstance(got, Grant):
            log.warning("onelane: the guard of %r had expired (Redis unreachable or restarted); took it back",
                        self.lane)
        return got

    # -- stop ----------------------------------------------------------------------
    def stop(self) -> None:
        """Warm shutdown: keep the guard, renewed, until the pool has finished and acknowledged
        the callout in flight; release it then (Celery's worker_shutdown signal, sent after the
        pool has stopped). A standby never takes over a lane whose last message is still open."""
        if self.held and not self._terminating:
            busy = [r.id for r in list(worker_state.active_requests)]
            if busy:
                log.warning("onelane: warm shutdown: keeping the guard of %r until %s is finished and "
                            "acknowledged", self.lane, ", ".join(busy))
            signals.worker_shutdown.connect(self._after_pool_stopped, weak=False)
            return
        self._finish()

    def terminate(self) -> None:
        """Cold shutdown: release at once (a killed attempt's lease still runs to its deadline)."""
        self._terminating = True
        self._finish()

    def _after_pool_stopped(self, sender=None, **_) -> None:
        signals.worker_shutdown.disconnect(self._after_pool_stopped)
        self._finish()

    def _finish(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._leave()

    def _leave(self) -> None:
        """Withdraw presence and release the guard if held (Redis away: both expire by themselves)."""
        try:
            self.presence.release(self.token)
        except Exception:
            pass
        if self.held:
            try:
                self.lease.release(self.token)
                log.info("onelane: released the guard of %r", self.lane)
            except Exception as exc:
                log.warning("onelane: could not release the guard of %r (%s); it expires within %d ms",
                            self.lane, exc, self.s.guard_ttl_ms)
            self.held = False


def _note_received(sender=None, request=None, **_):
    """Record which worker received a message of the bulk queue, many consumers (for the reaper)."""
    s = get_settings()
    info = getattr(request, "delivery_info", None) or {}
    if info.get("routing_key") != s.bulk_queue:
        return
    token = os.environ.get(WORKER_ID_ENV)
    message = getattr(request, "message", None)
    tag = getattr(message, "delivery_tag", None)
    if message is not None and receipt_recorded(message):  # the take wrote it, or the fetch list says it
        return
    if token and tag:
        try:
            client_for(s).hset(Keys(s.key_prefix).reserved(s.bulk_queue), tag, token)
        except redis.RedisError as exc:  # the task writes it again as it starts
            log.warning("onelane: could not record the receipt of %s (%s)", tag, exc)


signals.task_received.connect(_note_received, weak=False)


class WorkerGuard(bootsteps.StartStopStep):
    """Bootstep: register the worker's queue, show its presence and, on a lane, take its guard first."""

    label = "onelane guard"
    # The Consumer step is the worker blueprint's last, so this starts before any message is fetched.
    requires = ("celery.worker.components:Pool",)

    def include_if(self, worker) -> bool:
        return True

    def create(self, worker):
        return GuardService(worker, get_settings())
