"""The recorded outcome of a task id, in one format for every writer.

The callout writes it when its call succeeds or fails for good; a callout that carried others
(coalescing, :mod:`onelane.delivery.coalescing`) writes one for each task id it carried, and
the reaper does for the ids of a carrier that never ran. Batch counters are counted here too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from onelane.core.keys import Keys

SUCCESS, FAILURE = "success", "failure"


@dataclass(frozen=True)
class Outcome:
    status: str  # SUCCESS or FAILURE
    task_id: str
    result: dict | None = None
    error: str | None = None
    #: the task id of the callout whose call this outcome is (coalescing); None: its own call
    coalesced_into: str | None = None

    def to_json(self) -> str:
        d = {"status": self.status, "task_id": self.task_id, "result": self.result, "error": self.error}
        if self.coalesced_into:
            d["coalesced_into"] = self.coalesced_into
        return json.dumps(d)

    @classmethod
    def from_json(cls, raw) -> "Outcome":
        d = json.loads(raw)
        return cls(d["status"], d["task_id"], d.get("result"), d.get("error"), d.get("coalesced_into"))


def count_batch_outcome(pipe, keys: Keys, batch_id: str, field: str, *, now_ms: int) -> None:
    """Count one outcome of a batch (``field``: done, failed or dead_lettered) and when it came,
    queued on ``pipe`` (or run on a client)."""
    pipe.hincrby(keys.batch(batch_id), field, 1)
    pipe.hset(keys.batch(batch_id), "last_ms", now_ms)
