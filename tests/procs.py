"""Real processes for the tests: celery worker and beat subprocesses, stopped by pid."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo.processes import stop_group

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CELERY = str(VENV_BIN / "celery")


def children(pid: int) -> list[int]:
    """Direct child pids of ``pid`` (from /proc)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > give_up:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class CeleryProcess:
    """A ``celery -A <app> <args>`` subprocess (app ``tasks`` unless told) in its own session, logging to a file."""

    ready_marker = "ready."

    def __init__(self, args: list[str], env: dict, name: str, app: str = "tasks"):
        self.app = app
        self.args = args
        self.env = env
        self.name = name
        fd, self.log_path = tempfile.mkstemp(prefix=f"onelane-{name}-", suffix=".log")
        os.close(fd)
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout_s: float = 30.0) -> "CeleryProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [CELERY, "-A", self.app, *self.args], cwd=str(ROOT), env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        if wait_ready:
            self.wait_log(self.ready_marker, timeout_s)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_log(self, text: str, timeout_s: float) -> None:
        def seen():
            if self.proc.poll() is not None and text not in self.log():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return text in self.log()
        wait_for(seen, timeout_s, 0.1, f"{text!r} in the {self.name} log")

    def pool_children(self) -> list[int]:
        return children(self.pid)

    def kill9(self, *, whole: bool = True) -> None:
        """SIGKILL the parent and (when ``whole``) every process of its group."""
        if whole:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def ask_to_stop(self) -> None:
        """SIGTERM (a worker's warm shutdown), without waiting: see ``stop``."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 20.0, *, asked: bool = False) -> int | None:
        """Stop it (SIGTERM unless ``asked`` already, then SIGKILL of its group after ``timeout_s``)."""
        if self.proc is None:
            return None
        code = stop_group(self.proc, grace_s=timeout_s, ask=not asked)  # pool children go with the group
        self._log.close()
        return code


def stop_all(processes) -> None:
    """Stop every one, all asked at once: their shutdowns overlap instead of adding up."""
    for p in processes:
        p.ask_to_stop()
    for p in processes:
        p.stop(asked=True)


def sigint_as_a_terminal_starts_it() -> None:
    """For ``preexec_fn``: SIGINT at its default, as a terminal's shell starts a command. A suite run
    in the background inherits SIGINT ignored, and a shell cannot trap a signal ignored on entry."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def worker(env: dict, name: str = "w1", queue: str = "serial", extra: list[str] | None = None) -> CeleryProcess:
    return CeleryProcess(["worker", "-Q", queue, "-n", f"{name}@%h", "-l", "info", *(extra or [])], env, name)


def beat(env: dict, name: str = "beat") -> CeleryProcess:
    p = CeleryProcess(["beat", "-l", "info"], env, name)
    p.ready_marker = "beat: Starting"
    return p
