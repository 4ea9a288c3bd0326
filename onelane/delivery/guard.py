"""The worker guard: one consumer per serial queue, as a Celery worker bootstep.

On start the worker takes the queue's guard lease (``guard:<queue>``) and renews it
from a heartbeat thread while it lives; a clean shutdown releases it. Guarantees:

* a second worker on the same queue, while a live one holds the guard, refuses to
  start (non-zero exit) with a message naming the holder, or, with
  ONELANE_STANDBY=1, waits without consuming and takes over within one guard TTL
  after the holder dies;
* a holder on this host whose pid is gone is provably dead: its guard is taken at once;
* before consuming, the new holder puts the orphans of earlier holders back at the
  head of the queue (after their attempt deadlines), so order holds;
* a worker that finds its guard taken by another stops itself (warm shutdown);
* a worker configured to run more than one serial message at a time refuses to start.

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
    exposure_warning,
    is_tls_verify_failure,
    redact_url,
    version_problem,
)
from onelane.core.errors import GuardHeld, LeaseNotHeld, OnelaneError, WorkerMisconfigured
from onelane.core.keys import Keys
from onelane.core.settings import WORKER_ID_ENV, get_settings
from onelane.delivery.flow import promote_due
from onelane.delivery.recovery import wait_and_requeue_orphans

log = logging.getLogger(__name__)

#: how often the heartbeat thread moves due relaxed retries back to the queue
PROMOTE_EVERY_S = 0.25


def consumed_queues(worker) -> set[str]:
    queues = worker.app.amqp.queues
    names = set(queues.consume_from or {}) or set(queues)
    return names


class GuardService:
    """Holds one queue's guard lease for the life of a worker process."""

    def __init__(self, worker, settings):
        self.worker = worker
        self.s = settings
        self.keys = Keys(settings.key_prefix)
        self.client = client_for(settings)
        self.lease = Lease(self.client, self.keys.guard_name(settings.queue), keys=self.keys)
        self.serial = True
        # One token for the life of this process: pool children inherit it through the
        # environment and write it as the owner of their in-flight records.
        self.token = uuid.uuid4().hex
        os.environ[WORKER_ID_ENV] = self.token
        self.presence = Lease(self.client, self.keys.presence(self.token), keys=self.keys)
        self.since_ms = int(time.time() * 1000)
        self.label = f"worker {getattr(worker, 'hostname', '?')}"
        self._stop = threading.Event()
        self._thread = None
        self.held = False

    # -- start ---------------------------------------------------------------------
    def start(self) -> None:
        queues = consumed_queues(self.worker)
        self.serial = self.s.queue in queues
        if len(queues) > 1:
            log.warning("onelane: this worker consumes %s; a worker of several queues fetches with kombu's own "
                        "BRPOP, which can lose a message if the worker is killed mid-fetch. Run one worker per "
                        "queue (-Q %s, -Q %s)", ", ".join(sorted(queues)), self.s.queue, self.s.bulk_queue)
        if self.serial:
            self._check_configuration()
        try:
            self._wait_for_redis(timeout_s=30.0)
        except redis.AuthenticationError as exc:
            raise OnelaneError(
                f"onelane: Redis at {redact_url(self.s.redis_url)} refused the password ({exc}); "
                "check the password in REDIS_URL (redis://:password@host:6379/0)") from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise OnelaneError(
                f"onelane: cannot reach Redis at {redact_url(self.s.redis_url)} ({exc}); {connect_hint(exc)}"
            ) from None
        problem = version_problem(str(self.client.info("server").get("redis_version", "")))
        if problem:
            raise OnelaneError(f"onelane: {problem}")
        warning = exposure_warning(self.client, self.s.redis_url)
        if warning:
            log.warning("onelane: %s", warning)
        # Every worker shows it is alive; the reaper requeues tasks of workers that are not.
        self.presence.try_acquire(self.token, ttl_ms=self.s.guard_ttl_ms, label=self.label)
        if not self.serial:
            self._start_heartbeat()
            log.info("onelane: worker %s… present (no guard: it does not consume %r)", self.token[:8],
                     self.s.queue)
            return
        got = self._take()
        if not isinstance(got, Grant):
            holder = got
            if not self.s.standby:
                raise GuardHeld(
                    f"onelane: {holder.describe()} holds the guard of queue {self.s.queue!r}; this worker "
                    f"will not consume it. Stop that worker, or start this one as a hot standby with "
                    f"ONELANE_STANDBY=1"
                )
            log.warning("onelane: standby: %s holds the guard of %r; waiting to take over",
                        holder.describe(), self.s.queue)
            while not isinstance(got, Grant):
                self._announce_standby()
                if self._stopping():
                    self._withdraw_standby()
                    raise SystemExit(0)
                # blocks on the release signal, or until the holder's expiry is due
                try:
                    got = self.lease.acquire(self.token, ttl_ms=self.s.guard_ttl_ms, wait_ms=1000,
                                             label=self.label, since_ms=self.since_ms,
                                             should_stop=self._stopping)
                except Exception:
                    got = self._take()
            self._withdraw_standby()
            log.warning("onelane: standby took over the guard of %r", self.s.queue)
        self.held = True
        self._start_heartbeat()
        log.info("onelane: holding the guard of %r (token %s…, ttl %d ms, renewed every %d ms)",
                 self.s.queue, self.token[:8], self.s.guard_ttl_ms, self.s.renew_every_ms)
        report = wait_and_requeue_orphans(
            self.client, self.keys, queue=self.s.queue, owner=self.token, since_ms=self.since_ms,
            margin_ms=self.s.guard_ttl_ms, should_stop=self._stopping,
        )
        if report.requeued:
            log.warning("onelane: requeued %d orphaned callout(s) at the head of %r before consuming: %s",
                        len(report.requeued), self.s.queue, ", ".join(report.requeued))

    def _wait_for_redis(self, *, timeout_s: float) -> None:
        give_up = time.monotonic() + timeout_s
        while True:
            try:
                self.client.ping()
                return
            except redis.AuthenticationError:
                raise
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > give_up or self._stopping() or is_tls_verify_failure(exc):
                    raise
                log.warning("onelane: waiting for Redis at %s (%s)", redact_url(self.s.redis_url), exc)
                time.sleep(1.0)

    def _announce_standby(self) -> None:
        info = {"label": self.label, "host": socket.gethostname(), "pid": os.getpid(),
                "seen_ms": int(time.time() * 1000)}
        try:
            self.client.hset(self.keys.standbys(self.s.queue), self.token, json.dumps(info))
        except redis.RedisError:
            pass

    def _withdraw_standby(self) -> None:
        try:
            self.client.hdel(self.keys.standbys(self.s.queue), self.token)
        except redis.RedisError:
            pass

    def _take(self):
        got = self.lease.try_acquire(self.token, ttl_ms=self.s.guard_ttl_ms, label=self.label,
                                     since_ms=self.since_ms)
        if not isinstance(got, Grant) and got.is_local_and_dead():
            log.warning("onelane: the guard holder pid %s on this host is gone; taking its guard now",
                        got.pid)
            got = self.lease.try_acquire(self.token, ttl_ms=self.s.guard_ttl_ms, label=self.label,
                                         since_ms=self.since_ms, steal=got.token)
        return got

    def _check_configuration(self) -> None:
        conc = getattr(self.worker, "concurrency", 1)
        prefetch = getattr(self.worker, "prefetch_multiplier", self.worker.app.conf.worker_prefetch_multiplier)
        problems = []
        if conc != 1:
            problems.append(f"concurrency is {conc} (-c/--concurrency)")
        if prefetch != 1:
            problems.append(f"prefetch multiplier is {prefetch} (--prefetch-multiplier)")
        if not self.worker.app.conf.task_acks_late:
            problems.append("task_acks_late is off")
        if problems:
            raise WorkerMisconfigured(
                f"onelane: queue {self.s.queue!r} must be consumed one message at a time, but "
                + " and ".join(problems)
                + f". Start it as `celery -A tasks worker -Q {self.s.queue}` without those options; "
                "run other queues in another worker"
            )

    def _stopping(self) -> bool:
        return self._stop.is_set() or bool(worker_state.should_stop) or bool(worker_state.should_terminate)

    # -- heartbeat -----------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="onelane-guard", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        every = self.s.renew_every_ms / 1000
        failing_since = None
        next_renew = time.monotonic() + every
        while not self._stop.wait(PROMOTE_EVERY_S):
            try:
                # relaxed-order retries that are due go back to the tail of the queue
                promote_due(self.client, self.keys, self.s.queue)
                if time.monotonic() < next_renew:
                    continue
                next_renew = time.monotonic() + every
                self._renew_presence()
                if not self.serial:
                    continue
                self.lease.renew(self.token, ttl_ms=self.s.guard_ttl_ms)
                if failing_since is not None:
                    log.warning("onelane: Redis is back; guard of %r renewed", self.s.queue)
                failing_since = None
            except LeaseNotHeld:
                got = self._take_back()
                if not isinstance(got, Grant):
                    log.critical("onelane: the guard of %r is now held by %s; stopping this worker so the "
                                 "queue keeps one consumer", self.s.queue, got.describe())
                    self.held = False
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("onelane: cannot renew the guard of %r (%s); retrying", self.s.queue, exc)

    def _renew_presence(self) -> None:
        try:
            self.presence.renew(self.token, ttl_ms=self.s.guard_ttl_ms)
        except LeaseNotHeld:  # expired while Redis was away: show ourselves again
            self.presence.try_acquire(self.token, ttl_ms=self.s.guard_ttl_ms, label=self.label)

    def _take_back(self):
        got = self.lease.try_acquire(self.token, ttl_ms=self.s.guard_ttl_ms, label=self.label,
                                     since_ms=self.since_ms)
        if isinstance(got, Grant):
            log.warning("onelane: the guard of %r had expired (Redis unreachable or restarted); "
                        "took it back", self.s.queue)
        return got

    # -- stop ----------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            self.presence.release(self.token)
        except Exception:  # Redis gone: it expires by itself
            pass
        if self.held:
            try:
                self.lease.release(self.token)
                log.info("onelane: released the guard of %r", self.s.queue)
            except Exception as exc:  # Redis gone: the guard expires by itself within its TTL
                log.warning("onelane: could not release the guard of %r (%s); it expires within %d ms",
                            self.s.queue, exc, self.s.guard_ttl_ms)
            self.held = False

    terminate = stop


def _note_received(sender=None, request=None, **_):
    """Record which worker received a message of a many-consumer queue (for the reaper)."""
    s = get_settings()
    info = getattr(request, "delivery_info", None) or {}
    if info.get("routing_key") != s.bulk_queue:
        return
    token = os.environ.get(WORKER_ID_ENV)
    tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    if token and tag:
        try:
            client_for(s).hset(Keys(s.key_prefix).reserved(s.bulk_queue), tag, token)
        except redis.RedisError as exc:  # the task writes it again as it starts
            log.warning("onelane: could not record the receipt of %s (%s)", tag, exc)


signals.task_received.connect(_note_received, weak=False)


class WorkerGuard(bootsteps.StartStopStep):
    """Bootstep: show this worker's presence and, for the serial queue, take its guard first."""

    label = "onelane guard"
    # The Consumer step is the worker blueprint's last, so this starts before any message is fetched.
    requires = ("celery.worker.components:Pool",)

    def include_if(self, worker) -> bool:
        return True  # every worker shows its presence; only serial consumers take the guard

    def create(self, worker):
        return GuardService(worker, get_settings())
