"""A real local HTTP server that plays the fragile API.

It records every request (arrival, end, method, path, headers, body), and when
more than ``capacity`` calls (default 1) are in flight at once it counts an
overlap and answers 500, as the systems our users call do. Like a real server it
keeps working on a request after its client has gone away.

Per-request behaviour comes from the query string (``?delay=0.5&status=503``) or
from a script registered for an ``Idempotency-Key`` (a list of responses used in
turn); otherwise it answers 200 with a JSON body after ``delay_s`` (a number or a
callable returning one).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | dict | None = None
    headers: dict = field(default_factory=dict)
    delay_s: float | None = None
    #: stop working as soon as the client disconnects (most servers keep going)
    abort_on_disconnect: bool = False


@dataclass
class Call:
    seq: int
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes
    start: float
    end: float | None = None
    status: int | None = None
    overlapped: bool = False
    client_gone: bool = False

    @property
    def key(self) -> str | None:
        return self.headers.get("idempotency-key")

    @property
    def fence(self) -> int | None:
        v = self.headers.get("x-fencing-token")
        return int(v) if v is not None and v.isdigit() else None

    def json(self):
        return json.loads(self.body or b"null")


class FragileAPI:
    def __init__(self, *, port: int = 0, delay_s=0.0, capacity: int = 1, overload_status: int = 500):
        self.delay_s = delay_s
        self.capacity = capacity
        self.overload_status = overload_status
        self.calls: list[Call] = []
        self.overlaps = 0
        self.max_concurrency = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._scripts: dict[str, list[Reply]] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                api._serve(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="fragile-api", daemon=True)

    # -- control ---------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FragileAPI":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def script(self, idempotency_key: str, replies: list[Reply]) -> None:
        """Answer the next calls carrying this Idempotency-Key with these replies, in turn."""
        with self._lock:
            self._scripts[idempotency_key] = list(replies)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.overlaps = 0
            self.max_concurrency = 0
            self._scripts.clear()

    def calls_for(self, idempotency_key: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.key == idempotency_key]

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- serving ---------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if len(body) < length:  # the client went away before its request arrived whole (a killed
            h.close_connection = True  # worker between sending the headers and the body): no call
            return
        parts = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self._lock:
            self._in_flight += 1
            self.max_concurrency = max(self.max_concurrency, self._in_flight)
            overlapped = self._in_flight > self.capacity
            if overlapped:
                self.overlaps += 1
            call = Call(len(self.calls) + 1, h.command, parts.path, query, headers, body, time.time(),
                        overlapped=overlapped)
            self.calls.append(call)
            scripted = self._scripts.get(headers.get("idempotency-key", ""))
            reply = scripted.pop(0) if scripted else None
        finished = False
        try:
            if overlapped:
                reply = Reply(self.overload_status, {"error": "overloaded: too many calls in flight"},
                              delay_s=0.01)
            elif reply is None:
                reply = Reply(int(query.get("status", 200)), {"ok": True, "seq": call.seq, "fence": call.fence})
            delay = reply.delay_s
            if delay is None:
                delay = float(query["delay"]) if "delay" in query else (
                    self.delay_s() if callable(self.delay_s) else self.delay_s)
            if delay and reply.abort_on_disconnect:
                if self._sleep_unless_gone(h, delay):
                    call.client_gone = True
                    return
            elif delay:
                time.sleep(delay)  # keeps working even if the client is gone
            # The call ends as its answer goes out: a client holding the answer may call again at
            # once, and that is no overlap, however late this thread gets to run after writing.
            self._finish(call, reply)
            finished = True
            self._reply(h, reply, call)
        finally:
            if not finished:
                self._finish(call, reply)

    def _finish(self, call: Call, reply: "Reply | None") -> None:
        with self._lock:
            self._in_flight -= 1
            call.end = time.time()
            call.status = reply.status if reply else None

    @staticmethod
    def _sleep_unless_gone(h, delay: float) -> bool:
        """Sleep ``delay`` seconds; return True early if the client closed the connection."""
        import select
        import socket as _socket

        give_up = time.monotonic() + delay
        while (left := give_up - time.monotonic()) > 0:
            ready, _, _ = select.select([h.connection], [], [], min(left, 0.02))
            if ready:
                try:
                    if h.connection.recv(1, _socket.MSG_PEEK) == b"":
                        return True
                except OSError:
                    return True
        return False

    def _reply(self, h, reply: Reply, call: Call) -> None:
        body = reply.body
        ctype = reply.headers.get("Content-Type")
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            ctype = ctype or "application/json"
        elif isinstance(body, str):
            body = body.encode()
        body = body or b""
        try:
            h.send_response(reply.status)
            for k, v in reply.headers.items():
                if k.lower() != "content-type":
                    h.send_header(k, v)
            h.send_header("Content-Type", ctype or "text/plain; charset=utf-8")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            call.client_gone = True
