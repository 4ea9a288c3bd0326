"""Flow control of a queue: pause/resume (the kill switch) and the delay set of relaxed retries.

Pause is a key without expiry, so it survives worker restarts. A paused queue starts
no new callout: a task that finds its queue paused waits on the resume signal for a
moment, then gives its message back at the head of the queue (order and the message
kept), so nothing is lost and nothing stays unacknowledged for long.
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass

from onelane.core.clock import time_ms
from onelane.core.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, PRIORITY_LEVELS, Keys
from onelane.core.scripts import LuaScript
from onelane.core.text import text
from onelane.delivery import coalescing
from onelane.delivery.messages import mark_redelivered

_DEFER = LuaScript(__package__, "defer")
_PROMOTE = LuaScript(__package__, "promote_due")
_ABSORB = LuaScript(__package__, "absorb_priorities")


def pause(client, keys: Keys, queue: str, *, by: str = "") -> None:
    info = {"by": by or f"{socket.gethostname()}", "at": time.time()}
    client.set(keys.paused(queue), json.dumps(info))


def resume(client, keys: Keys, queue: str) -> bool:
    """Resume the queue; wake tasks waiting for it. False if it was not paused."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.paused(queue))
    pipe.lpush(keys.resumed_signal(queue), "1")
    pipe.ltrim(keys.resumed_signal(queue), 0, 0)
    pipe.pexpire(keys.resumed_signal(queue), 10_000)
    return bool(pipe.execute()[0])


def paused_info(client, keys: Keys, queue: str) -> dict | None:
    raw = client.get(keys.paused(queue))
    return json.loads(raw) if raw is not None else None


def wait_resumed(client, keys: Keys, queue: str, *, timeout_s: float) -> bool:
    """Block (on the resume signal, not polling) until the queue is not paused, or the timeout."""
    give_up = time.monotonic() + timeout_s
    while client.exists(keys.paused(queue)):
        left = give_up - time.monotonic()
        if left <= 0:
            return False
        client.blpop([keys.resumed_signal(queue)], timeout=min(left, 2.0))
    return True


def defer(client, keys: Keys, *, queue: str, delivery_tag: str, task_id: str, due_ms: int) -> bool:
    """Move this unacked message to the delay set, due at ``due_ms`` (Redis clock). Atomic."""
    for _ in range(3):
        raw = client.hget(KOMBU_UNACKED, delivery_tag)
        if raw is None:
            return False
        res = int(_DEFER(
            client,
            keys=[KOMBU_UNACKED, KOMBU_UNACKED_INDEX, keys.delayed(queue), keys.inflight(task_id),
                  keys.inflight_index(queue)],
            args=[delivery_tag, text(raw), mark_redelivered(text(raw)), int(due_ms), task_id],
        ))
        if res != -2:
            return res == 1
    return False


@dataclass(frozen=True)
class PendingMoves:
    """Whether the queue has due relaxed retries, and messages in kombu's priority sub-lists."""

    due: bool
    prioritised: bool


def pending_moves(client, keys: Keys, queue: str) -> PendingMoves:
    """One round trip of two plain reads: is there anything for :func:`promote_due` or
    :func:`absorb_priorities` to move? (The earliest due time is compared on the Redis clock.)"""
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.delayed(queue), 0, 0, withscores=True)
    pipe.exists(*[keys.priority_list(queue, level) for level in PRIORITY_LEVELS])
    pipe.time()
    first_due, prioritised, now = pipe.execute()
    due = bool(first_due) and first_due[0][1] <= time_ms(now)
    return PendingMoves(due=due, prioritised=bool(prioritised))


def promote_due(client, keys: Keys, queue: str, *, limit: int = 100, pipe=None) -> int | None:
    """Move due relaxed retries to the tail of the queue; return how many moved (queued on ``pipe``
    when given: None)."""
    script_keys, args = [keys.delayed(queue), keys.queue_list(queue)], [limit]
    if pipe is not None:
        _PROMOTE.queue_on(pipe, client, keys=script_keys, args=args)
        return None
    return int(_PROMOTE(client, keys=script_keys, args=args))


def absorb_priorities(client, keys: Keys, queue: str, *, limit: int = 100, pipe=None) -> int | None:
    """Move messages published with a priority (kombu's sub-lists) to the tail of the queue.

    Guarantee: a message a plain producer sent with ``priority=`` runs like any other, in
    the order kombu would serve it (the queue's own messages first, then level by level,
    oldest first); each moves once (one script). Returns how many moved.
    """
    sub_lists = [keys.priority_list(queue, level) for level in PRIORITY_LEVELS]
    script_keys = [keys.queue_list(queue), *sub_lists]
    if pipe is not None:
        _ABSORB.queue_on(pipe, client, keys=script_keys, args=[limit])
        return None
    return int(_ABSORB(client, keys=script_keys, args=[limit]))


def depth(client, keys: Keys, queue: str) -> int:
    """Messages waiting in the queue: its ready list and kombu's list, those published with a
    priority, and those parked behind their coalesce key's running callout."""
    pipe = client.pipeline(transaction=False)
    n = queue_depth_reads(pipe, keys, queue)
    return depth_from(pipe.execute()[:n])


def queue_depth_reads(pipe, keys: Keys, queue: str) -> int:
    """Queue on ``pipe`` the reads :func:`depth_from` needs (for one pipeline over many queues);
    returns how many replies they take."""
    pipe.llen(keys.ready(queue))
    pipe.llen(keys.queue_list(queue))
    for level in PRIORITY_LEVELS:
        pipe.llen(keys.priority_list(queue, level))
    pipe.hvals(keys.coalesce_parked(queue))
    return 3 + len(PRIORITY_LEVELS)


def depth_from(replies: list) -> int:
    """The depth from the replies of :func:`queue_depth_reads`."""
    *lengths, parked = replies
    return sum(lengths) + coalescing.parked_in(parked)


def head(client, keys: Keys, queue: str):
    """The message at the head of the queue (raw), or None: the ready list's, else kombu's."""
    pipe = client.pipeline(transaction=False)
    pipe.lindex(keys.ready(queue), -1)
    pipe.lindex(keys.queue_list(queue), -1)
    ready, queued = pipe.execute()
    return ready if ready is not None else queued


def waiting(client, keys: Keys, queue: str) -> list:
    """Every message of the ready list and kombu's list, head first (raw). Reads the whole queue:
    for tests and small queues, not for a hot path."""
    pipe = client.pipeline(transaction=False)
    pipe.lrange(keys.ready(queue), 0, -1)
    pipe.lrange(keys.queue_list(queue), 0, -1)
    ready, queued = pipe.execute()
    return [*reversed(ready), *reversed(queued)]
