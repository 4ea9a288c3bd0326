"""Repeated, interleaved rounds of an onelane run and its baseline, summarised by medians.

One run of each side takes a few seconds, and this machine's timings drift by tens of percent
from one minute to the next (other tenants, CPU caches shared by the bench's four busy
processes on two cores). A single pair is then mostly noise. So each pair is run ``rounds``
times, the side that goes first alternating, and what is reported is the median of each figure
over the rounds — with every round's ratios kept, so the spread is visible next to the median.
"""
from __future__ import annotations

import statistics

#: figures that must not be smoothed: any one round's count is reported (the sum over rounds)
SUMMED = frozenset({"overlaps", "failed_calls"})
#: figures that are the most of any round
MAXED = frozenset({"max_concurrency", "gap_max_ms"})


def interleaved(first, second, rounds: int) -> tuple[list, list]:
    """Call ``first()`` and ``second()`` ``rounds`` times each, alternating which goes first."""
    a, b = [], []
    for r in range(rounds):
        if r % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b


def median_of(runs: list):
    """The median of every number across same-shaped results, dicts recursed into key by key (a
    key missing from some rounds counts 0 there: a command one round never sent). Counts that must
    not be smoothed (:data:`SUMMED`) are summed over the rounds, :data:`MAXED` take the largest;
    anything else (text, lists) is the first round's."""
    first = runs[0]
    if len(runs) == 1:
        return first
    if isinstance(first, dict):
        out = {}
        for key in dict.fromkeys(k for r in runs for k in r):
            present = [r[key] for r in runs if key in r]
            if all(_number(v) for v in present):
                values = present + [0] * (len(runs) - len(present))
                out[key] = (sum(values) if key in SUMMED else max(values) if key in MAXED else _median(values))
            else:
                out[key] = median_of(present)
        return out
    if all(_number(r) for r in runs):
        return _median(runs)
    return first


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _median(values: list):
    m = statistics.median(values)
    if all(isinstance(v, int) for v in values):
        return int(m) if float(m).is_integer() else m
    return round(m, 3)


def spread(values: list[float]) -> str:
    """``"0.88-1.02"``: the lowest and highest of the rounds' values."""
    return f"{min(values):.2f}-{max(values):.2f}"
