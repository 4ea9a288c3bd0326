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


class SentinelCluster:
    """A master, its replicas and three sentinels, each a private process on a free port.

    ``url`` is the sentinel:// REDIS_URL (with ``master_name``); ``master``/``replicas`` are
    the RedisServer objects as started (after a failover, ``current_master()`` says which
    one the sentinels name).
    """

    def __init__(self, *, replicas: int = 1, master_name: str = "mymaster", down_after_ms: int = 1000,
                 replica_args: tuple = ()):
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        # a replica that must resync with a new master after a failover does so at once, not after
        # Redis's default 5 s wait for more replicas to join a diskless sync
        quick_sync = ("--repl-diskless-sync-delay", "0")
        self.master = RedisServer(appendonly=True, extra_args=quick_sync)
        self.replicas = [RedisServer(appendonly=True, extra_args=(*quick_sync, "--replicaof", "127.0.0.1",
                                                                  str(self.master.port), *replica_args))
                         for _ in range(replicas)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.dir = tempfile.mkdtemp(prefix="onelane-sentinels-")
        self.sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{p}" for p in self.sentinel_ports)

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    def start(self, timeout_s: float = 30.0) -> "SentinelCluster":
        self.master.start()
        for r in self.replicas:
            r.start()
        for i, port in enumerate(self.sentinel_ports):
            conf = os.path.join(self.dir, f"sentinel-{port}.conf")
            with open(conf, "w") as f:
                f.write(f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {self.dir}\n"
                        f"logfile {os.path.join(self.dir, f'sentinel-{port}.log')}\n"
                        f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 2\n"
                        f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                        f"sentinel failover-timeout {self.master_name} 5000\n"
                        f"sentinel parallel-syncs {self.master_name} 1\n")
            self.sentinels.append(subprocess.Popen([shutil.which("redis-server"), conf, "--sentinel"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                   start_new_session=True))
        self.wait_settled(timeout_s)
        return self

    def _sentinel(self, port: int, *args):
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2,
                           decode_responses=True).execute_command(*args)

    def wait_settled(self, timeout_s: float) -> None:
        """Until every sentinel sees the master, all replicas in sync and the other two sentinels."""
        give_up = time.monotonic() + timeout_s
        while True:
            try:
                ok = True
                for port in self.sentinel_ports:
                    info = self._sentinel(port, "SENTINEL", "MASTER", self.master_name)
                    if isinstance(info, list):
                        info = dict(zip(info[::2], info[1::2]))
                    ok &= int(info["num-other-sentinels"]) >= 2 and int(info["num-slaves"]) >= len(self.replicas)
                    ok &= "s_down" not in info["flags"] and "o_down" not in info["flags"]
                if ok and self.replicas_in_sync():
                    return
            except Exception:
                pass
            if time.monotonic() > give_up:
                raise TimeoutError("the sentinels did not settle (see " + self.dir + ")")
            time.sleep(0.2)

    def current_master_port(self) -> int:
        host, port = self._sentinel(self.sentinel_ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(port)

    def current_master(self) -> RedisServer:
        port = self.current_master_port()
        return next(s for s in self.servers if s.port == port)

    def replicas_in_sync(self) -> bool:
        import redis

        try:
            info = redis.Redis(host="127.0.0.1", port=self.current_master_port(), socket_timeout=2).info("replication")
        except Exception:
            return False
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                  and v.get("state") == "online" and int(v.get("lag", 99)) <= 1]
        return info.get("role") == "master" and len(online) >= len(self.replicas)

    def wait_failover(self, old_port: int, timeout_s: float = 30.0) -> float:
        """Until the sentinels name a master other than ``old_port``; returns the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                if self.current_master_port() != old_port:
                    return time.monotonic() - started
            except Exception:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"no failover away from port {old_port} within {timeout_s} s")

    def failover(self) -> None:
        """A planned failover (SENTINEL FAILOVER)."""
        self._sentinel(self.sentinel_ports[0], "SENTINEL", "FAILOVER", self.master_name)

    def close(self) -> None:
        for p in self.sentinels:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        for s in self.servers:
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
