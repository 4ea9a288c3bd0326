"""onelane: Celery + Redis callouts to fragile HTTP APIs, one at a time (or at most N).

Public names, loaded lazily so that importing a primitive (``onelane.coordination.lease``)
never builds the Celery app:

* :func:`submit` — validate one callout and publish it;
* :func:`submit_many` — publish a big batch to the bulk queue, with progress;
* ``outbox`` — ``outbox.add(conn, url, ...)`` writes a callout into the caller's database
  transaction; the relay publishes it if and only if that transaction commits;
* ``app`` — the Celery app (``celery -A onelane worker``, or ``-A tasks`` from the project root).

The layers, each importing only those before it: ``core`` (settings, keys, errors,
clients) → ``coordination`` (lease, slots, rate, adaptive cap, circuit) → ``delivery``
(loss-proof fetch, in-flight records, flow, recovery, guard, reaper) → ``callout`` (one
run: validate, permit, HTTP, classify, ledger) → ``app``/``task`` (the Celery wiring) →
``ops`` (submit, batches, status, the CLI).
"""
from __future__ import annotations

__all__ = ["app", "submit", "submit_many", "outbox"]
__version__ = "0.2.0"


def __getattr__(name: str):
    if name == "app":
        return _app()
    if name == "submit":
        from onelane.ops.producer import submit

        return submit
    if name == "submit_many":
        from onelane.ops.batches import submit_many

        return submit_many
    if name == "outbox":
        from onelane.ops import outbox

        return outbox
    raise AttributeError(f"module 'onelane' has no attribute {name!r}")


def _app():
    """The Celery app; under the ``celery`` command a bad setting ends it with one line, no traceback."""
    import os
    import sys

    from onelane.core.errors import ConfigError

    try:
        from onelane.celery_app import app
    except ConfigError as exc:
        if os.path.basename(sys.argv[0] if sys.argv else "").startswith("celery") or \
                (sys.argv and sys.argv[0].endswith(os.path.join("celery", "__main__.py"))):
            raise SystemExit(f"onelane: {exc}") from None
        raise
    return app
