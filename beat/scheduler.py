"""The beat scheduler, for configurations that name it as ``beat.scheduler:OnelaneScheduler``.

onelane's app sets it itself (``onelane.delivery.scheduler:OnelaneScheduler``); this is the same class.
"""
from onelane.delivery.scheduler import OnelaneScheduler, run_reaper

__all__ = ["OnelaneScheduler", "run_reaper"]
