"""Capacity baselines: the same calls with no cap (fire at will) or with a sleep between calls."""
from __future__ import annotations

import os
import time

import requests
from celery import Celery

URL = os.environ["REDIS_URL"]
SLEEP_S = float(os.environ.get("BENCH_SLEEP_S", "0"))
app = Celery("unlimited", broker=URL, backend=URL)
app.conf.update(task_default_queue="free", worker_prefetch_multiplier=1, task_acks_late=True,
                task_serializer="json", result_serializer="json", accept_content=["json"])
_session = requests.Session()
_session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=64))


@app.task(name="free.call")
def call(url):
    r = _session.post(url, json={}, timeout=60)
    if SLEEP_S:
        time.sleep(SLEEP_S)  # the sleep-between-calls workaround users reported
    return r.status_code
