"""The task ``tasks.callout``: one HTTP call at a time on its resource, recorded once.

The name is the public contract (producers publish by it), pinned with ``name=``; every
step is a method of :class:`onelane.callout.run.CalloutRun`, and what an answer means
(a 429, a 500, a 400) is decided in one place, :func:`onelane.callout.classify.classify`.
"""
from __future__ import annotations

import logging

from celery.exceptions import Ignore

from onelane.callout.classify import classify
from onelane.callout.run import CalloutRun
from onelane.celery_app import app
from onelane.core.errors import CalloutFailed

log = logging.getLogger(__name__)


@app.task(name="tasks.callout", bind=True, Request="onelane.delivery.request:HeadRequeueRequest")
def callout(self, *args, **kwargs):
    """Call the API, retrying transient failures, never overlapping another callout on its resource."""
    run = CalloutRun.begin(self.request, args, kwargs)  # bad input: dead-lettered, CalloutRejected
    try:
        return _run(self, run)
    except (CalloutFailed, Ignore):
        raise
    except Exception as exc:  # a fault nobody foresaw: never let the callout vanish with the message
        log.exception("onelane: %s failed unexpectedly; dead-lettering it", self.request.id)
        raise run.dead_letter(f"unexpected {type(exc).__name__}: {exc}") from exc


def _run(self, run: CalloutRun) -> dict:
    """The steps of one callout, attempt after attempt."""
    while True:
        check = run.preflight()  # one read: recorded outcome, attempts, pause, circuit
        if check.prior is not None:
            return run.recorded(check.prior)  # a redelivered copy: the recorded outcome, no second call
        if check.attempt > run.policy.max_attempts:
            raise run.dead_letter(f"no attempts left ({run.policy.max_attempts} made)")
        if not run.wait_until_open(check):  # paused queue, or the resource's circuit open
            continue
        with run.permit(check) as attempt:  # the resource's lease or a slot; recorded in flight
            reply = run.send(attempt)  # one HTTP attempt under a hard deadline
            verdict = classify(reply, attempt=attempt.number, policy=run.policy)
            if verdict.succeeded:  # outcome, release and Celery's result: one transaction
                result = run.record_success(attempt, reply, verdict, store_result=result_store(self))
                self.request.ignore_result = True  # stored already: Celery must not store it again
                return result
        run.record_attempt(attempt, reply, verdict)  # kept for the dead letter; the circuit learns
        if verdict.final:
            raise run.dead_letter(verdict.reason)
        run.wait_before_retry(attempt, verdict)  # strict: hold the queue; relaxed: to the delay set


SUCCESS = "SUCCESS"


def result_store(task):
    """A hook that queues Celery's result of ``task`` on the transaction recording its outcome: one
    round trip instead of Celery's read-then-write after the task returns, in Celery's format."""
    backend = task.backend
    request = task.request

    def store(pipe, result) -> None:
        meta = backend._get_result_meta(result=result, state=SUCCESS, traceback=None, request=request)
        meta["task_id"] = request.id
        key, value = backend.get_key_for_task(request.id), backend.encode(meta)
        if backend.expires:
            pipe.setex(key, backend.expires, value)
        else:
            pipe.set(key, value)
        pipe.publish(key, value)  # wakes a producer waiting in AsyncResult.get()
    return store
