"""One HTTP attempt with a hard total deadline.

``requests`` only bounds each socket operation; a server that trickles bytes can
keep a call alive far past its timeout. Here a watchdog shuts the socket down when
the deadline passes, wherever the attempt is (sending, waiting for headers, reading
the body), so an attempt never outlives its deadline by more than the watchdog's
wake-up latency. That is what lets a lease expire safely at the deadline.

Known limit: name resolution (getaddrinfo) cannot be interrupted; the connect
timeout covers the TCP handshake, not a hanging resolver.
"""
from __future__ import annotations

import socket
import threading
from http import cookiejar
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_current = threading.local()


class _Attempt:
    """The connection an attempt is using, so the watchdog can cut it at the deadline."""

    def __init__(self, policy=None):
        self.policy = policy
        self.conn = None
        self.aborted = False
        self._lock = threading.Lock()

    def use(self, conn) -> None:
        with self._lock:
            self.conn = conn
            if self.aborted:
                _shutdown(conn)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self.conn is not None:
                _shutdown(self.conn)


def _shutdown(conn) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Tracked:
    def request(self, *args, **kwargs):
        attempt = getattr(_current, "attempt", None)
        if attempt is not None:
            attempt.use(self)
        return super().request(*args, **kwargs)

    def _new_conn(self):
        # Resolve and check the address here, then connect to that very address: a DNS
        # answer that changes between check and connect cannot reach a private network.
        attempt = getattr(_current, "attempt", None)
        policy = attempt.policy if attempt is not None else None
        if policy is not None:
            addr = policy.pick_address(self.host, self.port)
            if addr is not None:
                self._dns_host = addr
        return super()._new_conn()


class _TrackedHTTPConnection(_Tracked, HTTPConnection):
    pass


class _TrackedHTTPSConnection(_Tracked, HTTPSConnection):
    pass


class _TrackedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _TrackedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _TrackedHTTPPool, "https": _TrackedHTTPSPool}


@dataclass
class Response:
    """What one attempt got back."""

    url: str
    status_code: int
    headers: dict
    body: bytes
    truncated: bool
    elapsed_ms: float
    encoding: str | None
    content_type: str


class DeadlineExceeded(requests.Timeout):
    """Raised when an attempt was cut off at its hard deadline."""


class RedirectRefused(requests.RequestException):
    """Raised when the API redirects to another host and the policy does not allow following it."""


REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
#: headers never carried to another host on a redirect
_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")


def is_name_resolution_error(exc: BaseException) -> bool:
    """True when the host name could not be resolved (a permanent error for this call)."""
    from urllib3.exceptions import NameResolutionError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (NameResolutionError, socket.gaierror)):
            return True
        for arg in getattr(exc, "args", ()):
            if isinstance(arg, BaseException) and is_name_resolution_error(arg):
                return True
        reason = getattr(exc, "reason", None)
        if isinstance(reason, BaseException) and is_name_resolution_error(reason):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _NoCookies(cookiejar.DefaultCookiePolicy):
    """Refuse to keep or send any cookie: each callout stands alone.

    One session (one connection pool) serves every callout of a process; a cookie an API
    sets on one response must never ride along on later callouts, to it or to anyone else.
    """

    def set_ok(self, cookie, request):
        return False

    def return_ok(self, cookie, request):
        return False


_sessions: dict[int, requests.Session] = {}


def session() -> requests.Session:
    """One keep-alive session per process: connections are reused between callouts, cookies never."""
    import os

    pid = os.getpid()
    s = _sessions.get(pid)
    if s is None:
        s = requests.Session()
        # one session per process; a thread-pool worker shares it, so room for every thread
        adapter = _DeadlineAdapter(pool_connections=16, pool_maxsize=64, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        s.trust_env = False
        s.cookies.set_policy(_NoCookies())
        _sessions.clear()
        _sessions[pid] = s
    return s


def attempt(
    method: str,
    url: str,
    *,
    timeout_s: float,
    headers: dict,
    params: dict | None = None,
    json=None,
    has_json: bool = False,
    data=None,
    max_bytes: int = 1 << 20,
    redirects: str = "same-host",
    egress=None,
) -> Response:
    """Send one request and read at most ``max_bytes`` of the body, all within ``timeout_s``.

    Redirects (up to 5) are followed within the same deadline: to the same scheme,
    host and port only with ``redirects="same-host"``, to any host with ``"any"``
    (credentials are dropped when the host changes), never with ``"none"`` (the 3xx
    is returned). Raises ``requests`` exceptions on failure; :class:`DeadlineExceeded`
    when the hard deadline cut the attempt off; :class:`RedirectRefused`;
    :class:`tasks.errors.EgressRefused` when ``egress`` (an EgressPolicy) refuses a
    host, checked on every hop before connecting and on the resolved address.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    if egress is not None:
        egress.check_url(url)
    handle = _Attempt(egress)
    _current.attempt = handle
    entry = _watchdog().arm(deadline, handle)
    try:
        kwargs = {"headers": headers, "params": params or None, "stream": True, "allow_redirects": False,
                  "timeout": (min(timeout_s, 10.0), timeout_s)}
        if has_json:
            kwargs["json"] = json
        elif data is not None:
            kwargs["data"] = data
        try:
            resp = session().request(method, url, **kwargs)
            hops = 0
            while redirects != "none" and resp.status_code in REDIRECT_STATUSES and resp.headers.get("Location"):
                target = urljoin(resp.url, resp.headers["Location"])
                resp.close()
                if hops == MAX_REDIRECTS:
                    raise RedirectRefused(f"more than {MAX_REDIRECTS} redirects, last to {target}")
                same = _origin(target) == _origin(url)
                if not same and redirects != "any":
                    raise RedirectRefused(
                        f"redirected from {urlsplit(url).netloc} to another host ({target}); not followed. "
                        "Set ONELANE_REDIRECTS=any to follow redirects to other hosts"
                    )
                if egress is not None:
                    egress.check_url(target)
                if not same:
                    kwargs["headers"] = {k: v for k, v in kwargs["headers"].items()
                                         if k.lower() not in _CREDENTIAL_HEADERS}
                if resp.status_code == 303 or (resp.status_code in (301, 302) and method != "HEAD"):
                    method = "GET"
                    kwargs.pop("json", None)
                    kwargs.pop("data", None)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"no complete response within the {timeout_s:g} s deadline")
                kwargs["timeout"] = (min(left, 10.0), left)
                kwargs["params"] = None
                resp = session().request(method, target, **kwargs)
                url = target
                hops += 1
            try:
                body, truncated = _read(resp, deadline, max_bytes)
            finally:
                resp.close()
        except requests.RequestException as exc:
            if handle.aborted:
                raise DeadlineExceeded(f"no complete response within the {timeout_s:g} s deadline") from exc
            raise
        if handle.aborted:
            raise DeadlineExceeded(f"no complete response within the {timeout_s:g} s deadline")
        return Response(
            url=url,
            status_code=resp.status_code,
            headers=dict(resp.headers),
            body=body,
            truncated=truncated,
            elapsed_ms=(time.monotonic() - started) * 1000,
            encoding=resp.encoding,
            content_type=resp.headers.get("Content-Type", ""),
        )
    finally:
        _watchdog().disarm(entry)
        _current.attempt = None


class _Watchdog:
    """One thread per process that cuts attempts off at their deadlines (no thread per call)."""

    def __init__(self):
        import heapq
        import itertools

        self._heapq = heapq
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        threading.Thread(target=self._run, name="onelane-deadlines", daemon=True).start()

    def arm(self, deadline: float, handle: _Attempt):
        entry = [deadline, next(self._seq), handle]
        with self._cv:
            self._heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cv.notify()
        return entry

    def disarm(self, entry) -> None:
        with self._cv:
            entry[2] = None  # dropped lazily when it comes up

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                deadline, _, handle = self._heap[0]
                left = deadline - time.monotonic()
                if handle is not None and left > 0:
                    self._cv.wait(timeout=left)
                    continue
                self._heapq.heappop(self._heap)
            if handle is not None:
                handle.abort()


_watchdogs: dict[int, _Watchdog] = {}


def _watchdog() -> _Watchdog:
    import os

    pid = os.getpid()  # a forked pool child needs its own thread
    w = _watchdogs.get(pid)
    if w is None:
        _watchdogs.clear()
        w = _watchdogs[pid] = _Watchdog()
    return w


def _origin(url: str) -> tuple:
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return (p.scheme.lower(), (p.hostname or "").lower(), port)


def _read(resp, deadline: float, max_bytes: int) -> tuple[bytes, bool]:
    chunks, size = [], 0
    for chunk in resp.iter_content(chunk_size=65536):
        if time.monotonic() > deadline:
            raise DeadlineExceeded("the response body was still arriving at the deadline")
        room = max_bytes - size
        if len(chunk) > room:
            chunks.append(chunk[:room])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False
