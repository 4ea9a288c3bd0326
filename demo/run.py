"""``make demo``: many producers, one serial worker, a fragile API, and a summary.

What it does, start to finish:

1. Picks a Redis: ``REDIS_URL`` when it is set and answers; otherwise a private
   ``redis-server`` (AOF on) on a free port. It never falls back to localhost:6379.
2. Starts the fragile demo API in this process (it answers 500 and counts an
   overlap whenever two calls are in flight at once).
3. Starts a real ``celery -A tasks worker -Q serial`` and ``celery -A tasks beat``,
   each in its own session, logging to files in a temporary directory.
4. Starts several producer processes that publish callouts with plain
   ``Celery(broker=url).send_task("tasks.callout", ...)`` at random moments.
5. Shows progress until every callout has an outcome in the result backend, then
   prints a summary: completed, failed, overlaps and the largest concurrency the API
   saw, the handoff gap between consecutive callouts, wall time.

Exit status: 0 only when every callout succeeded and the API saw no overlap; 1 when
a check failed or the run timed out; 2 when the demo could not be set up; 130/143
when interrupted. Every process it started is stopped on the way out, by its pid.

    python -m demo.run [--producers 4] [--per-producer 12] [--max-gap 2.0]
                       [--min-delay 0.2] [--max-delay 1.0] [--timeout 600]
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue as queue_mod
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from demo.processes import stop_group

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "serial"
TERMINAL_STATES = {"SUCCESS", "FAILURE", "REVOKED"}

EXIT_OK, EXIT_CHECK_FAILED, EXIT_SETUP, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class SetupError(Exception):
    """An expected problem starting the demo: shown as one clear message, no traceback."""


class Terminated(Exception):
    """Raised in the main process by the SIGTERM handler so ``finally`` blocks run."""


# -- small helpers -----------------------------------------------------------------------------

def redact(url: str) -> str:
    """The URL with any password masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def redis_reachable(url: str, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(True, "") when a Redis at ``url`` answers PING, else (False, why)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    except (ValueError, TypeError) as exc:
        return False, f"not a valid Redis URL ({exc})"
    try:
        client.ping()
        return True, ""
    except Exception as exc:  # connection refused, auth, TLS, DNS...
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        try:
            client.close()
        except Exception:
            pass


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def celery_command() -> list[str]:
    exe = Path(sys.executable).parent / "celery"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "celery"]


class Proc:
    """A ``celery -A tasks ...`` subprocess in its own session, logging to a file, stopped by pid."""

    def __init__(self, name: str, args: list[str], env: dict, log_dir: str):
        self.name = name
        self.args = args
        self.env = env
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "Proc":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*celery_command(), "-A", "tasks", *self.args], cwd=str(ROOT), env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for_log(self, text: str, timeout_s: float) -> None:
        give_up = time.monotonic() + timeout_s
        while True:
            if text in self.log():
                return
            if not self.running():
                raise SetupError(f"the {self.name} exited with status {self.proc.returncode} before it was "
                                 f"ready; last lines of {self.log_path}:\n{self.tail()}")
            if time.monotonic() > give_up:
                raise SetupError(f"the {self.name} was not ready within {timeout_s:.0f} s; "
                                 f"see {self.log_path}:\n{self.tail()}")
            time.sleep(0.1)

    def terminate(self) -> None:
        """Ask politely (SIGTERM to the process itself); ``finish`` enforces it."""
        if self.running():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def finish(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` for a clean exit, then SIGKILL the whole process group."""
        if self.proc is None:
            return None
        # the group is the session we created: the worker's pool children go with it
        code = stop_group(self.proc, grace_s=timeout_s, ask=False)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


# -- producers (run in spawned processes) -----------------------------------------------------

def produce(redis_url: str, api_url: str, run_id: str, producer: int, count: int, max_gap_s: float,
            out) -> None:
    """Publish ``count`` callouts with plain ``send_task`` at random moments; report each id."""
    # Ctrl-C reaches the whole foreground group: the parent decides when producers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from celery import Celery

        app = Celery(broker=redis_url)
        rng = random.Random()
        for n in range(count):
            time.sleep(rng.uniform(0, max_gap_s))
            sent_at = time.time()
            result = app.send_task(
                "tasks.callout",
                kwargs={"url": f"{api_url}/demo",
                        "json": {"producer": producer, "n": n, "sent_at": sent_at},
                        "idempotency_key": f"demo-{run_id}-p{producer}-{n}"},
                queue=QUEUE,
            )
            out.put(("id", producer, n, result.id))
        out.put(("done", producer, count, None))
        app.close()
    except Exception as exc:
        out.put(("error", producer, -1, f"{type(exc).__name__}: {exc}"))


# -- the run -----------------------------------------------------------------------------------

class Demo:
    def __init__(self, args: argparse.Namespace):
        from rich.console import Console

        self.args = args
        self.console = Console(highlight=False)
        self.redis_server = None
        self.redis_url = ""
        self.api = None
        self.worker: Proc | None = None
        self.beat: Proc | None = None
        self.producers: list = []
        self.log_dir = ""
        self.result_app = None

    def say(self, text: str) -> None:
        self.console.print(text, soft_wrap=True, markup=False)

    # setup ----------------------------------------------------------------------------------
    def choose_redis(self) -> None:
        url = os.environ.get("REDIS_URL", "").strip()
        if url:
            ok, why = redis_reachable(url)
            if ok:
                self.redis_url = url
                self.say(f"redis:   REDIS_URL {redact(url)} (reachable, using it)")
                return
            self.say(f"redis:   REDIS_URL {redact(url)} is not reachable ({why}); starting a private one")
        else:
            self.say("redis:   REDIS_URL is not set; starting a private redis-server "
                     "(localhost:6379 is not touched)")
        if shutil.which("redis-server") is None:
            raise SetupError("redis-server is not installed. Install it (Debian/Ubuntu: "
                             "apt-get install -y redis-server) or set REDIS_URL to a reachable Redis.")
        from demo.redis_server import RedisServer

        try:
            self.redis_server = RedisServer(appendonly=True).start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise SetupError(f"could not start a private redis-server: {exc}") from None
        self.redis_url = self.redis_server.url
        self.say(f"redis:   private redis-server {self.redis_url} (pid {self.redis_server.proc.pid}, "
                 f"AOF on, data in {self.redis_server.dir})")

    def start_api(self) -> None:
        from demo.fragile_api import FragileAPI

        lo, hi = self.args.min_delay, self.args.max_delay
        self.api = FragileAPI(delay_s=lambda: random.uniform(lo, hi)).start()
        self.say(f"api:     fragile demo API {self.api.url} (each call takes {lo:g}-{hi:g} s; "
                 f"two at once = overlap)")

    def child_env(self) -> dict:
        env = dict(os.environ)
        # the demo always uses the "serial" queue: a user's ONELANE_QUEUE would split worker and app
        env.pop("ONELANE_QUEUE", None)
        env.update(REDIS_URL=self.redis_url, ONELANE_ALLOW_PRIVATE_NETWORKS="1", PYTHONPATH=str(ROOT),
                   PYTHONUNBUFFERED="1")
        return env

    def start_celery(self) -> None:
        self.log_dir = tempfile.mkdtemp(prefix="onelane-demo-")
        env = self.child_env()
        self.worker = Proc("worker", ["worker", "-Q", QUEUE, "-n", f"demo{os.getpid()}@%h", "-l", "info"],
                           env, self.log_dir).start()
        self.beat = Proc("beat", ["beat", "-l", "info"], env, self.log_dir).start()
        self.say(f"worker:  pid {self.worker.pid}, log {self.worker.log_path}")
        self.say(f"beat:    pid {self.beat.pid}, log {self.beat.log_path}")
        self.worker.wait_for_log("ready.", self.args.ready_timeout)
        if not self.beat.running():
            raise SetupError(f"beat exited with status {self.beat.proc.returncode}; last lines of "
                             f"{self.beat.log_path}:\n{self.beat.tail()}")
        self.say("worker ready.")

    # the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        from celery import Celery
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        a = self.args
        started = time.monotonic()
        self.choose_redis()
        self.start_api()
        self.start_celery()

        self.result_app = Celery(broker=self.redis_url, backend=self.redis_url)
        self.result_app.conf.update(result_accept_content=["json"], accept_content=["json"])

        total = a.producers * a.per_producer
        run_id = uuid.uuid4().hex[:8]
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        # Producers share our process group, so a terminal's Ctrl-C reaches them too; they start
        # with SIGINT ignored (inherited) so it cannot break them mid-start with a traceback.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for p in range(a.producers):
                proc = ctx.Process(target=produce, name=f"producer-{p}", daemon=True,
                                   args=(self.redis_url, self.api.url, run_id, p, a.per_producer, a.max_gap,
                                         out))
                proc.start()
                self.producers.append(proc)
        finally:
            signal.signal(signal.SIGINT, old_int)
        self.say(f"publish: {a.producers} producer processes x {a.per_producer} callouts = {total} "
                 f"(random 0-{a.max_gap:g} s between publishes), run {run_id}")

        ids: list[str] = []
        pending: list[str] = []
        states: dict[str, str] = {}
        done_producers: set[int] = set()
        errors: list[str] = []
        run_start = time.monotonic()
        deadline = run_start + a.timeout
        timed_out = False
        problem = ""

        progress = Progress(SpinnerColumn(), TextColumn("{task.description:<10}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                            console=self.console, transient=False)
        with progress:
            t_pub = progress.add_task("published", total=total, note="")
            t_done = progress.add_task("completed", total=total, note="")
            while True:
                # new ids from producers
                while True:
                    try:
                        kind, producer, _n, payload = out.get_nowait()
                    except queue_mod.Empty:
                        break
                    if kind == "id":
                        ids.append(payload)
                        pending.append(payload)
                    elif kind == "done":
                        done_producers.add(producer)
                    else:
                        done_producers.add(producer)
                        errors.append(f"producer {producer} failed: {payload}")
                        progress.console.print(f"[red]producer {producer} failed:[/] {payload}")
                for i, proc in enumerate(self.producers):
                    if i not in done_producers and proc.exitcode not in (None, 0):
                        done_producers.add(i)
                        errors.append(f"producer {i} exited with status {proc.exitcode}")
                # outcomes from the result backend
                still = []
                for tid in pending:
                    state = self.result_app.AsyncResult(tid).state
                    if state in TERMINAL_STATES:
                        states[tid] = state
                    else:
                        still.append(tid)
                pending = still
                failed = sum(1 for s in states.values() if s != "SUCCESS")
                progress.update(t_pub, completed=len(ids))
                progress.update(t_done, completed=len(states),
                                note=f"[red]{failed} failed[/]" if failed else "")
                if len(done_producers) == len(self.producers) and not pending:
                    break
                if not self.worker.running():
                    problem = (f"the worker exited with status {self.worker.proc.returncode} during the run; "
                               f"see {self.worker.log_path}")
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.2)
        wall_s = time.monotonic() - run_start
        return self.summarise(total, ids, states, errors, timed_out, problem, wall_s,
                              time.monotonic() - started)

    # summary ---------------------------------------------------------------------------------
    def summarise(self, total: int, ids: list[str], states: dict[str, str], errors: list[str],
                  timed_out: bool, problem: str, wall_s: float, overall_s: float) -> int:
        from rich.table import Table

        calls = sorted(self.api.snapshot(), key=lambda c: c.start)
        succeeded = sum(1 for s in states.values() if s == "SUCCESS")
        failed = len(states) - succeeded
        unfinished = len(ids) - len(states)
        gaps_ms: list[float] = []
        backlog_gaps_ms: list[float] = []
        for prev, nxt in zip(calls, calls[1:]):
            if prev.end is None:
                continue
            gap = (nxt.start - prev.end) * 1000.0
            gaps_ms.append(gap)
            try:
                sent_at = float(nxt.json()["sent_at"])
            except Exception:
                continue
            if sent_at <= prev.end:  # the next callout was already waiting: a pure handoff
                backlog_gaps_ms.append(gap)
        keys = [c.key for c in calls]
        repeated = len(keys) - len(set(keys))

        def ms(v):
            return "-" if v is None else f"{v:.1f}"

        table = Table(title="onelane demo summary", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("callouts published", f"{len(ids)}")
        table.add_row("completed (SUCCESS)", f"{succeeded}")
        table.add_row("failed", f"{failed}")
        table.add_row("not finished", f"{unfinished + (total - len(ids))}")
        table.add_row("calls seen by the API", f"{len(calls)}")
        table.add_row("overlaps seen by the API", f"{self.api.overlaps}")
        table.add_row("max concurrency seen", f"{self.api.max_concurrency}")
        table.add_row("handoff gap p50 (ms)", ms(percentile(gaps_ms, 50)))
        table.add_row("handoff gap p99 (ms)", ms(percentile(gaps_ms, 99)))
        table.add_row("handoff gap p50, queue not empty (ms)", ms(percentile(backlog_gaps_ms, 50)))
        table.add_row("handoff gap p99, queue not empty (ms)", ms(percentile(backlog_gaps_ms, 99)))
        table.add_row("wall time (s)", f"{wall_s:.1f}")
        self.console.print()
        self.console.print(table)

        wrong = list(errors)
        if problem:
            wrong.append(problem)
        if timed_out:
            wrong.append(f"timed out after {self.args.timeout:g} s with {unfinished + (total - len(ids))} "
                         f"callout(s) unfinished")
        if len(ids) < total and not timed_out and not problem:
            wrong.append(f"only {len(ids)} of {total} callouts were published")
        if failed:
            wrong.append(f"{failed} callout(s) failed (see {self.worker.log_path})")
        if self.api.overlaps:
            wrong.append(f"the API saw {self.api.overlaps} overlapping call(s) "
                         f"(max concurrency {self.api.max_concurrency})")
        if not wrong and succeeded != total:
            wrong.append(f"{succeeded} of {total} callouts succeeded")
        if wrong:
            self.say("FAILED: " + "; ".join(wrong))
            return EXIT_CHECK_FAILED
        note = f" ({repeated} repeated Idempotency-Key(s) at the API)" if repeated else ""
        self.say(f"OK: all {total} callouts succeeded, one at a time, no overlap{note}. "
                 f"Logs kept in {self.log_dir}")
        return EXIT_OK

    # teardown --------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Stop everything this run started, by pid; bounded; never raises."""
        stopped = []
        for proc in self.producers:
            try:
                if proc.is_alive():
                    proc.terminate()
            except Exception:
                pass
        for proc in (self.worker, self.beat):
            if proc is not None:
                proc.terminate()
        for proc in (self.worker, self.beat):
            if proc is not None:
                try:
                    rc = proc.finish(timeout_s=15.0)
                    stopped.append(f"{proc.name} ({rc})")
                except Exception as exc:
                    self.say(f"could not stop the {proc.name} (pid {proc.pid}): {exc}")
        for proc in self.producers:
            try:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5)
            except Exception:
                pass
        if self.producers:
            stopped.append(f"{len(self.producers)} producers")
        if self.result_app is not None:
            try:
                self.result_app.close()
            except Exception:
                pass
        if self.api is not None:
            try:
                self.api.stop()
                stopped.append("api")
            except Exception:
                pass
        if self.redis_server is not None:
            try:
                self.redis_server.close()
                stopped.append("redis-server")
            except Exception as exc:
                self.say(f"could not stop redis-server (pid {self.redis_server.proc.pid}): {exc}")
        if stopped:
            self.say("stopped: " + ", ".join(stopped))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo.run",
                                description="Many producers, one serial worker, a fragile API: "
                                            "callouts run one at a time.")
    p.add_argument("--producers", type=int, default=4, help="producer processes (default 4)")
    p.add_argument("--per-producer", type=int, default=12, help="callouts each producer publishes (default 12)")
    p.add_argument("--max-gap", type=float, default=2.0,
                   help="each producer sleeps a random 0..MAX_GAP seconds before each publish (default 2.0)")
    p.add_argument("--min-delay", type=float, default=0.2, help="shortest API call, seconds (default 0.2)")
    p.add_argument("--max-delay", type=float, default=1.0, help="longest API call, seconds (default 1.0)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="give up when callouts are still unfinished after this many seconds (default 600)")
    p.add_argument("--ready-timeout", type=float, default=30.0,
                   help="how long to wait for the worker to be ready (default 30)")
    args = p.parse_args(argv)
    if args.producers < 1 or args.per_producer < 1:
        p.error("--producers and --per-producer must be at least 1")
    if args.max_gap < 0 or args.min_delay < 0 or args.max_delay < args.min_delay:
        p.error("need --max-gap >= 0 and 0 <= --min-delay <= --max-delay")
    if args.timeout <= 0 or args.ready_timeout <= 0:
        p.error("--timeout and --ready-timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_sigterm(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    demo = Demo(args)
    rc = EXIT_CHECK_FAILED
    try:
        rc = demo.run()
    except SetupError as exc:
        demo.say(f"error: {exc}")
        rc = EXIT_SETUP
    except KeyboardInterrupt:
        demo.say("interrupted: stopping everything the demo started ...")
        rc = EXIT_INTERRUPTED
    except Terminated:
        demo.say("terminated: stopping everything the demo started ...")
        rc = EXIT_TERMINATED
    finally:
        # a second Ctrl-C or SIGTERM must not cut the (bounded) teardown short
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            demo.cleanup()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, previous)
    return rc


if __name__ == "__main__":
    sys.exit(main())
