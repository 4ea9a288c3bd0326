"""Recent outcomes of a queue, counted in 10-second steps: what ``onelane status`` shows as
completed and failed in the last minute and the last hour.

One hash per queue (``Keys.stats``), field ``"<outcome>:<step>"`` (``step``: the outcome's
time in ms // STEP_MS) -> count, one HINCRBY on the transaction that records the outcome.
Its size stays bounded whatever the rate: at most 2 × 360 fields an hour (the reaper drops
older steps), where a sorted set of task ids grew by one member per callout — 144 bytes each
(measured), so 1.8 million members and about 260 MB of Redis an hour for a bulk queue at 500
calls/s — and its ZADD cost Redis 3–5 times an HINCRBY.

A window's count takes every step that overlaps the window, so "the last minute" counts the
outcomes of the last 60 to 70 seconds: never fewer than happened in the minute.
"""
from __future__ import annotations

from onelane.core.keys import Keys
from onelane.core.text import text

#: the width of one counting step
STEP_MS = 10_000
#: steps older than this are dropped by the reaper (the longest window status shows)
KEEP_MS = 3_600_000
#: the outcomes counted
OUTCOMES = ("success", "failure")


def count(pipe, keys: Keys, queue: str, outcome: str, now_ms: int) -> None:
    """Queue on ``pipe`` (the transaction recording the outcome) the count of one ``outcome``."""
    pipe.hincrby(keys.stats(queue), f"{outcome}:{now_ms // STEP_MS}", 1)


def totals(fields: dict, *, now_ms: int, window_ms: int) -> dict[str, int]:
    """outcome -> its count over the steps overlapping the last ``window_ms`` (``fields``: the
    hash's HGETALL reply). A field not in this module's form is skipped."""
    first = (now_ms - window_ms) // STEP_MS
    out = {o: 0 for o in OUTCOMES}
    for raw, value in fields.items():
        parsed = _parse(raw)
        if parsed is not None and parsed[1] >= first and parsed[0] in out:
            out[parsed[0]] += int(value)
    return out


def stale(fields, *, now_ms: int) -> list[str]:
    """The fields of steps wholly older than KEEP_MS, and any not in this module's form (to drop)."""
    first = (now_ms - KEEP_MS) // STEP_MS
    out = []
    for raw in fields:
        parsed = _parse(raw)
        if parsed is None or parsed[1] < first:
            out.append(text(raw))
    return out


def _parse(raw) -> tuple[str, int] | None:
    """("success", 178903412) from b"success:178903412"; None for any other form."""
    outcome, _, step = text(raw).partition(":")
    return (outcome, int(step)) if step.isdigit() else None
