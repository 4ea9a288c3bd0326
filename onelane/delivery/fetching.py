"""The fetch of an onelane queue, as Redis steps; the worker side is :mod:`onelane.delivery.transport`.

A queue is two lists: its *ready list* (``Keys.ready``), then kombu's list, where producers
append. One script (``lua/fetch_next.lua``) moves what arrived in kombu's list to the ready
list, where callouts sharing a coalesce key coalesce (:mod:`onelane.delivery.coalescing`), and
takes the head of the ready list, recording it as unacked in the same step: a message is never
off both lists without being unacked. Reading a message's key is Python's part (cheap, in the
worker); the script checks that what it absorbs is still exactly what was read.

While the ready list holds callouts without a coalesce key, the *fast take* is one plain command
instead of the script: ``LMOVE`` from the head of the ready list into the worker's *fetch list*.
The message is then in the fetch list — never nowhere — and its callout runs from there (the
fetch list says whose it is): its success's ack removes it, in the outcome's transaction, and a
step that moves it from kombu's unacked copy (a give-back, a deferral) claims it first
(:func:`claim_fetched`: recorded as unacked, in kombu's layout, off the fetch list). A Lua script costs Redis several times a plain command on a
busy machine (README, "Where Redis's CPU goes"), and this one ran for every callout.

A worker's *fetch list* otherwise holds only a message the script could not read (handed to the
worker to dead-letter) or what an older onelane left there. Anything in it goes back to the head of
its queue: the worker's own when it (re)connects, with the ones it is running left alone; a worker's
that is gone, by the reaper (``lua/fetch_return.lua``), each callout whose attempt's deadline is
ahead once it has passed (:func:`return_fetched`).
"""
from __future__ import annotations

import json
import time

from dataclasses import dataclass

from onelane.core.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, Keys
from onelane.core.scripts import LuaScript, forget
from onelane.core.text import text
from onelane.delivery.coalescing import arrival
from onelane.delivery.inflight import MOVED, NOT_HELD, Requeue, requeue_at_head
from onelane.delivery.messages import parse_queued, task_id_of

_NEXT = LuaScript(__package__, "fetch_next")
_RETURN = LuaScript(__package__, "fetch_return")
_REAP = LuaScript(__package__, "fetch_reap")
_CLAIM = LuaScript(__package__, "claim_fetched")

#: the message property that carries, from the fast take to the task, the message as the fetch list
#: holds it (its success's ack removes it from there, and so does an ack or a requeue of a
#: message still there)
FETCHED = "onelane_fetched"

#: messages of kombu's list read (and checked for a coalesce key) per round trip
DRAIN_BATCH = 200
#: at most this many are moved to the ready list before a fetch takes one (the rest: next fetch)
DRAIN_BUDGET = 2000


@dataclass(frozen=True)
class Step:
    """What a fetch step came back with: ``msg`` (``message`` is taken and unacked), ``drain`` (read
    ``drained`` — kombu's oldest, newest first — and absorb them), ``empty``, or ``bad`` (``message``
    is unreadable, now in the fetch list)."""

    kind: str
    message: bytes | None = None
    drained: tuple = ()
    #: after a ``msg``: how many messages the ready list still holds
    ready_left: int = 0

    @classmethod
    def of(cls, reply) -> "Step":
        kind = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        if kind == "drain":
            return cls(kind, drained=tuple(reply[1]))
        return cls(kind, message=reply[1] if len(reply) > 1 else None,
                   ready_left=int(reply[2]) if len(reply) > 2 else 0)


class QueueFetch:
    """The fetch steps of one worker on one queue (the script's keys, built once)."""

    def __init__(self, keys: Keys, queue: str, fetch_list: str, *, receiver: str = ""):
        self.queue = queue
        self.fetch_list = fetch_list
        #: the worker token a take records as the message's receiver ('' = none: a lane's guard says who)
        self.receiver = receiver
        self.keys = [keys.queue_list(queue), keys.ready(queue), KOMBU_UNACKED, KOMBU_UNACKED_INDEX,
                     keys.coalesce_waiting(queue), keys.coalesce_started(queue), keys.coalesce_parked(queue),
                     keys.coalesce_newest(queue), keys.coalesce_key_of(queue), keys.coalesce_counts(queue),
                     fetch_list, keys.reserved(queue)]
        self.carried_prefix = keys.coalesce_carried(queue, "")

    def fast_take_command(self) -> list:
        """The plain take: the head of the ready list into this worker's fetch list (its reply: the
        message, or None when the ready list is empty). Its callout runs from there: the ack of
        its outcome removes it, a give-back or a deferral claims it first (:func:`claim_fetched`)."""
        return ["LMOVE", self.keys[1], self.fetch_list, "RIGHT", "LEFT"]

    def take_command(self, client) -> list:
        """The EVALSHA of a take, to send on the fetch connection (its reply: :meth:`Step.of`).
        Loads the script through ``client`` first if it has not (a NOSCRIPT reply: :meth:`load`)."""
        sha = _NEXT.loaded_sha(client)
        return ["EVALSHA", sha, len(self.keys), *self.keys, *self._args("take", drain_first=True)]

    @staticmethod
    def load(client) -> None:
        """Load the script into Redis's cache again (after a NOSCRIPT reply: a restart emptied it)."""
        forget(client)
        _NEXT.loaded_sha(client)

    def absorb(self, client, drained, *, drain_first: bool) -> Step:
        """Move ``drained`` (as a step read them: newest first) to the ready list, coalescing, then
        take the head (or read more first, with ``drain_first``). A message another worker took
        meanwhile is not absorbed twice: the script checks the list still ends with them."""
        oldest_first = list(reversed(drained))
        args = [*self._args("absorb", drain_first=drain_first), len(oldest_first)]
        for message in oldest_first:
            args += arrival(message).script_args(message)
        return Step.of(_NEXT(client, keys=self.keys, args=args))

    def _args(self, mode: str, *, drain_first: bool) -> list:
        now = time.time()
        return [mode, now, int(now * 1000), DRAIN_BATCH, "1" if drain_first else "0", self.carried_prefix,
                self.receiver]


def register_fetch_list(client, keys: Keys, *, queue: str, token: str) -> str:
    """Enter worker ``token``'s fetch list of ``queue`` in the index the reaper and a lane's next guard
    holder go by; return its key. A worker does as it connects, and again with each renewal of its
    presence: a reaper that took it for gone (its presence lapsed: a pause, Redis away) dropped its
    emptied fetch list from the index, and what it fetches next must not sit where nobody looks."""
    fetch_list = keys.fetch_list(queue, token)
    client.hset(keys.fetch_lists, fetch_list, json.dumps({"queue": queue, "token": token}))
    return fetch_list


def give_back(client, keys: Keys, *, fetch_list: str, queue: str, forget: bool,
              only: "list | None" = None) -> list[bytes]:
    """Move everything in ``fetch_list`` back to the head of ``queue`` (oldest first in line).

    With ``forget`` the fetch list is also dropped from the index (its worker is gone). With
    ``only`` (messages as the fetch list holds them, newest first), just those of them it still
    holds. Returns the messages moved. Atomic: each message moves once.
    """
    if only is not None and not only:
        return []
    return _RETURN(client, keys=[fetch_list, queue, keys.fetch_lists, keys.ready(queue)],
                   args=["1" if forget else "0", *(only or ())])


def fetched_of(message) -> str | None:
    """The message as the fetch list holds it, while only the fetch list does (a kombu message or its
    properties; None for a message the take script recorded as unacked itself)."""
    props = getattr(message, "properties", message)
    return props.get(FETCHED) if isinstance(props, dict) else None


def return_fetched(client, keys: Keys, owner_alive, *, queue: str) -> tuple[list[str], list[str]]:
    """Give the fetch lists of ``queue``'s workers that are gone back to the head of the queue; return
    the task ids moved and those left waiting.

    A callout stays in its worker's fetch list while it runs (its success's ack takes it from
    there): one whose attempt's deadline is still ahead is left where it is, since the API may still
    be working on it, and its fetch list stays in the index; a later pass moves it once the deadline
    has passed, dropping that attempt's in-flight record if it still names the worker that is gone
    (``lua/fetch_reap.lua``: one step per fetch list, on the Redis clock). ``owner_alive(token)``
    says whether a worker still counts as alive. Safe to run twice at once, and against a worker
    acknowledging or claiming: each message moves once, a message moved back is not delivered by its
    fetcher, and no other delivery's copy is touched.
    """
    moved_ids, waiting_ids = [], []
    for fetch_list, raw in client.hgetall(keys.fetch_lists).items():
        try:
            info = json.loads(raw)
            token = info["token"]
        except (ValueError, KeyError, TypeError):
            continue
        if info.get("queue") != queue or owner_alive(token):
            continue
        items = client.lrange(fetch_list, 0, -1)  # newest first
        id_of = {item: task_id_of(parse_queued(item) or {}) or "" for item in items}  # each parsed once
        task_ids = [id_of[item] for item in items]
        moved, waiting = _REAP(client, keys=[fetch_list, keys.queue_list(queue), keys.fetch_lists, keys.ready(queue),
                                             keys.inflight_index(queue), *[keys.inflight(t) for t in task_ids]],
                               args=[token, *items, *task_ids])
        moved_ids += [id_of.get(item) or "?" for item in moved]
        waiting_ids += [text(t) for t in waiting]
    return moved_ids, waiting_ids


def claim_fetched(client, keys: Keys, *, fetch_list: str, delivery_tag: str, message: str, exchange: str,
                  queue: str, receiver: str) -> bool:
    """Claim a message its worker runs from ``fetch_list``, before a step that moves it from kombu's
    unacked copy: recorded as unacked (with ``receiver`` on the bulk queue; '' on a lane), off the
    fetch list, in one step — only if the fetch list still held it. True again for the same claim
    run twice (a retry after a lost reply). False: it was given back meanwhile (its worker counted
    as gone), nothing was written, and the run must leave the message alone."""
    return bool(_CLAIM(client, keys=[fetch_list, KOMBU_UNACKED, KOMBU_UNACKED_INDEX, keys.reserved(queue)],
                       args=[message, delivery_tag, _unacked_value(message, exchange, queue), time.time(), receiver]))


def _unacked_value(message: str, exchange: str, routing_key: str) -> str:
    """A message's entry in kombu's unacked hash, as kombu writes it."""
    return f"[{message}, {json.dumps(exchange)}, {json.dumps(routing_key)}]"


def requeue_taken(client, keys: Keys, *, queue: str, delivery_tag: str, task_id: str, fetched: str | None = None,
                  owner: str = "") -> Requeue:
    """Put a message a worker took back at the head of ``queue``: from kombu's unacked copy, its task
    having claimed it (:func:`onelane.delivery.inflight.requeue_at_head`), or else, for a message the
    fast take delivered (``fetched``), from the fetch list of worker ``owner``. MOVED, or NOT_HELD
    when neither holds it any more (acknowledged, or moved back already)."""
    res = requeue_at_head(client, keys, queue=queue, delivery_tag=delivery_tag, task_id=task_id)
    if res == NOT_HELD and fetched is not None and give_back(
            client, keys, fetch_list=keys.fetch_list(queue, owner), queue=queue, forget=False, only=[fetched]):
        return MOVED
    return res
