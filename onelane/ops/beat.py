"""Beat's scheduler: the reaper (onelane.delivery.scheduler) and, with ONELANE_OUTBOX_DB, the outbox relay.

The relay runs as a thread of the beat process, beside the reaper's ticks, so a deployment with
an outbox needs no extra process. It lives here, at the top layer, because the relay publishes
through the app and validates with the callout layer; the composition root names this class by
string (``beat_scheduler``), as it names the worker guard. Two beats may run: the relay's lane
leases let one of them publish each lane.

Guarantee: a bad ONELANE_OUTBOX_DB (not a URL, no driver) stops beat at start-up with a message
that says what to do; a database that is away or has no table yet is logged and waited for, and
the reaper keeps running meanwhile.
"""
from __future__ import annotations

import logging

from onelane.core.settings import get_settings
from onelane.delivery.scheduler import OnelaneScheduler as ReaperScheduler
from onelane.delivery.scheduler import run_reaper

__all__ = ["OnelaneScheduler", "run_reaper"]

log = logging.getLogger(__name__)


class OnelaneScheduler(ReaperScheduler):
    _relay_thread = None
    _metrics_server = None

    def setup_schedule(self):
        super().setup_schedule()
        s = get_settings()
        if s.metrics_port and self._metrics_server is None:
            from onelane.ops.metrics import serve

            # a port already taken stops beat here, with the error naming it
            self._metrics_server = serve(s, port=s.metrics_port, bind=s.metrics_bind)
            log.info("onelane: beat serves Prometheus metrics on http://%s:%d/metrics", s.metrics_bind,
                     s.metrics_port)
        if s.outbox_db and self._relay_thread is None:
            from onelane.ops.relay import Relay, RelayThread

            relay = Relay(s.outbox_db, settings=s, app=self.app)
            log.info("onelane: beat runs the outbox relay for %s", relay.db_shown)
            self._relay_thread = RelayThread(relay)
            self._relay_thread.start()

    def close(self):
        if self._metrics_server is not None:
            self._metrics_server[0].shutdown()
            self._metrics_server = None
        if self._relay_thread is not None:
            self._relay_thread.stop()
            self._relay_thread = None
        super().close()
