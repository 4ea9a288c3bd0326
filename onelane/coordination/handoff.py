"""Slots handed on within one worker process: from a task whose attempt has ended to one waiting.

With a thread pool, many tasks of one process wait for slots of the same capped resource. One
of them waits in Redis (blocked on the release signal, :meth:`Semaphore.acquire`); the others
wait here, in the process (:func:`wait`). A task of the process whose attempt succeeded hands
its slot to the one waiting longest (:func:`claim`), in the transaction that records its outcome
(``lua/slot_handoff.lua``): the slot passes from token to token without coming free, and the
waiter starts with no Redis step of its own — a try for a slot is the dearest step of a capped
callout.

Guarantees:

- Never two holders: the handoff takes the slot's key from the holder's token to the waiter's
  in one script, only while the holder still holds it.
- No process keeps slots from the others: a slot is handed on for :data:`KEEP_S` after the
  process took it from Redis, then released to every worker: the release wakes whoever waits
  longest in Redis, of any process.
- No waiter waits beside a free slot: while tasks wait here, one task of the process waits in
  Redis (when the last one leaves, the oldest waiter here takes its place: :func:`nudge`), a
  slot released while none does is tried for by the oldest waiter here, and a waiter here waits
  at most :data:`WAIT_S` at a time before it looks again.
- A waiter never waits on a handoff that failed: a releaser whose transaction fails tells its
  waiter the outcome is unknown, and the waiter tries for a slot itself, as a try whose reply
  was lost (granted the slot again if the handoff went through).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

#: a slot taken from Redis is handed on within its process for this long (s), then released to all
#: (with 50 ms calls, about ten attempts share one try for a slot; with long calls it never is)
KEEP_S = 0.5
#: a waiter here looks again after this long (is a task of its process still waiting in Redis?)
WAIT_S = 2.0
#: a waiter claimed by a releaser waits this long at most for the releaser's transaction (longer than
#: redis-py's worst case for one: its socket timeout, times its tries); then it goes on as after a
#: lost reply, and a handoff that lands after that is released by its releaser
CLAIMED_WAIT_S = 300.0

#: what ended a wait here
HANDED = "handed"  # the slot is the waiter's: ``grant`` holds it
TRY = "try"  # try for a slot in Redis now (a slot went back to every worker and nobody here waits in Redis)
WAIT = "wait"  # wait in Redis for a release, in place of the process's task that waited there
UNKNOWN = "unknown"  # the releaser's transaction failed: the handoff may have happened
TIMEOUT = "timeout"  # nothing for WAIT_S


@dataclass(eq=False)
class Waiter:
    """A task waiting here for a slot: what the releaser's handoff writes for it, and how it ended."""

    token: str
    #: the in-flight record of its attempt (a :class:`onelane.coordination.lease.Stamp`)
    stamp: object
    ttl_ms: int
    outcome: str = ""
    grant: object = None
    claimed: bool = False
    #: it stopped waiting for its releaser (CLAIMED_WAIT_S): a slot handed to it now is not taken
    abandoned: bool = False
    _done: threading.Event = field(default_factory=threading.Event)


_queues: dict[str, deque] = {}
_lock = threading.Lock()


def waiting(key: str) -> int:
    """How many tasks of this process wait here for a slot of the semaphore ``key``."""
    return len(_queues.get(key, ()))


def wait(key: str, waiter: Waiter, *, budget_s: float, keep_waiting) -> Waiter:
    """Wait in line for a slot of ``key`` handed on by a task of this process: at most ``budget_s``,
    and only while ``keep_waiting()`` says a task of the process waits in Redis (checked as it joins
    the line, then every :data:`WAIT_S`). Once a releaser has claimed it, until the releaser's
    transaction is done. Returns the waiter, its ``outcome`` set (``TIMEOUT``: out of line, nothing
    handed)."""
    give_up = time.monotonic() + budget_s
    with _lock:
        if not keep_waiting():  # nobody of the process waits in Redis (the last one just left): try
            waiter.outcome = TIMEOUT
            return waiter
        _queues.setdefault(key, deque()).append(waiter)
    try:
        while True:
            left = give_up - time.monotonic()
            if waiter._done.wait(max(0.0, min(WAIT_S, left))):
                return waiter
            with _lock:
                if waiter.claimed:
                    break
                if left <= WAIT_S or not keep_waiting():
                    _queues[key].remove(waiter)
                    waiter.outcome = TIMEOUT
                    return waiter
        if not waiter._done.wait(CLAIMED_WAIT_S):
            with _lock:
                if not waiter._done.is_set():  # a releaser stuck in its transaction: as if it failed
                    waiter.abandoned = True
                    waiter.outcome = UNKNOWN
        return waiter
    except BaseException:  # interrupted (a shutdown): never left in line for a handoff nobody takes
        with _lock:
            waiter.abandoned = True
            line = _queues.get(key)
            if line is not None and waiter in line:
                line.remove(waiter)
        raise


def claim(key: str) -> Waiter | None:
    """The task waiting here longest for a slot of ``key``, taken out of line for a handoff (which
    must end with :func:`settle`, whatever happens); None when nobody waits."""
    with _lock:
        line = _queues.get(key)
        if not line:
            return None
        waiter = line.popleft()
        waiter.claimed = True
        return waiter


def settle(waiter: Waiter, outcome: str, grant=None) -> bool:
    """End a claimed waiter's wait: ``HANDED`` with its ``grant``, ``TRY``, ``WAIT`` or ``UNKNOWN``.
    False when the waiter stopped waiting first (a slot handed to it is then its releaser's to free)."""
    with _lock:
        if waiter.abandoned:
            return False
        waiter.grant = grant
        waiter.outcome = outcome
        waiter._done.set()
        return True


def nudge(key: str, outcome: str = TRY) -> None:
    """Send the task waiting here longest for a slot of ``key`` to Redis: to try for one now (TRY: a
    slot went back to every worker and no task of this process waits in Redis), or to wait there for a
    release (WAIT: the process's task that waited there has left)."""
    waiter = claim(key)
    if waiter is not None:
        settle(waiter, outcome)
