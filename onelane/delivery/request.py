"""The worker-side request of ``tasks.callout``: a requeue goes to the head, not the tail.

Celery requeues a task whose pool child died (``task_reject_on_worker_lost``) with
``reject(requeue=True)``, and kombu's Redis transport puts such a message at the
*tail* of the queue, behind everything published after it. For a strictly ordered
queue that is wrong, so here the message moves back to the head, atomically with
the removal of kombu's unacked copy (see :func:`onelane.delivery.inflight.requeue_at_head`).
The killed attempt's resource lease stays until its deadline (the API may still be
working on it) unless ONELANE_RELEASE_DEAD_HOLDER=1 says the API aborts on disconnect.
"""
from __future__ import annotations

import logging
import os
import time

from celery.exceptions import Ignore
from celery.utils.saferepr import saferepr
from celery.worker import state as worker_state
from celery.worker.request import Request

from onelane.coordination.lease import Lease
from onelane.coordination.slots import Semaphore
from onelane.core.clients import client_for
from onelane.core.keys import Keys
from onelane.core.redaction import redact_kwargs
from onelane.core.settings import WORKER_ID_ENV, get_settings
from onelane.delivery import coalescing
from onelane.delivery.fetching import fetched_of, requeue_taken
from onelane.delivery.inflight import MOVED, NOT_HELD, Inflight
from onelane.delivery.transport import acked_with_outcome

log = logging.getLogger(__name__)


class HeadRequeueRequest(Request):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Celery remembers the ids of requests that succeeded (for hours): an id that did already
        # is no sign that this delivery succeeded, so its ack goes the usual way (see acknowledge)
        self._succeeded_before = self.id in getattr(worker_state, "successful_requests", ())
        # What the task-received event (and so Flower) shows: secrets masked, whatever the
        # producer put in kwargsrepr.
        try:
            names = get_settings().redact_headers
            self._kwargsrepr = saferepr(redact_kwargs(self._kwargs or {}, names), 1024)
        except Exception:  # malformed arguments: the task itself reports them
            self._kwargsrepr = "<unreadable arguments>"

    def send_event(self, type, **fields):
        """Events as Celery sends them; task-started also names the lane (Flower shows it)."""
        if type == "task-started":
            info = self.delivery_info or {}
            fields.setdefault("routing_key", info.get("routing_key"))
            fields.setdefault("exchange", info.get("exchange"))
        return super().send_event(type, **fields)

    def revoked(self):
        """Celery's check before running (revoked, or expired): a callout with a coalesce key that
        will never run frees its key and ends the ids it carried (FAILURE)."""
        gone = super().revoked()
        if gone:
            key = (self._kwargs or {}).get(coalescing.ARGUMENT) if isinstance(self._kwargs, dict) else None
            if coalescing.coalesce_key_problem(key) is None:
                s = get_settings()
                client = client_for(s)
                queue = (self.delivery_info or {}).get("routing_key") or s.queue
                try:
                    coalescing.abandon(client, Keys(s.key_prefix), queue=queue, key=key, task_id=self.id,
                                       why="it was revoked or expired before it ran", window_s=s.dedupe_window_s,
                                       result_expires_s=s.result_expires_s, now_ms=int(time.time() * 1000))
                except Exception:  # Redis away: the reaper frees the key later
                    log.exception("onelane: could not free the coalesce key of revoked %s", self.id)
        return gone

    def acknowledge(self):
        """Celery's ack after the task; a callout that succeeded acknowledged its message with its
        outcome (one transaction), so kombu's ack only clears its bookkeeping in memory."""
        tag = getattr(self.message, "delivery_tag", None)
        if (not self.acknowledged and tag and not self._succeeded_before
                and self.id in getattr(worker_state, "successful_requests", ())):
            # Celery marks the request successful just before this ack (task_ready); a failed or
            # rejected callout acks the usual way. Should Celery ever stop marking it, every ack
            # goes the usual way: a removal that finds nothing, never a message left behind.
            acked_with_outcome(tag)
        return super().acknowledge()

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        """Celery's handling of a failed task; a callout that ended with Ignore moved its message
        itself (a give-back at the head, a deferral) or left it where another delivery has it (given
        back meanwhile), so its ack only clears kombu's bookkeeping in memory: a removal from Redis
        could take away another delivery's copy under the same delivery tag."""
        tag = getattr(self.message, "delivery_tag", None)
        if tag and isinstance(getattr(exc_info, "exception", None), Ignore) and not self.acknowledged:
            acked_with_outcome(tag)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def reject(self, requeue=False):
        if not requeue or self.acknowledged:
            return super().reject(requeue=requeue)
        s = get_settings()
        keys = Keys(s.key_prefix)
        queue = (self.delivery_info or {}).get("routing_key") or s.queue
        try:
            client = client_for(s)
            if s.release_dead_holder:
                rec = Inflight(client, keys).get(self.id)
                if rec is not None and rec.lease_token:
                    limit = s.limit_for(rec.resource)
                    if limit.capped:  # a slot: its release also frees it in the semaphore's hint
                        Semaphore(client, keys, rec.resource, limit).release_named(rec.lease, rec.lease_token)
                    else:
                        Lease(client, rec.lease, keys=keys).release(rec.lease_token)
                    log.warning("onelane: released the lease of %s's dead attempt at once "
                                "(ONELANE_RELEASE_DEAD_HOLDER=1)", self.id)
            res = requeue_taken(client, keys, queue=queue, delivery_tag=self.message.delivery_tag, task_id=self.id,
                                fetched=fetched_of(self.message), owner=os.environ.get(WORKER_ID_ENV, ""))
        except Exception:  # Redis unreachable: fall back to kombu's own requeue (tail)
            log.exception("onelane: could not requeue %s at the head; kombu will requeue it at the tail",
                          self.id)
            return super().reject(requeue=True)
        if res == MOVED:
            log.warning("onelane: %s lost its worker process; requeued at the head of %r", self.id, queue)
        elif res == NOT_HELD:
            log.warning("onelane: %s lost its worker process; its message was no longer held here (acknowledged "
                        "or moved back already)", self.id)
        else:
            log.error("onelane: requeue of %s at the head returned %s; leaving it to the reaper", self.id, res)
        # kombu's copy is gone already; ack only clears the consumer's own bookkeeping.
        self.acknowledge()
        self.send_event("task-rejected", requeue=True)
