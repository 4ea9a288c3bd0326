"""The reaper: clears zombie leases and requeues orphaned callouts at the head of their queue.

Safe to run twice at once (two beats, or beat and ``onelane reap``): every change
is a compare-and-set script. It reads only Redis and never waits behind a callout.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from onelane.coordination.lease import Lease
from onelane.core.clock import redis_now_ms
from onelane.core.keys import Keys
from onelane.core.text import text
from onelane.delivery.flow import promote_due
from onelane.delivery.recovery import RecoveryReport, presence_alive, requeue_orphans, requeue_reserved_orphans

log = logging.getLogger(__name__)


@dataclass
class ReapReport(RecoveryReport):
    zombie_leases: list[str] = field(default_factory=list)
    promoted: int = 0

    def __bool__(self) -> bool:
        return bool(self.zombie_leases or self.requeued or self.dropped_records or self.promoted)

    def summary(self) -> str:
        return (f"{len(self.zombie_leases)} zombie lease(s) cleared, {len(self.requeued)} orphan(s) requeued "
                f"at the head, {len(self.dropped_records)} stale record(s) dropped, "
                f"{len(self.waiting)} orphan(s) waiting for their deadline, "
                f"{self.promoted} delayed retr{'y' if self.promoted == 1 else 'ies'} moved to the queue")


def reap(client, keys: Keys, *, queue: str, margin_ms: int, now_ms: int | None = None,
         bulk_queue: str | None = None) -> ReapReport:
    """One reaper pass over the leases and the queue's orphans."""
    now_ms = redis_now_ms(client) if now_ms is None else now_ms
    report = ReapReport()
    for name in client.zrangebyscore(keys.lease_index, "-inf", now_ms):
        name = text(name)
        if Lease(client, name, keys=keys).reap(now_ms=now_ms):
            report.zombie_leases.append(name)
            log.warning("onelane: reaper cleared zombie lease %r (deadline passed, never released)", name)
    rec = requeue_orphans(client, keys, queue=queue, margin_ms=margin_ms, now_ms=now_ms)
    report.add(rec)
    report.promoted = promote_due(client, keys, queue)
    if bulk_queue:
        # many consumers: an orphan is a record whose worker no longer renews its presence
        bulk = requeue_reserved_orphans(client, keys, queue=bulk_queue, now_ms=now_ms, margin_ms=margin_ms,
                                        owner_alive=presence_alive(client, keys))
        report.add(bulk)
        report.promoted += promote_due(client, keys, bulk_queue)
    return report
