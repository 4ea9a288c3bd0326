"""Figures the bench scenarios share: percentiles and the handoff gaps between calls at the API."""
from __future__ import annotations


def pct(values, p):
    """The ``p``-th percentile (nearest rank) of ``values``; None when there are none."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def gaps_ms(calls):
    """Milliseconds from the end of each call to the start of the next, in arrival order."""
    calls = sorted(calls, key=lambda c: c.start)
    return [(b.start - a.end) * 1000 for a, b in zip(calls, calls[1:])]
