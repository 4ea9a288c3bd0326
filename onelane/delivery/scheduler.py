"""A beat scheduler that runs onelane's own entries inside the beat process.

A reaper sent as a task would wait behind the callout it is meant to rescue (the
serial worker runs one message at a time), so entries named ``onelane.*`` run
here, in beat, and never touch a queue. Other entries are sent as usual. State is
kept in memory (no schedule file), so two beats can run side by side.
"""
from __future__ import annotations

import logging

from celery.beat import Scheduler

from onelane.core.clients import client_for
from onelane.core.keys import Keys
from onelane.core.settings import get_settings
from onelane.delivery.reaper import reap_everything

#: beat entries with this name run inside the beat process itself (never queued behind a callout)
REAPER_ENTRY = "onelane.reap"

log = logging.getLogger(__name__)


def run_reaper():
    s = get_settings()
    report = reap_everything(client_for(s), Keys(s.key_prefix), s)
    if report:
        log.warning("onelane: reaper: %s", report.summary())
    return report


LOCAL_ENTRIES = {REAPER_ENTRY: run_reaper}


class OnelaneScheduler(Scheduler):
    def apply_entry(self, entry, producer=None):
        local = LOCAL_ENTRIES.get(entry.task)
        if local is None:
            return super().apply_entry(entry, producer=producer)
        try:
            local()
        except Exception as exc:  # Redis away: log and try again at the next tick
            log.error("onelane: %s failed: %s", entry.task, exc)
