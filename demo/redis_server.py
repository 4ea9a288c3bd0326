"""Start, stop and restart a private ``redis-server`` on a free port (never the shared one).

Used by the test session and by ``make demo``. Every server is stopped by its pid.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS redis-server: its certificate and key, and the CA that signed it."""

    cert: str
    key: str
    ca: str

    @classmethod
    def self_signed(cls, directory: str) -> "TLSFiles":
        """Make a CA and a certificate for 127.0.0.1/localhost signed by it (needs the openssl command)."""
        d = Path(directory)
        ca, ca_key, cert, key, csr = (str(d / n) for n in ("ca.pem", "ca.key", "redis.pem", "redis.key", "redis.csr"))
        ext = d / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

        def run(*args):
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
            "-subj", "/CN=onelane test CA")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
        run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
            "-extfile", str(ext))
        return cls(cert=cert, key=key, ca=ca)


class RedisServer:
    """A redis-server child process with its own directory; AOF on by default."""

    def __init__(self, *, port: int | None = None, appendonly: bool = True, appendfsync: str = "everysec",
                 password: str | None = None, workdir: str | None = None, tls: "TLSFiles | None" = None,
                 extra_args: tuple = ()):
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = password
        self.tls = tls
        self.extra_args = list(extra_args)
        self.dir = workdir or tempfile.mkdtemp(prefix="onelane-redis-")
        self._own_dir = workdir is None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0, *, wait: bool = True) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server is not on the PATH; install it (Debian/Ubuntu: apt-get install -y redis-server) "
                "or set REDIS_URL to a reachable Redis"
            )
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", self.appendfsync, "--daemonize", "no", "--protected-mode", "no",
                "--logfile", os.path.join(self.dir, "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:  # TLS only: the plain port is closed
            args[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", self.tls.cert, "--tls-key-file", self.tls.key,
                     "--tls-ca-cert-file", self.tls.ca, "--tls-auth-clients", "no"]
        args += self.extra_args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        if wait:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir}/redis.log")
            if self.ping():
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout_s} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                s = raw
                if self.tls:
                    ctx = ssl.create_default_context(cafile=self.tls.ca)
                    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)

    def restart(self, *, kill: bool = False, empty: bool = False, extra_args: tuple | None = None,
                wait: bool = True) -> None:
        """Stop (SIGKILL when ``kill``) and start again on the same port and data directory — with
        ``empty``, without its data (as a Redis without persistence comes back)."""
        self.stop(kill=kill)
        if empty:
            for name in os.listdir(self.dir):
                if name != "redis.log":
                    path = os.path.join(self.dir, name)
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        if extra_args is not None:
            self.extra_args = list(extra_args)
        self.start(wait=wait)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
