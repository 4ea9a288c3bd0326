"""Task events in batches: one publish carries what a worker did in the last few milliseconds.

Celery's worker buffers task events (``task-received``, ``task-started``, ``task-succeeded``,
...) and flushes the buffer at the next turn of its event loop. With the prefork pool each of
a callout's three events comes in a different turn, so each is its own PUBLISH: three round
trips to Redis and three kombu publishes in the worker per callout, more than onelane's own
steps cost (README, "Per-callout budget").

Here the first event buffered after a flush starts a short timer instead
(``ONELANE_TASK_EVENTS_BATCH_MS``, 10 ms by default); the flush it fires publishes everything
buffered by then as one ``task.multi`` message, the form Celery already uses and Flower and
``celery events`` read. A busy lane sends one publish for several callouts; an idle one sends
each callout's events at most that long after they happened. ``0`` keeps Celery's flush at the
next loop turn, and so does ``--pool solo``: there a task runs on the event loop's own thread, so
no timer can fire before the next task ends, and a held event would wait out a whole callout
(Celery already sends a solo callout's three events in one publish).

Guarantees: an event is never held longer than the batch time while the event loop runs (the
buffer also flushes at once when it reaches Celery's limit of 24 events), and a worker flushes
what it holds when its connection drops (before Celery swaps its event dispatcher, which carries
over only what could not be published) and when it shuts down. Events stay what Celery makes them, best effort: a
worker killed with SIGKILL loses the last few milliseconds' (Celery's loses those not yet
flushed at its next loop turn).
"""
from __future__ import annotations

import logging

from celery.concurrency.solo import TaskPool as SoloPool

log = logging.getLogger(__name__)


class BatchedTaskEvents:
    """A mixin for Celery's worker consumer: its task-event flush waits ``events_batch_s`` first.

    Celery calls ``_flush_events`` on the event loop's thread (``on_send_event_buffered`` puts it
    on the loop from whichever thread sent the event), so the timer state needs no lock.
    """

    #: set by the consumer (onelane.consumer.Consumer, from settings and its pool); 0: Celery's own flush
    events_batch_s: float = 0.0
    _events_flush_due = False

    @staticmethod
    def batch_s_for(pool, batch_ms: int) -> float:
        """The batch time for a consumer of ``pool``: 0 (Celery's flush) where tasks run on the loop."""
        return 0.0 if isinstance(pool, SoloPool) else batch_ms / 1000

    def _flush_events(self):
        if not self.events_batch_s or self.hub is None:
            return super()._flush_events()
        if not self._events_flush_due:
            self._events_flush_due = True
            self.hub.call_later(self.events_batch_s, self._flush_batched_events)

    def _flush_batched_events(self):
        """The timer's flush: everything buffered since the first event of this batch, in one publish."""
        self._events_flush_due = False
        super()._flush_events()

    def on_close(self):
        """The connection dropped: flush what is held into the dispatcher about to be replaced (what
        it cannot publish it keeps in the buffer Celery carries over), then Celery's own steps."""
        self._flush_held_events("at a reconnect")
        super().on_close()

    def shutdown(self):
        """Flush the events still held, then Celery's shutdown (which would drop them)."""
        self._flush_held_events("at shutdown")
        super().shutdown()

    def _flush_held_events(self, when: str) -> None:
        try:
            self._flush_batched_events()
        except Exception as exc:  # Redis away: events are best effort, the reconnect or shutdown is not
            log.warning("onelane: task events not flushed %s: %s", when, exc)
