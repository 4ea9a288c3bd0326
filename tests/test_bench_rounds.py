"""The bench's rounds: medians of interleaved runs (pure logic)."""
import pytest

from bench.rounds import interleaved, median_of, spread

pytestmark = pytest.mark.unit


def test_rounds_alternate_which_side_goes_first():
    order = []
    a, b = interleaved(lambda: order.append("a") or len(order), lambda: order.append("b") or len(order), 3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert a == [1, 4, 5] and b == [2, 3, 6]


def test_the_median_of_each_figure_is_taken_and_counts_are_not_smoothed():
    runs = [
        {"per_s": 300.0, "calls": 100, "overlaps": 0, "gap_max_ms": 9.0, "pool": "solo",
         "cost": {"redis_cpu_ms_per_callout": 0.30, "redis_commands": {"get": 4.0, "evalsha": 3.0}}},
        {"per_s": 250.0, "calls": 100, "overlaps": 1, "gap_max_ms": 30.0, "pool": "solo",
         "cost": {"redis_cpu_ms_per_callout": 0.20, "redis_commands": {"get": 4.0}}},
        {"per_s": 280.0, "calls": 100, "overlaps": 0, "gap_max_ms": 12.0, "pool": "solo",
         "cost": {"redis_cpu_ms_per_callout": 0.25, "redis_commands": {"get": 5.0, "evalsha": 3.0}}},
    ]
    m = median_of(runs)
    assert m["per_s"] == 280.0 and m["calls"] == 100 and m["pool"] == "solo"
    assert m["overlaps"] == 1, "an overlap in any round is reported, never smoothed away"
    assert m["gap_max_ms"] == 30.0
    assert m["cost"]["redis_cpu_ms_per_callout"] == 0.25
    assert m["cost"]["redis_commands"] == {"get": 4.0, "evalsha": 3.0}  # absent in a round: 0 there
    assert median_of(runs[:1]) is runs[0]
    assert spread([0.9, 1.1, 0.95]) == "0.90-1.10"
