"""Counters and histograms kept in Redis, so every worker's work is counted once and survives restarts.

Workers queue these writes on the pipeline or transaction that already records what they
count (the outcome, the attempt, the dead letter), so counting adds no round trip, and a
counter moves exactly when the thing it counts is recorded. The exporter
(:mod:`onelane.ops.metrics`) reads both hashes with one HGETALL each.

Field names are JSON arrays: ``[metric, label values...]`` for a counter, ``[metric, label
values..., bucket index]`` for a histogram bucket (not cumulative: the exporter sums them;
the last index is +Inf) and ``[metric, label values..., "sum_us"]`` for its sum, in whole
microseconds: an HINCRBY, a fifth of the Redis CPU of an HINCRBYFLOAT (measured with INFO
commandstats). A ``"sum"`` field in seconds, as earlier onelanes wrote it, is added in.
"""
from __future__ import annotations

import bisect
import json

from onelane.core.keys import Keys

#: counter -> its label names (the order of the values in a field)
COUNTERS = {
    "succeeded": ("lane", "resource"),
    "failed": ("lane", "resource"),
    "dead_lettered": ("lane", "resource"),
    "retried": ("lane", "resource"),
    "attempts": ("lane", "resource", "status_class"),
    "orphans_requeued": ("lane",),
    "guard_takeovers": ("lane",),
}

#: histogram -> (label names, upper bounds in seconds; +Inf is implied)
HISTOGRAMS = {
    "callout_duration_seconds": (("lane", "resource"),
                                 (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 45.0, 60.0, 120.0, 300.0)),
    "slot_wait_seconds": (("lane", "resource"),
                          (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)),
}

SUM = "sum"  # seconds, as a float (earlier onelanes)
SUM_US = "sum_us"  # whole microseconds

def field(metric: str, *values) -> str:
    """The hash field of one labelled series."""
    return json.dumps([metric, *[str(v) for v in values]], separators=(",", ":"))


def count(pipe, keys: Keys, metric: str, *values, by: int = 1) -> None:
    """Queue ``metric{values} += by`` on ``pipe`` (or run it on a client)."""
    if metric not in COUNTERS or len(values) != len(COUNTERS[metric]):
        raise ValueError(f"counter {metric!r} takes labels {COUNTERS.get(metric)}")
    pipe.hincrby(keys.metric_counters, field(metric, *values), by)


def observe(pipe, keys: Keys, metric: str, seconds: float, *values) -> None:
    """Queue one observation of ``seconds`` into histogram ``metric{values}``: two commands, or one
    for an observation of zero (nothing to add to the sum: a slot granted with no wait)."""
    names, bounds = HISTOGRAMS[metric]
    if len(values) != len(names):
        raise ValueError(f"histogram {metric!r} takes labels {names}")
    seconds = max(0.0, float(seconds))
    bucket = bisect.bisect_left(bounds, seconds)  # the first bound >= seconds; len(bounds) is +Inf
    pipe.hincrby(keys.metric_histograms, field(metric, *values, bucket), 1)
    sum_us = round(seconds * 1_000_000)
    if sum_us:
        pipe.hincrby(keys.metric_histograms, field(metric, *values, SUM_US), sum_us)


def status_class(status: int | None) -> str:
    """An attempt's HTTP status as a class (2xx ... 5xx), or "error" when no response came."""
    if status is None:
        return "error"
    return f"{int(status) // 100}xx"


def _series_fields(raw: dict):
    """(label list, value) of each field a worker wrote: a JSON list of strings. Anything else
    (a hand-made field) is skipped rather than breaking every scrape."""
    for f, v in raw.items():
        try:
            parts = json.loads(f)
        except (ValueError, TypeError):
            continue
        if isinstance(parts, list) and parts and all(isinstance(p, str) for p in parts):
            yield parts, v


def parse_counters(raw: dict) -> dict[tuple, int]:
    """HGETALL of the counters hash -> {(metric, label values...): value}; unknown fields skipped."""
    out = {}
    for parts, v in _series_fields(raw):
        metric = parts[0]
        if metric in COUNTERS and len(parts) == 1 + len(COUNTERS[metric]):
            try:
                out[tuple(parts)] = int(v)
            except (ValueError, TypeError):
                continue
    return out


def parse_histograms(raw: dict) -> dict[tuple, dict]:
    """HGETALL of the histograms hash -> {(metric, label values...): {"buckets": [cumulative counts,
    last is +Inf], "sum": seconds}}."""
    out: dict[tuple, dict] = {}
    for parts, v in _series_fields(raw):
        try:
            metric = parts[0]
            names, bounds = HISTOGRAMS[metric]
            if len(parts) != 2 + len(names):
                continue
            series = out.setdefault(tuple(parts[:-1]), {"buckets": [0] * (len(bounds) + 1), "sum": 0.0})
            if parts[-1] == SUM_US:
                series["sum"] += int(v) / 1_000_000
            elif parts[-1] == SUM:
                series["sum"] += float(v)
            else:
                series["buckets"][int(parts[-1])] += int(v)
        except (ValueError, TypeError, IndexError, KeyError):
            continue
    for series in out.values():
        running = 0
        for i, n in enumerate(series["buckets"]):
            running += n
            series["buckets"][i] = running
    return out
