"""``make demo`` end to end: the real command, its own private Redis, its summary and exit code."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def summary_rows(output: str) -> dict[str, str]:
    """The rows of the summary table as {metric: value}, whatever box characters rich used."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)]
        cells = [c for c in cells if c]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def number(rows: dict[str, str], metric: str) -> float:
    assert metric in rows, f"no {metric!r} row in the summary: {rows}"
    m = re.search(r"-?\d+(?:\.\d+)?", rows[metric])
    assert m, f"{metric!r} has no number: {rows[metric]!r}"
    return float(m.group())


def test_demo_runs_40_callouts_one_at_a_time_with_its_own_redis():
    # Given no REDIS_URL (the demo must start a private redis-server, never use localhost:6379)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("ONELANE_")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="120")
    # When the demo runs with 4 producers x 10 callouts and a quick API
    proc = subprocess.run(
        [sys.executable, "-m", "demo.run", "--producers", "4", "--per-producer", "10", "--max-gap", "0.3",
         "--min-delay", "0.05", "--max-delay", "0.2", "--timeout", "180"],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=240,
    )
    output = proc.stdout + proc.stderr
    # Then it succeeds, said it started its own Redis, and its summary shows 40 callouts, no overlap
    assert proc.returncode == 0, output
    assert "private redis-server" in output, output
    assert "Traceback" not in output, output
    rows = summary_rows(output)
    assert number(rows, "callouts published") == 40, output
    assert number(rows, "completed (SUCCESS)") == 40, output
    assert number(rows, "failed") == 0, output
    assert number(rows, "overlaps seen by the API") == 0, output
    assert number(rows, "max concurrency seen") == 1, output
    assert number(rows, "calls seen by the API") >= 40, output
    assert number(rows, "handoff gap p50 (ms)") >= 0, output
    assert number(rows, "wall time (s)") > 0, output
    assert "stopped:" in output and "redis-server" in output.split("stopped:")[-1], output
