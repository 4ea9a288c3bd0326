"""The worker guard bootstep, for configurations that name it as ``worker.guard:WorkerGuard``.

onelane's app registers it itself (``onelane.delivery.guard:WorkerGuard``); this is the same class.
"""
from onelane.delivery.guard import GuardService, WorkerGuard

__all__ = ["GuardService", "WorkerGuard"]
