"""The composition root: the Celery app, its one configuration mapping, the guard and the schedule.

``celery -A tasks worker -Q serial`` and ``celery -A tasks beat`` (the entry point in the
project root, ``tasks/``) find this ``app``; so does ``celery -A onelane`` anywhere
onelane is installed. Nothing in the command line or the compose file repeats a setting
made here. Everything is named by onelane's installed modules, so the worker finds its
transport, guard, request class and scheduler wherever it runs.
"""
from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from onelane.core.settings import Settings, get_settings
from onelane.delivery.scheduler import REAPER_ENTRY
from onelane.delivery.transport import same_transport_failover

#: the module that defines ``tasks.callout``, imported by the worker
TASK_MODULE = "onelane.task"


def celery_config(s: Settings) -> dict:
    """The whole Celery configuration of onelane, derived from the settings."""
    q = s.queue
    return {
        "broker_url": s.redis_url,
        # kombu's Redis transport with a fetch that cannot lose a message (onelane/delivery/transport.py);
        # with a sentinel:// URL kombu's Sentinel transport, which follows the current master
        "broker_transport": "onelane.delivery.transport:" + ("SentinelTransport" if s.uses_sentinel else "Transport"),
        "result_backend": s.redis_url,
        # the default lane; a worker started with -Q <lane> (or -Q bulk) gets its queue declared on
        # demand (task_create_missing_queues), with the same direct exchange shape
        "task_queues": (Queue(q, Exchange(q, type="direct"), routing_key=q),),
        "task_create_missing_queues": True,
        "task_default_queue": q,
        "task_default_exchange": q,
        "task_default_routing_key": q,
        "task_routes": {"tasks.callout": {"queue": q, "routing_key": q}},
        # one message at a time: one process, one reserved message, acked after the outcome
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        # Billiard waits this long after a pool child dies before reporting it lost (default
        # 10 s), in case it stored a result first; our own ledger answers that, so report at once.
        "worker_lost_wait": 1.0,
        # kombu restores unacked messages older than this; it must exceed the longest callout
        "broker_transport_options": {"visibility_timeout": s.effective_visibility_timeout_s, **_sentinel(s)},
        # on a reconnect, kombu would swap in its own transport for the next sentinel:// address
        "broker_failover_strategy": same_transport_failover,
        "broker_connection_retry_on_startup": True,
        # A Redis that refuses for a while (OOM at maxmemory, READONLY during a failover) is a
        # reason to reconnect and go on, never to exit: the consumer treats those replies as it
        # treats a lost connection, and the result backend retries them like one (~5 min).
        "broker_channel_error_retry": True,
        "result_backend_transport_options": {
            "additional_connection_errors": ["redis.exceptions.OutOfMemoryError", "redis.exceptions.ReadOnlyError",
                                             "redis.exceptions.ExecAbortError"],
            "retry_policy": {"max_retries": 300, "interval_start": 0, "interval_step": 0.2, "interval_max": 1},
            **_sentinel(s),
        },
        "broker_connection_timeout": 5,
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                                      "interval_max": 1.0},
        # every callout visible in Flower
        "worker_send_task_events": True,
        # no task-sent events: Celery would put the raw arguments (secrets included) in them
        # before the worker could mask them; Flower sees every callout from its receipt on.
        "task_send_sent_event": False,
        # no STARTED state in the result backend: two Redis round trips per callout that buy
        # nothing here — the in-flight record (onelane status) and Flower's task-started event
        # say which callout runs, and since when
        "task_track_started": False,
        # result_extended stays off: it would copy the raw arguments (and any secret in their
        # headers) into the result backend. Flower shows the masked arguments from the events.
        "result_extended": False,
        "result_expires": s.result_expires_s,
        # JSON only: a message can never carry code into the worker
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "enable_utc": True,
        "beat_scheduler": "onelane.ops.beat:OnelaneScheduler",
        # a message the worker cannot run is dead-lettered and marked FAILURE, never dropped silently
        "worker_consumer": "onelane.consumer:Consumer",
        "beat_schedule": {
            "onelane-reaper": {"task": REAPER_ENTRY, "schedule": s.reap_interval_s},
        },
    }


def _sentinel(s: Settings) -> dict:
    """Transport options of a sentinel:// REDIS_URL (broker and results alike): the master's name,
    the sentinels' password."""
    if not s.uses_sentinel:
        return {}
    opts = {"master_name": s.sentinel_master}
    if s.sentinel_password:
        opts["sentinel_kwargs"] = {"password": s.sentinel_password}
    return opts


def _tls(s: Settings) -> dict:
    """TLS options for rediss:// URLs (broker and results alike)."""
    if not s.redis_url.startswith("rediss://"):
        return {}
    import ssl

    opts = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if s.redis_ca_certs:
        opts["ssl_ca_certs"] = s.redis_ca_certs
    return {"broker_use_ssl": opts, "redis_backend_use_ssl": opts}


def make_app(s: Settings | None = None) -> Celery:
    s = s or get_settings()
    celery_app = Celery("onelane", include=[TASK_MODULE])
    celery_app.conf.update(celery_config(s))
    celery_app.conf.update(_tls(s))
    celery_app.steps["worker"].add("onelane.delivery.guard:WorkerGuard")
    return celery_app


app = make_app()
