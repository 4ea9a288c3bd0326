"""Coalescing: one call per record, carrying its newest arguments, however often it changed.

A callout may name a ``coalesce_key`` (a record: "order-42"). While a callout with key K
waits in its queue, a newer callout with key K on the same queue does not queue behind it:
the waiting one (the *carrier*) will send the newer arguments, at its own place in the queue,
and the newer task id is *carried* — it ends with the carrier's outcome, its result naming the
carrier (``coalesced_into``). A callout with key K that has started (taken by a worker, in
flight, or waiting for its retry) is never changed: a newer one waits behind it, and while it
runs a callout with key K that reaches the head of the queue is *parked* until it finishes, so
two callouts with one key never run at once, on a lane or on the bulk queue.

Where each piece lives (keys in :class:`onelane.core.keys.Keys`, ``coalesce_*``): the fetch
(``lua/fetch_next.lua``, run by :mod:`onelane.delivery.fetching`) reads every message that
arrives, so it sees a newer callout while its carrier still waits; it records the newest
arguments beside the carrier and swaps them in when the carrier is taken, in the same step
that records it as unacked. The callout's outcome transaction writes the outcomes of the ids it
carried and frees its key (:func:`queue_release`), so a worker killed at any point leaves each
version either sent, or recorded as carried by one that is sent.

Guarantees: a message without a valid key, or not a ``tasks.callout``, is never touched; keys
are per queue; the carrier's task id (and so its default idempotency key) is the one sent.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
from dataclasses import dataclass

from onelane.core.keys import Keys
from onelane.core.outcome import FAILURE, SUCCESS, Outcome, count_batch_outcome
from onelane.core.scripts import LuaScript
from onelane.core.text import text, text_map

_RELEASE = LuaScript(__package__, "coalesce_release")

#: the task whose messages may coalesce (the public contract's name)
CALLOUT_TASK = "tasks.callout"
#: the longest coalesce key
MAX_COALESCE_KEY = 200
#: the argument's name, in tasks.callout's keyword arguments
ARGUMENT = "coalesce_key"


def coalesce_key_problem(value) -> str | None:
    """What is wrong with ``value`` as a coalesce key (None: nothing). One rule for the producer's
    check, the task's and the fetch's, so a key the fetch honours is one the task accepts."""
    if not isinstance(value, str) or not value:
        return f"must be a non-empty string, got {value!r}"[:300]
    if len(value) > MAX_COALESCE_KEY:
        return f"must be at most {MAX_COALESCE_KEY} characters, got {len(value)}"
    return None


# -- reading a message's key at the fetch --------------------------------------------------------
def _needles(word: bytes) -> tuple[bytes, ...]:
    """The base64 text ``word`` always turns into, at each of its three possible byte alignments."""
    out = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + word).rstrip(b"=")
        first = -(-8 * shift // 6)  # the first character made of the word's bits only
        last = 8 * (shift + len(word)) // 6  # one past the last such character
        out.append(encoded[first:last])
    return tuple(out)


#: ``"coalesce_key"`` inside a base64 body, whatever its offset: a cheap test before decoding
_NEEDLES = _needles(f'"{ARGUMENT}"'.encode())
_BODY = re.compile(rb'^\{"body"\s*:\s*"([^"]*)"')


@dataclass(frozen=True)
class Arrival:
    """What the fetch must know of a message it reads off kombu's list."""

    key: str = ""
    task_id: str = ""
    batch: str = ""
    #: never carries nor is carried, but still never runs beside its key's running callout: a copy
    #: delivered again (its data may be older than a waiting one's), or one with an expiry or an
    #: ETA (it may never run, and must not take newer data down with it)
    solo: bool = False

    def script_args(self, message: bytes) -> list:
        return [message, self.key, self.task_id, self.batch, "1" if self.solo else "0"]


NO_KEY = Arrival()


def arrival(message: bytes) -> Arrival:
    """The coalesce key (and task id, batch, redelivery) of a queued message; NO_KEY when it has
    no valid key, is not a JSON ``tasks.callout``, or is not laid out as kombu lays it out."""
    found = _BODY.match(message)
    if found is None or not any(n in found.group(1) for n in _NEEDLES):
        return NO_KEY  # the common case: no key, decided without decoding anything
    try:
        envelope = json.loads(message)
        headers, props = envelope.get("headers") or {}, envelope.get("properties") or {}
        if (headers.get("task") != CALLOUT_TASK or props.get("body_encoding") != "base64"
                or envelope.get("content-type") != "application/json"):
            return NO_KEY
        body = json.loads(base64.b64decode(found.group(1), validate=True))
        kwargs = body[1] if isinstance(body, list) and len(body) > 1 else None
        key = kwargs.get(ARGUMENT) if isinstance(kwargs, dict) else None
        task_id = headers.get("id")
    except (ValueError, TypeError, AttributeError, binascii.Error):
        return NO_KEY
    if coalesce_key_problem(key) is not None or not isinstance(task_id, str) or not task_id:
        return NO_KEY
    batch = headers.get("onelane_batch")
    info = props.get("delivery_info") or {}
    redelivered = bool(headers.get("redelivered") or (isinstance(info, dict) and info.get("redelivered")))
    return Arrival(key=key, task_id=task_id, batch=batch if isinstance(batch, str) else "",
                   solo=redelivered or bool(headers.get("expires") or headers.get("eta")))


# -- after the carrier's outcome ------------------------------------------------------------------
def carried_of(raws) -> list[dict]:
    """The task ids a carrier carries ([{id, batch}]), from its ``coalesce_carried`` list."""
    out = []
    for raw in raws or ():
        entry = json.loads(text(raw))
        if isinstance(entry, dict) and entry.get("id"):
            out.append(entry)
    return out


def read_carried(client, keys: Keys, *, queue: str, task_id: str, pipe=None):
    """The task ids ``task_id`` carries (queued on ``pipe`` when given: its reply goes to :func:`carried_of`)."""
    if pipe is not None:
        return pipe.lrange(keys.coalesce_carried(queue, task_id), 0, -1)
    return carried_of(client.lrange(keys.coalesce_carried(queue, task_id), 0, -1))


def queue_release(pipe, client, keys: Keys, *, queue: str, key: str, task_id: str) -> None:
    """Queue, on ``pipe``, the end of ``task_id``'s hold on ``key``: the key is free, the callouts
    with it parked meanwhile go back to the head of the queue (oldest first), and ``task_id``'s
    coalescing records go. Safe to repeat: a key held by another id is left alone."""
    _RELEASE.queue_on(pipe, client, keys=_release_keys(keys, queue, task_id), args=[key, task_id])


def release(client, keys: Keys, *, queue: str, key: str, task_id: str) -> int:
    """:func:`queue_release`, run now; returns how many parked callouts went back to the head."""
    return int(_RELEASE(client, keys=_release_keys(keys, queue, task_id), args=[key, task_id]))


def _release_keys(keys: Keys, queue: str, task_id: str) -> list[str]:
    return [keys.coalesce_started(queue), keys.coalesce_parked(queue), keys.ready(queue), keys.queue_list(queue),
            keys.coalesce_carried(queue, task_id), keys.coalesce_key_of(queue)]


def queue_carried_outcomes(pipe, keys: Keys, carried: list[dict], *, carrier: str, status: str, result: dict | None,
                           error: str | None, window_s: int, result_expires_s: int, now_ms: int) -> None:
    """Queue, on ``pipe``, the outcome of every task id ``carrier`` carried: the carrier's own,
    naming it — onelane's record (so a copy of a carried id never calls), Celery's result (SUCCESS
    with the carrier's result and ``coalesced_into``, or FAILURE), and its batch's count."""
    for entry in carried:
        task_id = entry["id"]
        if status == SUCCESS:
            own = {**(result or {}), "coalesced_into": carrier}
            outcome = Outcome(SUCCESS, task_id, result=own, coalesced_into=carrier)
            meta = _celery_meta(task_id, "SUCCESS", own)
        else:
            message = f"coalesced into {carrier}, which failed: {error}"
            outcome = Outcome(FAILURE, task_id, error=message, coalesced_into=carrier)
            meta = _celery_meta(task_id, "FAILURE", {"exc_type": "CalloutFailed", "exc_message": [message],
                                                     "exc_module": "onelane.core.errors"})
        pipe.set(keys.done(task_id), outcome.to_json(), ex=window_s)
        value = json.dumps(meta)
        pipe.set(Keys.celery_result(task_id), value, ex=result_expires_s)
        pipe.publish(Keys.celery_result(task_id), value)  # wakes a producer waiting in AsyncResult.get()
        if entry.get("batch"):
            count_batch_outcome(pipe, keys, entry["batch"], "done" if status == SUCCESS else "dead_lettered",
                                now_ms=now_ms)


def _celery_meta(task_id: str, state: str, result) -> dict:
    """Celery's result record (JSON serializer), as its Redis backend writes it."""
    return {"status": state, "result": result, "traceback": None, "children": [],
            "date_done": datetime.datetime.now(datetime.timezone.utc).isoformat(), "task_id": task_id}


# -- what status shows, and the reaper's safety net ----------------------------------------------
@dataclass(frozen=True)
class CoalescingView:
    coalesced: int  #: task ids carried by another since the queue first coalesced
    waiting_keys: int  #: keys with a callout waiting to start
    started_keys: int  #: keys with a callout taken and not finished
    parked: int  #: callouts waiting for their key's running callout

    def to_dict(self) -> dict:
        return {"coalesced": self.coalesced, "waiting_keys": self.waiting_keys, "started_keys": self.started_keys,
                "parked": self.parked}


def view(client, keys: Keys, queue: str) -> CoalescingView:
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.coalesce_counts(queue), "coalesced")
    pipe.hlen(keys.coalesce_waiting(queue))
    pipe.hlen(keys.coalesce_started(queue))
    pipe.hvals(keys.coalesce_parked(queue))
    coalesced, waiting, started, parked = pipe.execute()
    return CoalescingView(coalesced=int(coalesced or 0), waiting_keys=int(waiting), started_keys=int(started),
                          parked=sum(len(json.loads(text(v))) for v in parked))


def parked_count(client, keys: Keys, queue: str) -> int:
    """Callouts parked behind their key's running callout (they count in the queue's depth)."""
    return parked_in(client.hvals(keys.coalesce_parked(queue)))


def parked_in(values) -> int:
    """The parked callouts in an HVALS reply of a queue's parked hash."""
    return sum(len(json.loads(text(v))) for v in values)


def release_stale(client, keys: Keys, *, queue: str, stale_after_ms: int, now_ms: int, window_s: int,
                  result_expires_s: int, is_held) -> list[str]:
    """Free the keys of callouts that will never finish: taken more than ``stale_after_ms`` ago
    and held nowhere now (``is_held(task_id, delivery_tag)``: unacked or in flight) — a message
    revoked, expired or purged after it was taken. The ids such a callout carried end FAILURE.
    Returns the keys freed."""
    freed = []
    for key, raw in text_map(client.hgetall(keys.coalesce_started(queue))).items():
        try:
            hold = json.loads(raw)
            task_id, tag, at = hold["id"], hold.get("tag") or "", int(hold.get("at") or 0)
        except (ValueError, KeyError, TypeError):
            continue
        if now_ms - at < stale_after_ms or is_held(task_id, tag):
            continue
        abandon(client, keys, queue=queue, key=key, task_id=task_id, window_s=window_s,
                result_expires_s=result_expires_s, now_ms=now_ms,
                why="it was taken by a worker and never finished (purged, or lost)")
        freed.append(key)
    return freed


def abandon(client, keys: Keys, *, queue: str, key: str, task_id: str, why: str, window_s: int,
            result_expires_s: int, now_ms: int) -> None:
    """A callout with a coalesce key that will never run (revoked, expired, lost): the ids it
    carried end FAILURE saying ``why``, and its key is free again. Safe to repeat."""
    carried = read_carried(client, keys, queue=queue, task_id=task_id)
    pipe = client.pipeline(transaction=True)
    queue_carried_outcomes(pipe, keys, carried, carrier=task_id, status=FAILURE, result=None, error=why,
                           window_s=window_s, result_expires_s=result_expires_s, now_ms=now_ms)
    queue_release(pipe, client, keys, queue=queue, key=key, task_id=task_id)
    pipe.execute()
