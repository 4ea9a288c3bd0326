"""The beat scheduler, for configurations that name it as ``beat.scheduler:OnelaneScheduler``.

onelane's app sets it itself (``onelane.ops.beat:OnelaneScheduler``: the reaper and, with
ONELANE_OUTBOX_DB, the outbox relay); this is the same class.
"""
from onelane.ops.beat import OnelaneScheduler, run_reaper

__all__ = ["OnelaneScheduler", "run_reaper"]
