"""The bare Celery baseline: the same requests call, the same worker flags as onelane's."""
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
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
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
