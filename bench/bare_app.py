"""The bare Celery baseline: the same requests call, the same worker configuration as onelane's.

Every worker setting onelane makes (onelane/celery_app.py) is made here too — concurrency 1,
prefetch 1, late ack, reject on worker lost, ack on failure, worker_lost_wait 1 s, no STARTED
state, task events on (the bench starts it with -E as well, as a Flower-monitored deployment
runs it) — so the comparison prices onelane's guarantees and nothing else. onelane's own
transport, consumer and guard are what is being priced; kombu's stock Redis transport runs here.
"""
from __future__ import annotations

import os

import requests
from celery import Celery

URL = os.environ["REDIS_URL"]
app = Celery("bare", broker=URL, backend=URL)
app.conf.update(
    task_default_queue="bare",
    worker_concurrency=1,
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_acks_on_failure_or_timeout=True,
    worker_lost_wait=1.0,
    worker_send_task_events=True,
    task_send_sent_event=False,
    task_track_started=False,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_transport_options={"visibility_timeout": int(os.environ.get("BARE_VISIBILITY_TIMEOUT", "3600"))},
)
_session = requests.Session()


@app.task(name="bare.call")
def call(url, json=None, headers=None):
    r = _session.post(url, json=json, headers=headers or {}, timeout=60)
    return {"status_code": r.status_code, "body": r.text}
