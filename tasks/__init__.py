"""onelane: Celery + Redis callouts to fragile HTTP APIs, one at a time.

Public names: ``app`` (the Celery app), ``submit`` and ``callout``. They are loaded
lazily, so importing a primitive such as ``tasks.lease`` never builds the app.
"""
from __future__ import annotations

__all__ = ["app", "submit", "submit_many", "callout"]


def __getattr__(name: str):
    if name == "app":
        from tasks.celery import app

        return app
    if name == "submit":
        from tasks.producer import submit

        return submit
    if name == "submit_many":
        from tasks.batches import submit_many

        return submit_many
    if name == "callout":
        from tasks.callout_task import callout

        return callout
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
