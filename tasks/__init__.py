"""The Celery entry point in the project root: ``celery -A tasks worker -Q serial`` finds ``tasks.app``.

A thin shim over the installed library (``onelane``), kept so the commands in the README,
the Makefile and the compose file work from the project root. Names are loaded lazily:
``tasks.app`` (the Celery app), ``tasks.submit`` and ``tasks.submit_many`` (the same
functions as ``onelane.submit`` and ``onelane.submit_many``), ``tasks.outbox`` (``onelane.outbox``:
callouts written inside a database transaction), ``tasks.callout`` (the task).
"""
from __future__ import annotations

__all__ = ["app", "submit", "submit_many", "outbox", "callout"]


def __getattr__(name: str):
    if name in ("app", "submit", "submit_many", "outbox"):
        import onelane

        return getattr(onelane, name)
    if name == "callout":
        from onelane.task import callout

        return callout
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
