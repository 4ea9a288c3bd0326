"""The task ``tasks.callout``: one HTTP call at a time on its resource, recorded once.

The name is the public contract (producers publish by it), pinned with ``name=``; every
step is a method of :class:`onelane.callout.run.CalloutRun`, and what an answer means
(a 429, a 500, a 400) is decided in one place, :func:`onelane.callout.classify.classify`.
"""
from __future__ import annotations

from onelane.callout.classify import classify
from onelane.callout.run import CalloutRun
from onelane.celery_app import app


@app.task(name="tasks.callout", bind=True, Request="onelane.delivery.request:HeadRequeueRequest")
def callout(self, *args, **kwargs):
    """Call the API, retrying transient failures, never overlapping another callout on its resource."""
    run = CalloutRun.begin(self.request, args, kwargs)  # bad input: dead-lettered, CalloutRejected
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
            if verdict.succeeded:
                return run.record_success(attempt, reply, verdict)  # outcome + release: one transaction
        run.record_attempt(attempt, reply, verdict)  # kept for the dead letter; the circuit learns
        if verdict.final:
            raise run.dead_letter(verdict.reason)
        run.wait_before_retry(attempt, verdict)  # strict: hold the queue; relaxed: to the delay set
