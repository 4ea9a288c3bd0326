"""Finding orphaned callouts and putting them back at the head of their queue.

Used by the reaper (in beat) and by a worker that has just taken a queue's guard.

An orphan is either
* a message in the fetch list of a worker that is gone (taken off the queue, never
  recorded as unacked; see :mod:`onelane.delivery.transport`): one never started, or a
  callout that ran from there whose attempt's deadline has passed, or
* an in-flight record whose owner no longer holds the queue's guard and whose
  attempt deadline has passed (the API can no longer be working on it), or
* a message kombu holds as unacked for this queue, with no in-flight record (so
  no HTTP attempt started), delivered before the current guard holder started
  (or with no holder at all), i.e. to a consumer that is gone.

Each is moved atomically (:func:`onelane.delivery.inflight.requeue_at_head`, or for a fetch
list ``lua/fetch_reap.lua``), so two reapers running at once move it once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from onelane.coordination.lease import Lease
from onelane.core.clock import redis_now_ms
from onelane.core.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, Keys
from onelane.core.scripts import LuaScript
from onelane.core.text import text, text_map
from onelane.delivery.fetching import return_fetched
from onelane.delivery.inflight import MOVED, NOT_HELD, Inflight, requeue_at_head
from onelane.delivery.messages import parse_unacked, task_id_of

_HDEL_IF = LuaScript(__package__, "hdel_if")

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    requeued: list[str] = field(default_factory=list)
    dropped_records: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)

    def add(self, other: "RecoveryReport") -> None:
        """Fold another pass's findings into this report."""
        self.requeued += other.requeued
        self.dropped_records += other.dropped_records
        self.waiting += other.waiting


def guard_lease(client, keys: Keys, queue: str) -> Lease:
    return Lease(client, keys.guard_name(queue), keys=keys)


def presence_alive(client, keys: Keys):
    """A check: does the worker with this token still renew its presence lease?"""
    def alive(token: str) -> bool:
        return bool(client.exists(keys.lease(keys.presence(token))))
    return alive


def requeue_orphans(client, keys: Keys, *, queue: str, margin_ms: int, live_owner: str | None = None,
                    live_since_ms: int | None = None, now_ms: int | None = None,
                    unacked_before_ms: float | None = None) -> RecoveryReport:
    """Requeue every orphan of ``queue`` that is due now; report what was done.

    ``live_owner``/``live_since_ms`` describe the current guard holder; when not
    given they are read from the guard lease. ``margin_ms`` covers clock skew
    between hosts for the unacked rule (use the guard TTL). ``unacked_before_ms``
    (local clock) overrides the unacked cut-off: a worker that holds the guard but
    has not consumed yet knows every unacked message of its queue is an orphan.
    """
    report = RecoveryReport()
    if live_owner is None:
        holder = guard_lease(client, keys, queue).holder()
        live_owner = holder.token if holder else ""
        live_since_ms = holder.since_ms if holder else None
    now_ms = redis_now_ms(client) if now_ms is None else now_ms
    inflight = Inflight(client, keys)

    # Messages a worker took off the queue but never recorded as unacked: only the guard
    # holder consumes this queue, so any other worker's fetch list is an orphan.
    alive = (lambda token: token == live_owner) if live_owner else presence_alive(client, keys)
    _return_fetched(client, keys, report, alive, queue=queue)

    for task_id in inflight.task_ids(queue):
        rec = inflight.get(task_id)
        if rec is None:
            inflight.forget(task_id, queue)
            continue
        if live_owner and rec.owner == live_owner:
            continue  # a live worker's own attempt (its parent requeues a dead child's)
        if rec.deadline_ms > now_ms:
            if task_id not in report.waiting:  # (its message may be in its fetch list: counted there)
                report.waiting.append(task_id)
            continue
        res = requeue_at_head(client, keys, queue=queue, delivery_tag=rec.delivery_tag, task_id=task_id,
                              expect_owner=rec.owner)
        _note(report, res, task_id, "in-flight attempt of a dead worker")

    # Messages kombu holds as unacked but whose attempt never started.
    if unacked_before_ms is not None:
        cutoff_s = unacked_before_ms / 1000
    else:
        cutoff_s = ((live_since_ms if live_owner and live_since_ms else time.time() * 1000) - margin_ms) / 1000
    _requeue_unclaimed(client, keys, report, queue=queue, cutoff_s=cutoff_s,
                       why="reserved by a dead worker before it started")
    return report


def _return_fetched(client, keys: Keys, report: RecoveryReport, owner_alive, *, queue: str) -> None:
    """The fetch lists of workers that are gone, back to the head of the queue, but for callouts whose
    attempt may still be at the API (their deadline ahead): those wait."""
    moved, waiting = return_fetched(client, keys, owner_alive, queue=queue)
    for task_id in moved:
        _note(report, MOVED, task_id, "fetched by a worker that is gone")
    report.waiting += waiting


def _requeue_unclaimed(client, keys: Keys, report: RecoveryReport, *, queue: str, cutoff_s: float,
                       why: str) -> None:
    """Requeue ``queue``'s messages kombu has held unacked since before ``cutoff_s`` (local
    clock, seconds) that nobody claims: no in-flight record, no receiver record."""
    for tag in client.zrangebyscore(KOMBU_UNACKED_INDEX, "-inf", cutoff_s):
        tag = text(tag)
        entry = parse_unacked(client.hget(KOMBU_UNACKED, tag))
        if entry is None:
            continue
        message, _exchange, routing_key = entry
        task_id = task_id_of(message)
        if task_id is None or routing_key != queue:
            continue
        res = requeue_at_head(client, keys, queue=queue, delivery_tag=tag, task_id=task_id, unclaimed=True)
        _note(report, res, task_id, why)


def _note(report: RecoveryReport, res: int, task_id: str, why: str) -> None:
    if res == MOVED:
        report.requeued.append(task_id)
        log.warning("onelane: requeued orphan %s at the head (%s)", task_id, why)
    elif res == NOT_HELD:
        report.dropped_records.append(task_id)
        log.info("onelane: dropped the stale in-flight record of %s (its message is not unacked)", task_id)


def wait_and_requeue_orphans(client, keys: Keys, *, queue: str, owner: str, since_ms: int, margin_ms: int,
                             should_stop=None, max_wait_s: float = 4000.0) -> RecoveryReport:
    """Requeue orphans of earlier holders, waiting for their deadlines, before consuming.

    A worker that has just taken the guard calls this so the orphan runs before
    anything queued after it (order holds), and never before its deadline.
    """
    total = RecoveryReport()
    give_up = time.monotonic() + max_wait_s
    while True:
        rep = requeue_orphans(client, keys, queue=queue, margin_ms=margin_ms, live_owner=owner,
                              live_since_ms=since_ms, unacked_before_ms=time.time() * 1000)
        total.add(rep)
        if not rep.waiting or time.monotonic() > give_up or (should_stop and should_stop()):
            total.waiting = rep.waiting
            return total
        soonest = min(
            (r.deadline_ms for r in map(Inflight(client, keys).get, rep.waiting) if r is not None),
            default=None,
        )
        delay_s = 0.05 if soonest is None else max(0.05, (soonest - redis_now_ms(client)) / 1000 + 0.01)
        log.warning("onelane: waiting %.1f s for the deadline of %d orphaned attempt(s) before consuming %r",
                    delay_s, len(rep.waiting), queue)
        time.sleep(min(delay_s, 1.0))


def requeue_reserved_orphans(client, keys: Keys, *, queue: str, owner_alive, margin_ms: int,
                             now_ms: int | None = None) -> RecoveryReport:
    """For a queue with many consumers: requeue messages received by workers that are gone.

    A message the fast take delivered stays in its worker's fetch list while its callout
    runs; any other, recorded as unacked, has its receiver recorded (``Keys.reserved``),
    by the take and again when the task starts. Either, when its worker no longer renews its
    presence, goes back to the head of the queue — at once if its attempt never started,
    after the attempt's deadline otherwise. A message kombu marked unacked more than ``margin_ms``
    ago that nobody has claimed (its receiver died between kombu's bookkeeping and its
    own record) goes back too.
    """
    report = RecoveryReport()
    now_ms = redis_now_ms(client) if now_ms is None else now_ms
    inflight = Inflight(client, keys)
    def forget(tag: str, owner: str) -> None:
        _HDEL_IF(client, keys=[keys.reserved(queue)], args=[tag, owner])

    _return_fetched(client, keys, report, owner_alive, queue=queue)
    for tag, owner in text_map(client.hgetall(keys.reserved(queue))).items():
        raw = client.hget(KOMBU_UNACKED, tag)
        if raw is None:  # acked, or moved back to the queue already
            forget(tag, owner)
            continue
        if owner_alive(owner):
            continue
        entry = parse_unacked(raw)
        task_id = task_id_of(entry[0]) if entry else None
        if task_id is None:
            continue
        rec = inflight.get(task_id)
        if rec is not None and rec.deadline_ms > now_ms:
            report.waiting.append(task_id)
            continue
        res = requeue_at_head(client, keys, queue=queue, delivery_tag=tag, task_id=task_id,
                              expect_owner=rec.owner if rec is not None else "")
        if res in (MOVED, NOT_HELD):
            forget(tag, owner)
        _note(report, res, task_id, "received by a worker that is gone")
    _requeue_unclaimed(client, keys, report, queue=queue, cutoff_s=time.time() - margin_ms / 1000,
                       why="received by a worker that died before recording it")
    return report
