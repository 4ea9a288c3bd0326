"""`onelane intake` as a real process on a free port, stopped by pid; a keep-alive client for it."""
from __future__ import annotations

import os
import subprocess
import tempfile

import requests

from demo.processes import stop_group
from demo.redis_server import free_port
from tests.procs import ROOT, VENV_BIN, wait_for

ONELANE = str(VENV_BIN / "onelane")


class IntakeProcess:
    """``onelane intake --host 127.0.0.1 --port <free>`` in its own session, logging to a file."""

    def __init__(self, env: dict, *, host: str = "127.0.0.1", port: int | None = None, extra: list[str] | None = None):
        self.env = env
        self.host = host
        self.port = port or free_port()
        self.extra = extra or []
        fd, self.log_path = tempfile.mkstemp(prefix="onelane-intake-", suffix=".log")
        os.close(fd)
        self.proc: subprocess.Popen | None = None
        self.session = requests.Session()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True, timeout_s: float = 30.0) -> "IntakeProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [ONELANE, "intake", "--host", self.host, "--port", str(self.port), *self.extra],
            cwd=str(ROOT), env=self.env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        if wait_ready:
            wait_for(self._up, timeout_s, 0.05, f"the intake on port {self.port} to answer /healthz")
        return self

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the intake exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def call(self, method: str, path: str, *, token: str | None = None, headers: dict | None = None,
             timeout_s: float = 15, **kw) -> requests.Response:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        return self.session.request(method, f"{self.url}{path}", headers=h, timeout=timeout_s, **kw)

    def post(self, lane: str, callout, *, token: str | None, key: str | None = None, **kw) -> requests.Response:
        headers = {"Idempotency-Key": key} if key is not None else {}
        return self.call("POST", f"/v1/lanes/{lane}/callouts", token=token, headers=headers, json=callout, **kw)

    def stop(self, grace_s: float = 10.0) -> int | None:
        self.session.close()
        if self.proc is None:
            return None
        code = stop_group(self.proc, grace_s=grace_s)
        self._log.close()
        return code
