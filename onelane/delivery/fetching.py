"""Fetch lists: where a worker's message sits between leaving the queue and being unacked.

The worker side is :mod:`onelane.delivery.transport` (kombu glue); these are the Redis steps it and
the reaper share, each one script (``lua/fetch_claim.lua``, ``lua/fetch_return.lua``).
"""
from __future__ import annotations

import json
import time

from redis.exceptions import NoScriptError

from onelane.core.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, Keys
from onelane.core.replication import Replicas
from onelane.core.scripts import LuaScript, forget
from onelane.delivery.messages import parse_queued, task_id_of

_CLAIM = LuaScript(__package__, "fetch_claim")
_RETURN = LuaScript(__package__, "fetch_return")


def claim(client, *, fetch_list: str, item: bytes, delivery_tag: str, unacked: str,
          replicas: Replicas = Replicas()) -> tuple[bool, bool]:
    """Record a fetched message as unacked and take it out of the fetch list, in one step.

    Returns (claimed, replicated): not claimed if the message is no longer in the fetch list
    (given back to its queue while the worker was cut off) — the worker must not deliver it;
    not replicated when fewer replicas than required confirmed the claim in time.
    """
    keys = [fetch_list, KOMBU_UNACKED, KOMBU_UNACKED_INDEX]
    args = [item, delivery_tag, unacked, time.time()]
    if replicas.needed <= 0:
        return bool(_CLAIM(client, keys=keys, args=args)), True
    pipe = client.pipeline(transaction=False)
    _CLAIM.queue_on(pipe, client, keys=keys, args=args)
    replicas.queue_wait(pipe)
    try:
        claimed, *confirmed = pipe.execute()
    except NoScriptError:
        forget(client)
        return claim(client, fetch_list=fetch_list, item=item, delivery_tag=delivery_tag, unacked=unacked,
                     replicas=replicas)
    return bool(claimed), replicas.confirmed(confirmed)


def give_back(client, keys: Keys, *, fetch_list: str, queue: str, forget: bool) -> list[bytes]:
    """Move everything in ``fetch_list`` back to the head of ``queue`` (oldest first in line).

    With ``forget`` the fetch list is also dropped from the index (its worker is gone).
    Returns the messages moved. Atomic: each message moves once.
    """
    return _RETURN(client, keys=[fetch_list, queue, keys.fetch_lists], args=["1" if forget else "0"])


def return_fetched(client, keys: Keys, owner_alive, *, queue: str) -> list[str]:
    """Give the fetch lists of ``queue``'s workers that are gone back to the head of the queue.

    ``owner_alive(token)`` says whether a worker still counts as alive. Returns the task
    ids moved. Safe to run twice at once, and against a worker claiming: each message
    moves once, and a message moved back is not delivered by its fetcher.
    """
    moved_ids = []
    for fetch_list, raw in client.hgetall(keys.fetch_lists).items():
        try:
            info = json.loads(raw)
            token = info["token"]
        except (ValueError, KeyError, TypeError):
            continue
        if info.get("queue") != queue or owner_alive(token):
            continue
        moved = give_back(client, keys, fetch_list=fetch_list, queue=queue, forget=True)
        for item in moved:
            moved_ids.append(task_id_of(parse_queued(item) or {}) or "?")
    return moved_ids
