"""Accepting callouts over HTTP: validated as ``submit()`` validates, deduplicated per lane, published.

Guarantees:

* Validation is onelane's own (:func:`onelane.callout.validation.validate`): what the intake
  accepts, the worker runs; what it refuses never reaches a queue, let alone the API.
* Publishing is ``send_task("tasks.callout", kwargs=..., queue=<lane>)`` with the secrets of the
  arguments masked in what Flower and the logs show — the public contract, nothing else.
* An Idempotency-Key is claimed on its lane in one Redis script (SET NX of
  :meth:`Keys.intake_claim`) before anything is published: of many requests with the same key
  on the same lane within ONELANE_DEDUPE_WINDOW, exactly one publishes; the others get its task
  id (200) — or 422 if they carry a different callout, or 409 while the first is still being
  published. A publish that fails releases the claim, so the client's retry is not refused.
* A task id is answered only after its message is in Redis.

Limit: an intake killed between publishing and confirming its claim leaves a pending claim that
expires after :data:`PENDING_TTL_MS`; a retry after that publishes a second message with the same
idempotency key (the worker then skips it if the first succeeded, and the API sees the same
``Idempotency-Key`` either way).
"""
from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from urllib.parse import quote

import redis

from onelane.callout.validation import validate
from onelane.core.errors import ValidationError
from onelane.core.keys import Keys
from onelane.core.redaction import redact_kwargs
from onelane.core.scripts import LuaScript, forget
from onelane.core.settings import Settings
from onelane.core.text import text
from onelane.ops.intake.errors import IntakeError, is_redis_down

log = logging.getLogger(__name__)

_CLAIM = LuaScript(__package__, "intake_claim")
_SETTLE = LuaScript(__package__, "intake_settle")

#: how long a claim may stay pending (publish under way) before another request may take the key
PENDING_TTL_MS = 60_000
TASK_NAME = "tasks.callout"
#: the Idempotency-Key header of a batch request: item i without a key of its own gets "<header>:<i>"
BATCH_KEY_SEPARATOR = ":"


def status_url(task_id: str) -> str:
    return f"/v1/callouts/{quote(task_id, safe='')}"


@dataclass(frozen=True)
class Prepared:
    """A checked callout, ready to publish."""

    kwargs: dict
    #: the arguments as Flower and the logs show them (secret headers masked)
    shown: str
    idempotency_key: str | None
    #: what makes two requests with one key "the same callout"
    fingerprint: str


@dataclass(frozen=True)
class Accepted:
    task_id: str
    lane: str
    #: True when an earlier request with the same Idempotency-Key was accepted: nothing published now
    duplicate: bool = False

    @property
    def status(self) -> int:
        return 200 if self.duplicate else 202

    def body(self) -> dict:
        return {"task_id": self.task_id, "lane": self.lane, "status_url": status_url(self.task_id),
                "duplicate": self.duplicate, "error": None}


def prepare(body, *, header_key: str | None, settings: Settings, where: str = "") -> Prepared:
    """Check one callout (the request body, or one item of a batch); raise IntakeError 422/413 naming the field.

    ``header_key`` is the request's Idempotency-Key (for a batch item: the key derived from it).
    """
    at = f"{where}: " if where else ""
    if not isinstance(body, dict):
        raise IntakeError(422, f"{at}the callout must be a JSON object of tasks.callout arguments, "
                               f'e.g. {{"url": "https://api.example.com/orders", "json": {{...}}}}', field="body")
    kwargs = dict(body)
    if header_key is not None:
        own = kwargs.get("idempotency_key")
        if own is not None and own != header_key:
            raise IntakeError(422, f"{at}idempotency_key in the body differs from the Idempotency-Key header; "
                                   "send one of them", field="idempotency_key")
        kwargs["idempotency_key"] = header_key
    try:
        req = validate(kwargs, max_bytes=settings.max_message_bytes)
    except ValidationError as exc:
        if exc.field == "payload" and "above the limit" in exc.reason:
            raise IntakeError(413, f"{at}{exc}; send a smaller callout", field="payload") from None
        field = exc.field
        if field == "idempotency_key" and header_key is not None and body.get("idempotency_key") is None:
            return_field, message = "Idempotency-Key", f"the Idempotency-Key header {exc.reason}"
        else:
            return_field, message = field, str(exc)
        raise IntakeError(422, f"{at}{message}", field=return_field) from None
    clean = req.as_kwargs()
    same = {k: v for k, v in clean.items() if k != "idempotency_key"}
    fingerprint = hashlib.sha256(json.dumps(same, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return Prepared(kwargs=clean, shown=repr(redact_kwargs(clean, settings.redact_headers)),
                    idempotency_key=req.idempotency_key, fingerprint=fingerprint)


def _pending(task_id: str, fp: str) -> str:
    return json.dumps({"task_id": task_id, "fp": fp, "state": "pending"}, separators=(",", ":"))


def _published(task_id: str, fp: str) -> str:
    return json.dumps({"task_id": task_id, "fp": fp, "state": "published"}, separators=(",", ":"))


class Intake:
    """Accepts callouts for lanes and publishes them to Redis through the Celery app."""

    def __init__(self, settings: Settings, client, app):
        self.s = settings
        self.client = client
        self.app = app
        self.keys = Keys(settings.key_prefix)
        self.window_ms = settings.dedupe_window_s * 1000

    # -- one callout ---------------------------------------------------------------------------
    def accept(self, lane: str, body, *, idempotency_key: str | None) -> Accepted:
        """Validate, claim the key (if any), publish, confirm. Redis errors propagate (the app answers 503)."""
        c = prepare(body, header_key=idempotency_key, settings=self.s)
        task_id = str(uuid.uuid4())
        if c.idempotency_key is not None:
            reply = _CLAIM(self.client, keys=self._claim_keys(lane, c, task_id),
                           args=[_pending(task_id, c.fingerprint), PENDING_TTL_MS, lane, self.window_ms])
            if int(reply[0]) != 1:
                return self._existing(lane, c, text(reply[1]))
        else:
            self.client.set(self.keys.intake_task(task_id), lane, px=self.window_ms)
        try:
            self._send(lane, c, task_id)
        except BaseException:
            self._release([(lane, c, task_id)])
            raise
        if c.idempotency_key is not None:
            self._confirm([(lane, c, task_id)])
        return Accepted(task_id, lane)

    def _existing(self, lane: str, c: Prepared, raw: str) -> Accepted:
        """The answer to a request whose key is already claimed on the lane."""
        try:
            held = json.loads(raw)
        except ValueError:
            held = {}
        if held.get("fp") != c.fingerprint:
            raise IntakeError(422, f"Idempotency-Key {c.idempotency_key!r} was already used on lane {lane!r} for a "
                                   f"different callout (task {held.get('task_id')}); use a new key for a new callout",
                              field="Idempotency-Key")
        if held.get("state") != "published":
            raise IntakeError(409, f"a request with Idempotency-Key {c.idempotency_key!r} on lane {lane!r} is being "
                                   "accepted right now; retry in a second to get its task id", retry_after_s=1)
        return Accepted(held["task_id"], lane, duplicate=True)

    # -- a batch ---------------------------------------------------------------------------------
    def accept_batch(self, lane: str, items: list, *, idempotency_key: str | None) -> list[dict]:
        """Each item on its own: its answer (task id, or error with status) at its index; one bad item sinks none.

        Claims, task records and confirmations go in pipelines; publishing on one producer connection.
        A publish that fails (Redis gone) fails that item and the ones after it (503 each, claims released);
        those before it stay accepted.
        """
        out: list[dict | None] = [None] * len(items)
        ready: list[tuple[int, Prepared, str]] = []  # (index, callout, new task id)
        first_of_key: dict[str, int] = {}
        repeats: list[tuple[int, int]] = []  # (index, index of the earlier item with the same key)
        for i, item in enumerate(items):
            key = None
            if idempotency_key is not None and not (isinstance(item, dict) and item.get("idempotency_key")):
                key = f"{idempotency_key}{BATCH_KEY_SEPARATOR}{i}"
            try:
                c = prepare(item, header_key=key, settings=self.s, where=f"callouts[{i}]")
            except IntakeError as exc:
                out[i] = {"index": i, "status": exc.status, **exc.body()}
                continue
            if c.idempotency_key is not None and c.idempotency_key in first_of_key:
                repeats.append((i, first_of_key[c.idempotency_key]))
                ready.append((i, c, ""))
                continue
            if c.idempotency_key is not None:
                first_of_key[c.idempotency_key] = i
            ready.append((i, c, str(uuid.uuid4())))

        to_publish = self._claim_batch(lane, [r for r in ready if r[2]], out)
        self._publish_batch(lane, to_publish, out)
        by_index = {i: c for i, c, _ in ready}
        for i, j in repeats:  # the same key twice in one batch: the second is the first's duplicate
            first = out[j]
            if by_index[i].fingerprint != by_index[j].fingerprint:
                out[i] = {"index": i, "status": 422, "field": "idempotency_key",
                          "error": f"callouts[{i}]: idempotency key {by_index[i].idempotency_key!r} is used by "
                                   f"callouts[{j}] for a different callout; give each callout its own key"}
            elif first is not None and first.get("task_id"):
                out[i] = {**first, "index": i, "status": 200, "duplicate": True}
            else:
                out[i] = {**(first or {}), "index": i}
        return [o for o in out if o is not None]

    def _claim_batch(self, lane, ready, out) -> list[tuple[int, Prepared, str]]:
        keyed = [r for r in ready if r[1].idempotency_key is not None]
        plain = [r for r in ready if r[1].idempotency_key is None]
        pipe = self.client.pipeline(transaction=False)
        for _, c, tid in plain:
            pipe.set(self.keys.intake_task(tid), lane, px=self.window_ms)
        for _, c, tid in keyed:
            _CLAIM.queue_on(pipe, self.client, keys=self._claim_keys(lane, c, tid),
                            args=[_pending(tid, c.fingerprint), PENDING_TTL_MS, lane, self.window_ms])
        replies = pipe.execute(raise_on_error=False)
        errors = [r for r in replies if isinstance(r, Exception)]
        if any(isinstance(e, redis.exceptions.NoScriptError) for e in errors):
            forget(self.client)  # Redis restarted and lost its scripts: load them again, claim once more
            return self._claim_batch(lane, ready, out)
        if errors:  # Redis refused some: give back what was claimed, and the whole batch is refused
            self._release([(lane, c, tid) for (_, c, tid), r in zip(plain + keyed, replies)
                           if not isinstance(r, Exception)])
            raise errors[0]
        claimed = list(plain)
        for (i, c, tid), reply in zip(keyed, replies[len(plain):]):
            if int(reply[0]) == 1:
                claimed.append((i, c, tid))
                continue
            try:
                out[i] = {"index": i, "status": 200, **self._existing(lane, c, text(reply[1])).body()}
            except IntakeError as exc:
                out[i] = {"index": i, "status": exc.status, **exc.body()}
        return sorted(claimed, key=lambda r: r[0])  # published in the order of the batch

    def _publish_batch(self, lane, claimed, out) -> None:
        sent = 0
        failure = None
        try:
            with self.app.producer_or_acquire() as producer:
                for i, c, tid in claimed:
                    self._send(lane, c, tid, producer=producer)
                    out[i] = {"index": i, "status": 202, **Accepted(tid, lane).body()}
                    sent += 1
        except Exception as exc:  # Redis went away (or refused) mid-batch: the rest are not published
            failure = exc
            log.warning("onelane: intake batch for %r: %d of %d published, then %s: %s", lane, sent, len(claimed),
                        type(exc).__name__, exc, exc_info=not is_redis_down(exc))
        rest = claimed[sent:]
        for i, c, tid in rest:
            down = is_redis_down(failure)
            out[i] = {"index": i, "status": 503 if down else 500, "field": None,
                      "error": f"callouts[{i}]: not published ({'Redis is unavailable: ' if down else ''}"
                               f"{type(failure).__name__}); send it again"
                               + (" in a moment" if down else " (the intake's log has the details)")}
        self._release([(lane, c, tid) for _, c, tid in rest])
        self._confirm([(lane, c, tid) for _, c, tid in claimed[:sent] if c.idempotency_key is not None])

    # -- shared ---------------------------------------------------------------------------------
    def _claim_keys(self, lane: str, c: Prepared, task_id: str) -> list[str]:
        return [self.keys.intake_claim(lane, c.idempotency_key), self.keys.intake_task(task_id)]

    def _send(self, lane: str, c: Prepared, task_id: str, producer=None) -> None:
        self.app.send_task(TASK_NAME, kwargs=c.kwargs, queue=lane, task_id=task_id, retry=True,
                           kwargsrepr=c.shown, producer=producer)

    def _settle(self, entries, mode: str) -> None:
        if not entries:
            return
        pipe = self.client.pipeline(transaction=False)
        for lane, c, tid in entries:
            if c.idempotency_key is None:
                if mode == "release":
                    pipe.delete(self.keys.intake_task(tid))
                continue
            _SETTLE.queue_on(pipe, self.client, keys=self._claim_keys(lane, c, tid),
                             args=[_pending(tid, c.fingerprint), mode, _published(tid, c.fingerprint),
                                   self.window_ms])
        try:
            pipe.execute()
        except redis.exceptions.NoScriptError:
            forget(self.client)
            self._settle(entries, mode)

    def _release(self, entries) -> None:
        """Best effort: the callouts were not published; free their keys and task records."""
        try:
            self._settle(entries, "release")
        except redis.RedisError as exc:
            log.warning("onelane: intake could not release %d claim(s) (%s); they expire in %d s",
                        len(entries), exc, PENDING_TTL_MS // 1000)

    def _confirm(self, entries) -> None:
        try:
            self._settle(entries, "confirm")
        except redis.RedisError as exc:
            # the messages are out: answering 503 now would make the client publish them again
            log.warning("onelane: intake could not confirm %d idempotency claim(s) (%s); they expire in %d s",
                        len(entries), exc, PENDING_TTL_MS // 1000)
