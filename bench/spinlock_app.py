"""The approach users reported: 8 concurrent workers spin on one Redis lock, then requeue.

Each job tries a redis-py lock up to 10 times with exponential backoff and full jitter;
if it still has not got it, it requeues itself. Retries and requeues are counted in Redis.
"""
from __future__ import annotations

import os
import random
import time

import redis
import requests
from celery import Celery

URL = os.environ["REDIS_URL"]
app = Celery("spin", broker=URL, backend=URL)
app.conf.update(task_default_queue="spin", worker_prefetch_multiplier=1, task_acks_late=True,
                task_serializer="json", result_serializer="json", accept_content=["json"])
_client = redis.Redis.from_url(URL)
_session = requests.Session()


@app.task(name="spin.job", bind=True, max_retries=None)
def job(self, url, key):
    lock = _client.lock("spin:resource", timeout=30)
    for attempt in range(10):
        if lock.acquire(blocking=False):
            try:
                r = _session.post(url, json={"key": key}, headers={"Idempotency-Key": key}, timeout=60)
                return r.status_code
            finally:
                lock.release()
        _client.incr("spin:retries")
        time.sleep(random.uniform(0, min(1.0, 0.05 * 2 ** attempt)))
    _client.incr("spin:requeues")
    raise self.retry(countdown=0)
