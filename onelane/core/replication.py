"""Nothing acted on before it is replicated: Redis WAIT after the writes others rely on.

Redis replication is asynchronous: a write a master acknowledged a moment before it died
may not be on the replica Sentinel promotes. For onelane that would be a lease granted twice,
a fencing token going backwards, or a finished call run again. So after a lease grant (with
its fencing increment and the in-flight record), a fetch claim and a recorded outcome, the
writer asks Redis to WAIT until ONELANE_MIN_REPLICAS replicas have it, bounded by
ONELANE_REPLICA_TIMEOUT_MS. A grant too few replicas confirmed counts as not had (it is
released, and the caller tries again later); an outcome is confirmed before the message is
acknowledged. WAIT covers every earlier write of the master, since replicas apply the
master's writes in order, so confirming a later write confirms those before it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

class NotReplicated(redis.exceptions.RedisError):
    """Raised when fewer replicas than ONELANE_MIN_REPLICAS confirmed a write in time; the write
    counts as not done (a grant is released) and the caller tries again."""

    def __init__(self, what: str, confirmed: int, needed: int):
        self.what, self.confirmed, self.needed = what, confirmed, needed
        super().__init__(f"{what}: {confirmed} of {needed} replica(s) confirmed in time")


@dataclass(frozen=True)
class Replicas:
    """How many replicas must confirm a write, how long one WAIT may take, and (behind Sentinel)
    how to ask the sentinels which master is current."""

    needed: int = 0
    timeout_ms: int = 500
    #: () -> ((host, port) of the master the sentinels name, True while no failover is under way)
    current_master: object = None

    @classmethod
    def of(cls, settings) -> "Replicas":
        check = None
        if settings.uses_sentinel and settings.min_replicas > 0:
            from onelane.core.clients import sentinel_master_view

            def check():
                return sentinel_master_view(settings)
        return cls(settings.min_replicas, settings.replica_timeout_ms, check)

    def queue_wait(self, pipe) -> int:
        """Queue WAIT on ``pipe`` after its writes (same connection), and behind Sentinel a CLIENT INFO
        that names the server which took them; return how many replies that adds (0: none needed)."""
        if self.needed <= 0:
            return 0
        pipe.execute_command("WAIT", self.needed, self.timeout_ms)
        if self.current_master is None:
            return 1
        pipe.execute_command("CLIENT", "INFO")
        return 2

    def resync(self, client) -> None:
        """Behind Sentinel, after a write was not confirmed: drop the client's connections, so the next
        command asks the sentinels again where the master is (it may have moved)."""
        if self.current_master is not None:
            client.connection_pool.disconnect(inuse_connections=False)  # another thread may be using one

    def confirmations(self, tail: list) -> int:
        return int(tail[0]) if tail else 0

    def confirmed(self, tail: list) -> bool:
        """Did enough replicas confirm — and, behind Sentinel, is the server that took the writes the
        master the sentinels name, with no failover under way? (A failover starts from a replica
        chosen by the sentinels; a write another replica confirmed after it started can be lost.)"""
        if self.needed <= 0:
            return True
        if not tail or int(tail[0]) < self.needed:
            return False
        if self.current_master is None:
            return True
        try:
            (host, port), settled = self.current_master()
        except Exception:
            return False
        return settled and _server_address(tail[1]) == (host, int(port))

    def ensure(self, client, probe_key: str, *, what: str, log: logging.Logger, written_key: str | None = None,
               rewrite=None, sleep=time.sleep) -> None:
        """Block until the write made just before is on the master and on the replicas, logging once
        while it waits. For a write that must not be acted on before: an outcome, before its message
        is acknowledged; a claim, before its message is delivered.

        A probe write then WAIT confirms every earlier write of the master. But a failover may have
        replaced the master in between, and a write the old one never replicated is gone: when
        ``written_key`` is given and missing on the current master, ``rewrite()`` (idempotent)
        writes it again before it is confirmed.
        """
        if self.needed <= 0:
            return
        said = False
        while True:
            ok = False
            try:
                pipe = client.pipeline(transaction=False)
                if written_key is not None:
                    pipe.exists(written_key)
                pipe.set(probe_key, time.time(), px=60_000)
                n = self.queue_wait(pipe)
                replies = pipe.execute()
                present = bool(replies[0]) if written_key is not None else True
                tail = replies[-n:]
                got = self.confirmations(tail)
                if not present and rewrite is not None:
                    log.warning("onelane: %s was lost with the old master (a failover); writing it again", what)
                    rewrite()
                    continue
                ok = present and self.confirmed(tail)
            except redis.RedisError:  # away or refusing (a failover): try again until it answers
                got = 0
            if not ok:
                self.resync(client)
            if ok:
                if said:
                    log.warning("onelane: %s is replicated now (%d replica(s))", what, got)
                return
            if not said:
                log.warning("onelane: %s is not yet on %d replica(s) (%d confirmed); waiting before acting on it",
                            what, self.needed, got)
                said = True
            sleep(0.1)


def _server_address(client_info) -> tuple[str, int] | None:
    """The server's own address (``laddr``) in a CLIENT INFO reply."""
    text = client_info.decode() if isinstance(client_info, bytes) else str(client_info)
    for field in text.split():
        if field.startswith("laddr="):
            host, _, port = field[6:].rpartition(":")
            return host, int(port)
    return None
