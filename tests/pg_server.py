"""A private PostgreSQL server on a free port for the tests and the bench (never the shared one on 5432).

It uses the server binaries on the machine (Debian/Ubuntu: ``apt-get install -y postgresql``;
``.ci/run`` installs them when absent): ``initdb`` into a fresh directory, ``pg_ctl start`` on a
free port of 127.0.0.1 with a socket directory of its own, stopped by the postmaster's pid.
PostgreSQL refuses to run as root, so under root both run as the ``postgres`` user (``runuser``).
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from demo.redis_server import free_port
from tests.procs import alive


def bindir() -> Path:
    """The directory of initdb and pg_ctl: the newest /usr/lib/postgresql/*/bin, else the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("the PostgreSQL server binaries (initdb, pg_ctl) are not installed; "
                       "Debian/Ubuntu: apt-get install -y postgresql (.ci/run does this)")


class PostgresServer:
    """A throwaway PostgreSQL cluster: ``url(db)`` gives a SQLAlchemy URL for psycopg 3."""

    def __init__(self, *, port: int | None = None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="onelane-pg-")
        self.data = os.path.join(self.dir, "data")
        self.pid: int | None = None
        self._as_root = os.geteuid() == 0
        self._counter = 0

    def _run(self, *args: str, timeout_s: float = 120) -> None:
        cmd = [str(bindir() / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self, timeout_s: float = 60) -> "PostgresServer":
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        os.chmod(self.dir, 0o700)
        self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        return self._start(timeout_s)

    def restart(self, timeout_s: float = 60) -> "PostgresServer":
        """Stop (fast shutdown: every client connection is cut) and start again on the same port and data."""
        self.stop()
        return self._start(timeout_s)

    def _start(self, timeout_s: float) -> "PostgresServer":
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60")
        self._run("pg_ctl", "-D", self.data, "-o", opts, "-l", os.path.join(self.dir, "server.log"),
                  "-w", "-t", str(int(timeout_s)), "start", timeout_s=timeout_s + 10)
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        self._counter += 1
        name = f"{prefix}_{os.getpid()}_{self._counter}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self, timeout_s: float = 30) -> None:
        """Fast shutdown (SIGINT to the postmaster, by pid), SIGKILL if it hangs."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up and alive(pid):
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
