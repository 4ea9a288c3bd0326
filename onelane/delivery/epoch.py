"""Noticing that Redis lost its data: restarted without persistence, a cache-configured
instance, a replica promoted empty.

Redis holds an *epoch*: a random id written once. A process that has seen the epoch and
later finds it gone (or replaced) knows everything Redis held was lost in between, and
says so: one ERROR naming what is gone, and a record ``onelane status`` shows. What
survives such a loss: fencing tokens keep growing (a fencing counter that does not exist
yet starts from the Redis clock, in microseconds), and the Idempotency-Key still goes to
the API with every call.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass

from onelane.core.keys import Keys
from onelane.core.text import text, text_map

log = logging.getLogger(__name__)

LOST = ("every queued and in-flight callout, the dedupe history (a callout published again may run again: "
        "its Idempotency-Key still reaches the API), dead letters, results, pauses, circuits and leases")


@dataclass
class EpochWatch:
    """What one process remembers of Redis's epoch, to notice when it changes."""

    client: object
    keys: Keys
    who: str
    seen: str | None = None

    def check(self) -> dict | None:
        """Read the epoch (creating it on a fresh Redis); the loss record if it changed since last seen."""
        current = text(self.client.hget(self.keys.epoch, "id")) or None
        if current is None:
            new = uuid.uuid4().hex
            pipe = self.client.pipeline(transaction=True)
            pipe.hsetnx(self.keys.epoch, "id", new)
            pipe.hsetnx(self.keys.epoch, "since_ms", int(time.time() * 1000))
            pipe.hget(self.keys.epoch, "id")
            current = text(pipe.execute()[-1])
        previous, self.seen = self.seen, current
        if previous is None or previous == current:
            return None
        loss = {"detected_ms": int(time.time() * 1000), "previous_epoch": previous, "epoch": current,
                "detected_by": self.who}
        recorded = self.client.hsetnx(self.keys.data_loss, current, json.dumps(loss))
        if recorded:
            log.error("onelane: Redis lost its data (its epoch %s… is gone; now %s…), noticed by %s. Lost: %s. "
                      "Fencing tokens still grow. Turn on persistence: see the README, \"Running Redis for "
                      "onelane\"", previous[:8], current[:8], self.who, LOST)
        return loss


def losses(client, keys: Keys) -> list[dict]:
    """Every recorded data loss, oldest first."""
    out = []
    for raw in text_map(client.hgetall(keys.data_loss)).values():
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue
    return sorted(out, key=lambda d: d.get("detected_ms", 0))
