"""The intake's ASGI application (Starlette): routes, JSON answers, Redis down as 503.

Every answer is JSON with an ``error`` field: null on success, otherwise what went wrong and
what to do about it (plus ``field`` when one argument, header or parameter is at fault). Redis
unreachable or refusing (connection refused, timeout, LOADING, OOM, READONLY, ...) is a 503 with
``Retry-After``, after the Redis client's own bounded retries — never a hang or a traceback;
anything unexpected is a 500 whose body names no internals (the log has the traceback).

Blocking work (Redis, publishing) runs in Starlette's thread pool; the event loop only reads
bodies (bounded while they arrive, so a huge body is refused without being held) and writes
answers.
"""
from __future__ import annotations

import functools
import ipaddress
import json
import logging

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from onelane.core.clients import client_for, redact_url
from onelane.core.keys import Keys
from onelane.core.settings import Settings, get_settings
from onelane.ops.intake import openapi
from onelane.ops.intake.accept import Intake, status_url
from onelane.ops.intake.auth import Auth
from onelane.ops.intake.errors import IntakeError, is_redis_down
from onelane.ops.intake.state import callout_state
from onelane.ops.intake.tokens import TokensFile
from onelane.ops.status import lanes_overview

log = logging.getLogger(__name__)

#: what a client is told to wait when Redis is down
REDIS_RETRY_AFTER_S = 2
_JSON_TYPES = ("application/json",)


def answer(body: dict, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _error_answer(exc: IntakeError) -> JSONResponse:
    return answer(exc.body(), exc.status, exc.headers)


def _redis_down_answer(exc: BaseException, settings: Settings) -> JSONResponse:
    log.warning("onelane: intake answered 503: Redis at %s is unavailable (%s: %s)",
                redact_url(settings.redis_url), type(exc).__name__, exc)
    return answer({"error": f"Redis is unavailable ({type(exc).__name__}); nothing was done — send the request "
                            f"again after {REDIS_RETRY_AFTER_S} s (operators: see the intake's log)"},
                  503, {"Retry-After": str(REDIS_RETRY_AFTER_S)})


def _loopback(host: str | None) -> bool:
    if host in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class IntakeApp:
    """The endpoints, with what they share: settings, Redis client, the Celery app, auth."""

    def __init__(self, settings: Settings, *, tokens: TokensFile | None, client=None, celery_app=None):
        if celery_app is None:
            from onelane.celery_app import app as celery_app
        self.s = settings
        self.keys = Keys(settings.key_prefix)
        self.client = client if client is not None else client_for(settings)
        self.auth = Auth(tokens, self.client, self.keys)
        self.intake = Intake(settings, self.client, celery_app)
        self.doc = openapi.document(settings)

    # -- plumbing ---------------------------------------------------------------------------------
    def endpoint(self, fn):
        """Every answer JSON: IntakeError as itself, Redis down as 503, anything else as a bare 500."""
        @functools.wraps(fn)
        async def run(request: Request):
            try:
                if self.auth.open and not _loopback((request.scope.get("server") or (None,))[0]):
                    raise IntakeError(403, "this intake runs without ONELANE_INTAKE_TOKENS_FILE and so answers on "
                                           "loopback only; give it a tokens file (`onelane intake token add`)")
                return await fn(request)
            except IntakeError as exc:
                return _error_answer(exc)
            except Exception as exc:  # noqa: BLE001 - the one place that turns failures into answers
                if is_redis_down(exc):
                    return _redis_down_answer(exc, self.s)
                log.exception("onelane: intake failed on %s %s", request.method, request.url.path)
                return answer({"error": "the intake failed unexpectedly; nothing may have been published — "
                                        "check GET /v1/callouts/<task_id> or retry with the same Idempotency-Key "
                                        "(the intake's log has the details)"}, 500)
        return run

    async def read_json(self, request: Request, limit: int):
        """The request body as JSON: 415 if not sent as JSON, 413 above ``limit`` bytes, 400 if not JSON."""
        ctype = request.headers.get("content-type")
        if ctype:
            media = ctype.split(";", 1)[0].strip().lower()
            if media not in _JSON_TYPES and not media.endswith("+json"):
                raise IntakeError(415, f"the body is sent as {media!r}; send JSON with "
                                       "'Content-Type: application/json'", field="Content-Type")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise IntakeError(413, f"the body is {declared} bytes, above the limit of {limit}; send less "
                                   "(split a batch, or shrink the callout)", field="body")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise IntakeError(413, f"the body is above the limit of {limit} bytes; send less", field="body")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise IntakeError(400, "the body is empty; send the callout as a JSON object, e.g. "
                                   '{"url": "https://api.example.com/orders", "json": {"order": 42}}', field="body")
        try:
            return json.loads(raw, parse_constant=_no_constants)
        except (ValueError, RecursionError) as exc:
            raise IntakeError(400, f"the body is not valid JSON ({str(exc)[:200]}); send a JSON object",
                              field="body") from None

    def idempotency_key(self, request: Request) -> str | None:
        values = request.headers.getlist("idempotency-key")
        if len(values) > 1:
            raise IntakeError(422, "send one Idempotency-Key header, not several", field="Idempotency-Key")
        if not values:
            return None
        if not values[0].strip():
            raise IntakeError(422, "the Idempotency-Key header is empty; give a key (at most 200 characters) "
                                   "or leave the header out", field="Idempotency-Key")
        return values[0]

    def _lane_request(self, request: Request):
        entry = self.auth.identify(request.headers.get("authorization"))
        lane = request.path_params["lane"]
        self.auth.check_lane(entry, lane)
        return entry, lane

    # -- endpoints ------------------------------------------------------------------------------------
    async def post_callout(self, request: Request):
        entry, lane = self._lane_request(request)
        key = self.idempotency_key(request)
        body = await self.read_json(request, self.s.max_message_bytes)

        def work():
            self.auth.charge(entry)
            return self.intake.accept(lane, body, idempotency_key=key)

        accepted = await run_in_threadpool(work)
        headers = {"Location": status_url(accepted.task_id)} if not accepted.duplicate else None
        return answer(accepted.body(), accepted.status, headers)

    async def post_batch(self, request: Request):
        entry, lane = self._lane_request(request)
        key = self.idempotency_key(request)
        body = await self.read_json(request, self.s.intake_max_batch_bytes)
        items = body.get("callouts") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items or set(body) != {"callouts"}:
            raise IntakeError(422, 'the body must be {"callouts": [callout, ...]} with at least one callout and '
                                   "nothing else", field="callouts")
        if len(items) > self.s.intake_max_batch:
            raise IntakeError(413, f"{len(items)} callouts in one batch; at most {self.s.intake_max_batch} "
                                   "(ONELANE_INTAKE_MAX_BATCH): split it", field="callouts")

        def work():
            self.auth.charge(entry)
            return self.intake.accept_batch(lane, items, idempotency_key=key)

        results = await run_in_threadpool(work)
        accepted = sum(1 for r in results if r["status"] == 202)
        duplicates = sum(1 for r in results if r["status"] == 200)
        rejected = len(results) - accepted - duplicates
        status = 202 if accepted else 200 if duplicates else 422
        headers = None
        worst = max(r["status"] for r in results)
        if status == 422 and worst >= 500:  # nothing accepted because Redis failed (or the intake did)
            status = worst
            if worst == 503:
                headers = {"Retry-After": str(REDIS_RETRY_AFTER_S)}
        error = None
        if rejected:
            error = (f"{rejected} of {len(results)} callouts were not accepted; items[i].error says why for each "
                     f"(the {accepted + duplicates} others were accepted — do not send those again)")
        return answer({"lane": lane, "accepted": accepted, "duplicates": duplicates, "rejected": rejected,
                       "items": results, "error": error}, status, headers)

    async def get_callout(self, request: Request):
        entry = self.auth.identify(request.headers.get("authorization"))
        task_id = request.path_params["task_id"]

        def work():
            self.auth.charge(entry)
            return callout_state(self.client, self.keys, task_id, redact=self.s.redact_headers)

        state = await run_in_threadpool(work) if len(task_id) <= 200 else None
        if state is None:
            raise IntakeError(404, f"no callout {task_id[:200]!r} was accepted by the intake in the last "
                                   f"{self.s.dedupe_window_s} s (ONELANE_DEDUPE_WINDOW); check the task id")
        if not entry.allows(state["lane"]):
            raise IntakeError(403, f"token {entry.name!r} may not use lane {state['lane']!r}, where this callout is")
        return answer(state)

    async def get_lanes(self, request: Request):
        entry = self.auth.identify(request.headers.get("authorization"))

        def work():
            self.auth.charge(entry)
            return lanes_overview(self.client, self.keys, self.s)

        lanes = await run_in_threadpool(work)
        return answer({"lanes": [x for x in lanes if entry.allows(x["name"])], "error": None})

    async def healthz(self, request: Request):
        return answer({"status": "up", "error": None})

    async def readyz(self, request: Request):
        await run_in_threadpool(self.client.ping)
        return answer({"status": "ready", "error": None})

    async def openapi_json(self, request: Request):
        return answer(self.doc)

    # -- the Starlette app ------------------------------------------------------------------------------
    def asgi(self) -> Starlette:
        e = self.endpoint
        routes = [
            Route("/v1/lanes/{lane}/callouts", e(self.post_callout), methods=["POST"]),
            Route("/v1/lanes/{lane}/callouts:batch", e(self.post_batch), methods=["POST"]),
            Route("/v1/callouts/{task_id}", e(self.get_callout), methods=["GET"]),
            Route("/v1/lanes", e(self.get_lanes), methods=["GET"]),
            Route("/healthz", e(self.healthz), methods=["GET"]),
            Route("/readyz", e(self.readyz), methods=["GET"]),
            Route("/openapi.json", self.openapi_json, methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """The router's own answers (no such path 404, wrong method 405), as JSON."""
    if exc.status_code == 404:
        msg = f"no such endpoint: {request.method} {request.url.path}; see /openapi.json"
    elif exc.status_code == 405:
        msg = f"{request.method} is not allowed on {request.url.path}; allowed: {(exc.headers or {}).get('Allow', '?')}"
    else:
        msg = str(exc.detail)
    return answer({"error": msg}, exc.status_code, exc.headers)


def create_app() -> Starlette:
    """The application as uvicorn's factory builds it in each worker process, from the environment.

    With ONELANE_INTAKE_TOKENS_FILE every request needs a token from it; without one the app answers
    only requests that arrive on a loopback address (``onelane intake`` refuses to bind elsewhere).
    """
    s = get_settings()
    tokens = None
    if s.intake_tokens_file:
        tokens = TokensFile(s.intake_tokens_file)
        tokens.load()
    return IntakeApp(s, tokens=tokens).asgi()
