"""A beat scheduler that runs onelane's own entries inside the beat process.

A reaper sent as a task would wait behind the callout it is meant to rescue (the
serial worker runs one message at a time), so entries named ``onelane.*`` run
here, in beat, and never touch a queue. Other entries are sent as usual. State is
kept in memory (no schedule file), so two beats can run side by side.
"""
from __future__ import annotations

import logging

from celery.beat import Scheduler

from onelane.core.clients import client_for, eviction_problem, transient_reason
from onelane.core.keys import Keys
from onelane.core.settings import get_settings
from onelane.delivery.epoch import EpochWatch
from onelane.delivery.reaper import reap_everything

#: beat entries with this name run inside the beat process itself (never queued behind a callout)
REAPER_ENTRY = "onelane.reap"

log = logging.getLogger(__name__)


_epoch: EpochWatch | None = None


def run_reaper():
    """One reaper pass over every lane and bulk queue; also notices when Redis lost its data."""
    global _epoch
    s = get_settings()
    client, keys = client_for(s), Keys(s.key_prefix)
    if _epoch is None:
        _epoch = EpochWatch(client, keys, who="beat")
    _epoch.check()
    report = reap_everything(client, keys, s)
    if report:
        log.warning("onelane: reaper: %s", report.summary())
    return report


LOCAL_ENTRIES = {REAPER_ENTRY: run_reaper}


class OnelaneScheduler(Scheduler):
    _failing = False

    def setup_schedule(self):
        """Refuse to start on a Redis that may evict leases (unless ONELANE_ALLOW_EVICTION=1)."""
        s = get_settings()
        try:
            problem = eviction_problem(client_for(s).info("memory"))
        except Exception as exc:  # Redis away: the reaper's first pass says so, and beat waits it out
            log.warning("onelane: could not read Redis's eviction policy yet (%s)", exc)
            problem = None
        if problem and not s.allow_eviction:
            log.critical("onelane: %s", problem)
            raise SystemExit(1)
        if problem:
            log.warning("onelane: %s (starting anyway: ONELANE_ALLOW_EVICTION=1)", problem)
        return super().setup_schedule()

    def apply_entry(self, entry, producer=None):
        local = LOCAL_ENTRIES.get(entry.task)
        if local is None:
            return super().apply_entry(entry, producer=producer)
        try:
            local()
            if self._failing:
                log.warning("onelane: %s works again", entry.task)
            self._failing = False
        except Exception as exc:  # Redis away or refusing: log once per spell, try again next tick
            if not self._failing:
                log.error("onelane: %s failed: %s; trying again every tick", entry.task,
                          transient_reason(exc) or exc)
            self._failing = True
