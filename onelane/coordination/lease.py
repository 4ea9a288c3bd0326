"""The lease: one Redis key owned by a random token, with an expiry and a fencing counter.

Guarantees kept here, by the Lua scripts beside this module:

* at most one token holds a lease at a time (``SET NX`` inside the acquire script);
* every new grant increments the lease's fencing counter, so tokens handed to the
  API grow strictly with every grant;
* renew and release act only for the token that holds the lease (compare-and-set);
* a lease is never handed on before its expiry unless its holder releases it, or
  the caller names the holder's token as provably dead (``steal``);
* waiting for a lease blocks on a release signal with a bounded timeout instead
  of polling Redis in a loop.

The worker guard, the callout and the reaper all use this one class.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from redis.exceptions import NoScriptError

from onelane.core.clock import time_ms
from onelane.core.errors import LeaseBusy, LeaseNotHeld, UnexpectedReply
from onelane.core.keys import Keys
from onelane.core.replication import NotReplicated, Replicas
from onelane.core.scripts import LuaScript, forget
from onelane.core.text import text, text_map

log = logging.getLogger(__name__)

_ACQUIRE = LuaScript(__package__, "lease_acquire")
#: this host's name, as holders show it (read once: a lookup per grant costs a system call)
_HOST = socket.gethostname()
_RENEW = LuaScript(__package__, "lease_renew")
_RELEASE = LuaScript(__package__, "lease_release")
_REAP = LuaScript(__package__, "lease_reap")

#: every fencing counter starts from a clock in microseconds since 1970, so it is above this
#: (2001-09-09): a counter below it was counted up from nothing (new, or Redis lost its data).
#: lua/lease_acquire.lua and lua/semaphore_acquire.lua hold the same number.
FENCE_FLOOR = 10**15
#: how long a release signal waits for a waiter before it expires
_SIGNAL_TTL_MS = 10_000
#: the longest single block on the release signal; bounds the cost of a missed signal
_MAX_BLOCK_MS = 2_000


def new_token() -> str:
    """A random lease token."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Stamp:
    """A record a grant writes in its own script: the in-flight record of the attempt it is for, so
    the attempt is on record with its lease, token, fence, start and deadline before it starts, and
    with no write of its own. The grant's primitive fills ``lease``, ``lease_token``, ``fence``,
    ``started_ms`` and ``deadline_ms`` (and ``attempt``, from ``attempts_key``); ``fields`` holds the
    rest of the record (field, value, ...)."""

    record_key: str
    index_key: str
    #: the record's member in the index (the task id)
    member: str
    #: from the grant to the attempt's deadline, ms
    due_in_ms: int
    fields: tuple = ()
    #: a list whose length + 1 is the record's attempt number (None: the record has it already)
    attempts_key: str | None = None


@dataclass(frozen=True)
class Grant:
    """A granted lease: who holds it, its fencing token and its deadline (Redis clock, ms)."""

    name: str
    token: str
    fence: int
    deadline_ms: int
    now_ms: int


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as recorded by its acquire."""

    token: str
    host: str
    pid: int | None
    label: str
    renewed_ms: int
    since_ms: int
    pttl_ms: int
    now_ms: int

    @property
    def renewed_ago_s(self) -> float:
        return max(0.0, (self.now_ms - self.renewed_ms) / 1000)

    def describe(self) -> str:
        who = self.label or "holder"
        pid = f"pid {self.pid}" if self.pid else "pid ?"
        return (
            f"{who} on {self.host or '?'} ({pid}), renewed {self.renewed_ago_s:.1f} s ago, "
            f"expires in {max(self.pttl_ms, 0) / 1000:.1f} s"
        )

    def is_local_and_dead(self) -> bool:
        """True only when the holder ran on this host and its pid no longer exists."""
        if self.host != socket.gethostname() or not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class Lease:
    """A named lease in Redis. ``client`` is a redis-py client; nothing else is global."""

    def __init__(self, client, name: str, *, keys: Keys, replicas: Replicas = Replicas()):
        if not name:
            raise ValueError("a lease needs a non-empty name")
        self.client = client
        self.name = name
        self.keys = keys
        #: replicas that must confirm a grant before it counts (Redis WAIT); 0 without replication
        self.replicas = replicas

    # -- the four operations, each one registered script ---------------------------
    def try_acquire(
        self,
        token: str,
        *,
        ttl_ms: int,
        label: str = "",
        since_ms: int | None = None,
        steal: str | None = None,
        along=None,
    ) -> Grant | Holder:
        """One attempt: a :class:`Grant` if the lease was free (or ours), else the :class:`Holder`.

        ``along(pipe)`` may queue more commands that travel in the same round trip, after
        the acquire (they run whether or not the lease was granted). With replicas required,
        a grant the replicas did not confirm in time is released at once and
        :class:`NotReplicated` raised: it never counts as had.
        """
        k = self.keys
        keys = [k.lease(self.name), k.lease_holder(self.name), k.lease_fence(self.name), k.lease_index]
        args = [token, int(ttl_ms), _HOST, os.getpid(), label,
                "" if since_ms is None else int(since_ms), self.name, steal or ""]
        if along is None and self.replicas.needed <= 0:
            return _acquire_reply(self.name, token, _ACQUIRE(self.client, keys=keys, args=args))
        pipe = self.client.pipeline(transaction=False)
        _ACQUIRE.queue_on(pipe, self.client, keys=keys, args=args)
        if along is not None:
            along(pipe)
        waited = self.replicas.queue_wait(pipe)
        try:
            replies = pipe.execute()
        except NoScriptError:
            forget(self.client)
            return self.try_acquire(token, ttl_ms=ttl_ms, label=label, since_ms=since_ms, steal=steal, along=along)
        got = _acquire_reply(self.name, token, replies[0])
        tail = replies[len(replies) - waited:]
        if waited and isinstance(got, Grant) and not self.replicas.confirmed(tail):
            self.release(token)
            self.replicas.resync(self.client)
            raise NotReplicated(f"the grant of lease {self.name!r}", self.replicas.confirmations(tail),
                                self.replicas.needed)
        return got

    def queue_acquire(self, pipe, token: str, *, ttl_ms: int, label: str = "", stamp: Stamp | None = None) -> None:
        """Queue one acquire attempt on ``pipe``; decode its reply with :meth:`acquire_reply`.

        ``stamp``: a record the same script writes, granted or not (with this token and the lease's
        name; its fence is the grant's, or 0 when the lease was busy). It needs ``attempts_key``."""
        k = self.keys
        keys = [k.lease(self.name), k.lease_holder(self.name), k.lease_fence(self.name), k.lease_index]
        args = [token, int(ttl_ms), _HOST, os.getpid(), label, "", self.name, ""]
        if stamp is not None:
            keys += [stamp.record_key, stamp.index_key, stamp.attempts_key]
            args += [stamp.member, int(stamp.due_in_ms), *stamp.fields]
        _ACQUIRE.queue_on(pipe, self.client, keys=keys, args=args)

    def queue_quick_acquire(self, pipe, token: str, *, ttl_ms: int, label: str, now_ms: int) -> int:
        """Queue a grant in plain commands, for a lease that is usually free (a serial resource's
        lease before each callout); decode its replies with :meth:`quick_reply`. Returns how many
        replies it adds.

        The same lease, the same guarantees, without the acquire script (a script costs Redis several
        times its plain commands on a busy machine): ``SET NX`` with the expiry, its holder written
        in its value after the token (no holder hash to write; every reader and script reads either
        form); the fencing counter counted up by ``INCR`` whether or not the lease was free (tokens
        still grow with every grant); the index entry added only where none stands (a live holder's
        is never moved). ``now_ms`` is the caller's estimate of the Redis clock: it only dates the
        holder and the index entry, which the reaper corrects from the real expiry.
        """
        k = self.keys
        value = quick_value(token, host=_HOST, pid=os.getpid(), since_ms=int(now_ms), label=label)
        pipe.set(k.lease(self.name), value, nx=True, px=int(ttl_ms))
        pipe.get(k.lease(self.name))
        pipe.incr(k.lease_fence(self.name))
        pipe.zadd(k.lease_index, {self.name: int(now_ms) + int(ttl_ms)}, nx=True)
        return 4

    def quick_reply(self, token: str, replies, *, ttl_ms: int, now_ms: int) -> Grant | None:
        """The :class:`Grant` a quick acquire won, or None: the lease is held by another token; or
        by this one already (an earlier try whose reply was lost: its expiry runs from then); or its
        fencing counter was below the floor (new, or Redis lost its data). In the last two the
        acquire script grants it to the same token (see :meth:`quick_held`): it sets the expiry
        anew and starts the counter from the Redis clock, so no token goes backwards."""
        was_set, _value, fence, _indexed = replies
        if not was_set or int(fence) < FENCE_FLOOR:
            return None
        return Grant(self.name, token, int(fence), int(now_ms) + int(ttl_ms), int(now_ms))

    @staticmethod
    def quick_held(token: str, replies) -> bool:
        """Whether ``token`` holds the lease after a quick acquire (granted or not)."""
        was_set, value, _fence, _indexed = replies
        return bool(was_set) or (value is not None and _quick_holder(text(value))["token"] == token)

    def acquire_reply(self, token: str, reply) -> Grant | Holder:
        """The :class:`Grant` or :class:`Holder` a queued acquire answered."""
        return _acquire_reply(self.name, token, reply)

    def acquire(
        self,
        token: str,
        *,
        ttl_ms: int,
        wait_ms: int = 0,
        label: str = "",
        since_ms: int | None = None,
        should_stop=None,
    ) -> Grant:
        """Acquire the lease, waiting up to ``wait_ms`` on the release signal (never polling).

        Raises :class:`LeaseBusy` naming the holder when the wait ends without a grant.
        ``should_stop`` (a callable) ends the wait early, also with LeaseBusy.
        """
        give_up = time.monotonic() + wait_ms / 1000
        while True:
            got = self.try_acquire(token, ttl_ms=ttl_ms, label=label, since_ms=since_ms)
            if isinstance(got, Grant):
                return got
            left_ms = (give_up - time.monotonic()) * 1000
            if left_ms <= 0 or (should_stop and should_stop()):
                raise LeaseBusy(f"lease {self.name!r} is held by {got.describe()}")
            # Block until a release is signalled or the holder's expiry is due; the
            # +5 ms lets the expiry happen before we look again.
            pttl = got.pttl_ms if got.pttl_ms > 0 else 50
            block_ms = max(10, min(pttl + 5, left_ms, _MAX_BLOCK_MS))
            self.client.blpop([self.keys.lease_signal(self.name)], timeout=block_ms / 1000)

    def renew(self, token: str, *, ttl_ms: int, slot: tuple[str, int] | None = None) -> int:
        """Extend the lease held by ``token``; return the new deadline (ms). Raises LeaseNotHeld.

        ``slot``: (held set, slot number) of a semaphore's slot lease, whose hint moves in the same script."""
        k = self.keys
        keys, args = [k.lease(self.name), k.lease_holder(self.name), k.lease_index], [token, int(ttl_ms), self.name]
        if slot is not None:
            keys.append(slot[0])
            args.append(slot[1])
        res = _RENEW(self.client, keys=keys, args=args)
        _expect(res, "lease_renew", length=2)
        if int(res[0]) != 1:
            other = text(res[1])
            raise LeaseNotHeld(
                f"lease {self.name!r} is no longer held by this token "
                + (f"(now held by {other[:8]}…)" if other else "(it expired)")
            )
        return int(res[1])

    def release(self, token: str, *, pipe=None) -> bool | None:
        """Release the lease if ``token`` holds it and wake a waiter; False if it did not hold it.

        With ``pipe`` the release is queued on that pipeline (its reply comes with it).
        """
        k = self.keys
        keys = [k.lease(self.name), k.lease_holder(self.name), k.lease_index, k.lease_signal(self.name)]
        args = [token, self.name, _SIGNAL_TTL_MS]
        if pipe is not None:
            _RELEASE.queue_on(pipe, self.client, keys=keys, args=args)
            return None
        return int(_RELEASE(self.client, keys=keys, args=args)) == 1

    def reap(self, *, now_ms: int) -> bool:
        """Clear this lease's index entry if its deadline passed without a release."""
        k = self.keys
        res = _REAP(self.client, keys=[k.lease(self.name), k.lease_holder(self.name), k.lease_index],
                    args=[self.name, int(now_ms)])
        return int(res) == 1

    # -- reading ---------------------------------------------------------------------
    def holder(self) -> Holder | None:
        """Who holds the lease now, or None."""
        pipe = self.client.pipeline(transaction=True)
        self.queue_holder_reads(pipe)
        pipe.time()
        token, h, pttl, now = pipe.execute()
        return self.holder_from(token, h, pttl, time_ms(now))

    def queue_holder_reads(self, pipe) -> int:
        """Queue on ``pipe`` the reads :meth:`holder_from` needs (token, holder hash, PTTL): 3 replies."""
        pipe.get(self.keys.lease(self.name))
        pipe.hgetall(self.keys.lease_holder(self.name))
        pipe.pttl(self.keys.lease(self.name))
        return 3

    @staticmethod
    def holder_from(value, h, pttl, now_ms: int) -> "Holder | None":
        """The holder from the replies of :meth:`queue_holder_reads` and the Redis time (ms)."""
        if value is None:
            return None
        h = {**text_map(h), **_quick_holder(text(value))}
        return Holder(
            token=h["token"],
            host=h.get("host", ""),
            pid=int(h["pid"]) if h.get("pid", "").isdigit() else None,
            label=h.get("label", ""),
            renewed_ms=int(h.get("renewed") or h.get("since") or 0),
            since_ms=int(h.get("since") or 0),
            pttl_ms=int(pttl),
            now_ms=now_ms,
        )

    def fence(self) -> int:
        """The current value of the fencing counter."""
        return int(self.client.get(self.keys.lease_fence(self.name)) or 0)


#: the fields a quick grant writes into the lease's value after its token, one a line
_QUICK_FIELDS = ("token", "host", "pid", "since", "label")


def quick_value(token: str, *, host: str, pid: int, since_ms: int, label: str) -> str:
    """The value of a lease granted without the acquire script: its token, then its holder."""
    return "\n".join((token, host, str(pid), str(since_ms), label))


def _quick_holder(value: str) -> dict:
    """The token of a lease's value, and the holder fields a quick grant wrote after it."""
    parts = value.split("\n", len(_QUICK_FIELDS) - 1)
    if len(parts) != len(_QUICK_FIELDS):
        return {"token": value}
    return dict(zip(_QUICK_FIELDS, parts))


def _expect(res, script_name: str, *, length: int) -> None:
    """Raise UnexpectedReply unless ``res`` is a list of at least ``length`` items."""
    if not isinstance(res, (list, tuple)) or len(res) < length:
        raise UnexpectedReply(f"script {script_name} answered {res!r}; expected a list of {length} items")


def _acquire_reply(name: str, token: str, res) -> Grant | Holder:
    """Decode lease_acquire's reply: {1, fence, deadline, now} or {0, pttl, token, host, pid, label, ...}."""
    _expect(res, "lease_acquire", length=4)
    if int(res[0]) == 1:
        return Grant(name, token, int(res[1]), int(res[2]), int(res[3]))
    _expect(res, "lease_acquire", length=9)
    pid = text(res[4])
    return Holder(
        token=text(res[2]),
        host=text(res[3]),
        pid=int(pid) if pid.isdigit() else None,
        label=text(res[5]),
        renewed_ms=int(res[6]),
        since_ms=int(res[7]),
        pttl_ms=int(res[1]),
        now_ms=int(res[8]),
    )
