"""The reaper: clears zombie leases and requeues orphaned callouts at the head of their queue.

It covers every lane and bulk queue a worker has registered (and the default lane), with
nothing to configure. Safe to run twice at once (two beats, or beat and ``onelane reap``):
every change is a compare-and-set script. It reads only Redis and never waits behind a callout.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from onelane.coordination.lease import Lease
from onelane.core import counters, recent
from onelane.core.clock import redis_now_ms
from onelane.core.keys import KOMBU_UNACKED, Keys
from onelane.core.text import text
from onelane.delivery import coalescing, registry
from onelane.delivery.flow import absorb_priorities, promote_due
from onelane.delivery.recovery import RecoveryReport, presence_alive, requeue_orphans, requeue_reserved_orphans

log = logging.getLogger(__name__)


@dataclass
class ReapReport(RecoveryReport):
    zombie_leases: list[str] = field(default_factory=list)
    promoted: int = 0
    freed_keys: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.zombie_leases or self.requeued or self.dropped_records or self.promoted or self.freed_keys)

    def summary(self) -> str:
        return (f"{len(self.zombie_leases)} zombie lease(s) cleared, {len(self.requeued)} orphan(s) requeued "
                f"at the head, {len(self.dropped_records)} stale record(s) dropped, "
                f"{len(self.waiting)} orphan(s) waiting for their deadline, "
                f"{self.promoted} delayed or prioritised message(s) moved to their queue"
                + (f", {len(self.freed_keys)} stale coalesce key(s) freed" if self.freed_keys else ""))


def reap(client, keys: Keys, *, lanes: list[str], bulk_queues: list[str], margin_ms: int,
         now_ms: int | None = None) -> ReapReport:
    """One reaper pass: zombie leases, then each lane's orphans, then each bulk queue's."""
    now_ms = redis_now_ms(client) if now_ms is None else now_ms
    report = ReapReport(queues=[*lanes, *bulk_queues])
    for name in client.zrangebyscore(keys.lease_index, "-inf", now_ms):
        name = text(name)
        if Lease(client, name, keys=keys).reap(now_ms=now_ms):
            report.zombie_leases.append(name)
            log.warning("onelane: reaper cleared zombie lease %r (deadline passed, never released)", name)
    for lane in lanes:
        _add_counted(client, keys, report, lane,
                     requeue_orphans(client, keys, queue=lane, margin_ms=margin_ms, now_ms=now_ms))
        report.promoted += promote_due(client, keys, lane) + absorb_priorities(client, keys, lane)
    for queue in [*lanes, *bulk_queues]:
        _trim_stats(client, keys, queue, now_ms=now_ms)
    alive = presence_alive(client, keys)
    for bulk in bulk_queues:
        # many consumers: an orphan is a record whose worker no longer renews its presence
        _add_counted(client, keys, report, bulk,
                     requeue_reserved_orphans(client, keys, queue=bulk, now_ms=now_ms, margin_ms=margin_ms,
                                              owner_alive=alive))
        report.promoted += promote_due(client, keys, bulk) + absorb_priorities(client, keys, bulk)
    return report


def _add_counted(client, keys: Keys, report: ReapReport, queue: str, found: RecoveryReport) -> None:
    """Fold one queue's findings into the report, and count its requeued orphans (for the exporter)."""
    report.add(found)
    if found.requeued:
        counters.count(client, keys, "orphans_requeued", queue, by=len(found.requeued))


def reap_everything(client, keys: Keys, settings, *, only: str | None = None) -> ReapReport:
    """One pass over every lane and bulk queue (or ``only`` that one), with the settings' margins."""
    lanes = registry.lanes(client, keys, default_lane=settings.queue, bulk_queue=settings.bulk_queue)
    bulks = registry.bulk_queues(client, keys, bulk_queue=settings.bulk_queue)
    if only is not None:
        is_bulk = only == settings.bulk_queue or only in bulks
        lanes, bulks = ([], [only]) if is_bulk else ([only], [])
    report = reap(client, keys, lanes=lanes, bulk_queues=bulks, margin_ms=settings.guard_ttl_ms)
    for queue in [*lanes, *bulks]:
        report.freed_keys += _free_stale_keys(client, keys, settings, queue)
    return report


def _free_stale_keys(client, keys: Keys, settings, queue: str) -> list[str]:
    """Coalesce keys held by a callout taken longer ago than any callout may stay unacknowledged,
    and held nowhere now (purged, or lost): freed, so the callouts parked behind them go on. A
    paused queue is left alone (its callouts wait at the head, legitimately, as long as it takes)."""
    if client.exists(keys.paused(queue)):
        return []

    def is_held(task_id: str, tag: str) -> bool:
        return bool((tag and client.hexists(KOMBU_UNACKED, tag))
                    or client.zscore(keys.inflight_index(queue), task_id) is not None)

    freed = coalescing.release_stale(client, keys, queue=queue, stale_after_ms=settings.longest_unacked_s() * 1000,
                                     now_ms=redis_now_ms(client), window_s=settings.dedupe_window_s,
                                     result_expires_s=settings.result_expires_s, is_held=is_held)
    for key in freed:
        log.warning("onelane: reaper freed coalesce key %r of %r: its callout was taken long ago and is held "
                    "nowhere (purged or lost); the ids it carried end FAILURE", key, queue)
    return freed


def _trim_stats(client, keys: Keys, queue: str, *, now_ms: int) -> None:
    """Drop the recent-outcome counts older than an hour (here, not on every callout), and the sorted
    sets an older onelane kept instead."""
    old = recent.stale(client.hkeys(keys.stats(queue)), now_ms=now_ms)
    pipe = client.pipeline(transaction=False)
    if old:
        pipe.hdel(keys.stats(queue), *old)
    pipe.delete(*(keys.legacy_stats(queue, o) for o in recent.OUTCOMES))
    pipe.execute()
