"""Stopping the processes the demo and the tests start: by pid, never by name."""
from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, *, grace_s: float, ask: bool = True) -> int | None:
    """SIGTERM ``proc`` (when ``ask``), wait up to ``grace_s``, then SIGKILL its whole group.

    ``proc`` must have been started with ``start_new_session=True``, so its group is its
    own session: a worker's pool children go with it and nothing else does.
    """
    if ask and proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=max(0.0, grace_s))
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    return proc.returncode
