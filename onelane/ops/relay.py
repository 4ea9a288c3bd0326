"""The outbox relay: committed outbox rows to their lanes, in commit order, none lost, none doubled.

Guarantees kept here:

* **Only committed rows.** The relay reads the table like any other reader; a row exists for it
  only once the producer's transaction has committed.
* **In commit order, per lane.** A lane's waiting rows are published in id order, and a
  producer's later transaction always has higher ids than its earlier ones. The relay never
  keeps a high-water mark, so a row of a long transaction that commits after higher ids were
  published is still picked up (it is published when it commits, i.e. in commit order).
* **One relay at a time per lane.** Each lane is published under onelane's own lease
  (``relay:<lane>``, renewed with every batch, ``ONELANE_GUARD_TTL``); other relays wait as hot
  standbys. As a second line, a batch's rows are locked (``SELECT ... FOR UPDATE``; SQLite:
  ``BEGIN IMMEDIATE``) from the read until they are marked.
* **Nothing lost.** A row is marked published (or deleted, ``ONELANE_OUTBOX_KEEP=0``) only after
  Redis accepted its message, in the transaction that read it.
* **Nothing doubled.** A relay killed after publishing a row and before marking it publishes the
  row again on restart, with the same task id and idempotency key (derived from the row); the
  worker's ledger drops the second copy, so the API sees the call once.
* **Bad rows do not block.** A row whose arguments no longer validate is dead-lettered with its
  row id (``onelane dlq list``) and marked; the rows behind it go on.

Wake-up: PostgreSQL with psycopg 3 uses ``LISTEN``/``NOTIFY`` (``outbox.add`` notifies at commit),
with a safety pass every second; other databases poll every ``ONELANE_OUTBOX_POLL_MS``.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from onelane.callout.ledger import Ledger
from onelane.callout.result import dead_letter_entry, storable
from onelane.callout.validation import validate
from onelane.coordination.lease import Grant, Lease, new_token
from onelane.core.clients import client_for, eviction_problem, redact_url
from onelane.core.clock import redis_now_ms
from onelane.core.errors import ValidationError
from onelane.core.keys import Keys
from onelane.core.redaction import redact_kwargs
from onelane.core.settings import Settings, get_settings
from onelane.ops import outbox
from onelane.ops.outbox import OutboxError

log = logging.getLogger(__name__)

#: rows read, published and marked in one transaction (a relay killed mid-batch republishes at most these)
BATCH_ROWS = 200
#: with LISTEN, a pass also runs this often (rows written without outbox.add, a lost notification)
SAFETY_PASS_S = 1.0
#: the outbox depth per lane is written to Redis (for `onelane status`) at most this often
REPORT_EVERY_S = 1.0
#: published rows older than ONELANE_OUTBOX_KEEP are deleted this often, in chunks
CLEAN_EVERY_S = 60.0
CLEAN_CHUNK_ROWS = 5_000
#: after a failed pass (database or Redis away) the relay waits this long, doubling up to the cap
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.5, 15.0
#: execution option of the relay's connections whose transaction writes (SQLite: BEGIN IMMEDIATE)
_WRITES = "onelane_relay_writes"


def database_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: bare ``postgresql://`` (and ``postgres://``) get
    psycopg 3, the driver of the ``outbox`` extra, unless psycopg2 is installed."""
    import importlib.util

    for bare in ("postgres://", "postgresql://"):
        if url.startswith(bare):
            # SQLAlchemy's default PostgreSQL driver is psycopg2: keep it when it is installed
            default = importlib.util.find_spec("psycopg2") is not None
            return ("postgresql://" if default else "postgresql+psycopg://") + url[len(bare):]
    return url


def open_engine(url: str):
    """A SQLAlchemy engine for the relay. Raises OutboxError with what to do for a bad URL or driver."""
    sa = outbox._sqlalchemy()
    url = database_url(url)
    try:
        engine = sa.create_engine(url, pool_pre_ping=True)
    except sa.exc.ArgumentError as exc:
        raise OutboxError(f"{redact_url(url)} is not a database URL SQLAlchemy understands ({exc}); "
                          "use e.g. postgresql+psycopg://user:password@host/db or sqlite:////path/app.db") from None
    except (ImportError, sa.exc.NoSuchModuleError) as exc:
        raise OutboxError(f"no database driver for {redact_url(url)} ({exc}); "
                          "pip install 'onelane[outbox]' brings psycopg 3 for PostgreSQL") from None
    if engine.dialect.name == "sqlite":
        # A transaction that writes (a batch, the clean-up) takes the write lock when it begins: a
        # read lock upgraded to a write lock later fails against a producer writing at that moment
        # (SQLITE_BUSY). Reads begin as usual and never hold producers back.
        @sa.event.listens_for(engine, "connect")
        def _no_implicit_begin(dbapi_conn, record):
            dbapi_conn.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITES) else "BEGIN")
    return engine



class Listener:
    """A dedicated autocommit PostgreSQL connection that LISTENs on the outbox channel (psycopg 3)."""

    def __init__(self, engine):
        self.conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.conn = None

    @staticmethod
    def possible(engine) -> bool:
        if engine.dialect.name != "postgresql":
            return False
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return False
        return True

    def open(self) -> None:
        import psycopg

        self.close()
        self.conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5)
        self.conn.execute(f"LISTEN {outbox.CHANNEL}")

    def wait(self, timeout_s: float) -> set[str] | None:
        """Wait up to ``timeout_s`` for notifications; the lanes they name (empty: none came).

        None means "look at every lane": the connection was re-opened, and notifications may have
        been missed while it was closed.
        """
        if self.conn is None or self.conn.closed:
            self.open()
            return None
        lanes = {n.payload for n in self.conn.notifies(timeout=timeout_s, stop_after=1)}
        if lanes:
            lanes |= {n.payload for n in self.conn.notifies(timeout=0)}  # drain: one pass serves them all
            # anyone may NOTIFY this channel: a payload that is no lane name means "look at every lane"
            if not all(outbox.is_lane(lane) for lane in lanes):
                return None
        return lanes

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # already broken
                pass
            self.conn = None


class LaneLeases:
    """The relay's leases, one per lane it publishes: held while it works, renewed with each batch."""

    def __init__(self, client, keys: Keys, *, ttl_ms: int, label: str):
        self.client, self.keys, self.ttl_ms, self.label = client, keys, ttl_ms, label
        self.token = new_token()
        self._valid_until: dict[str, float] = {}  # lane -> local monotonic time the lease ends

    def hold(self, lane: str) -> bool:
        """True when this relay holds ``lane``'s lease for at least two thirds of its TTL from now."""
        now = time.monotonic()
        if self._valid_until.get(lane, 0) - now > self.ttl_ms * 2 / 3000:
            return True
        lease = Lease(self.client, self.keys.relay_lease(lane), keys=self.keys)
        got = lease.try_acquire(self.token, ttl_ms=self.ttl_ms, label=self.label)
        if not isinstance(got, Grant) and got.is_local_and_dead():
            # our own host, and its process is gone (a relay killed and restarted): take over now;
            # anything it published unmarked is published again with the same task ids
            log.warning("onelane: relay: taking over lane %r from a dead relay (%s)", lane, got.describe())
            got = lease.try_acquire(self.token, ttl_ms=self.ttl_ms, label=self.label, steal=got.token)
        if isinstance(got, Grant):
            if lane not in self._valid_until:
                log.info("onelane: relay: now publishing lane %r", lane)
            self._valid_until[lane] = now + self.ttl_ms / 1000
            return True
        if self._valid_until.pop(lane, None) is not None:
            log.warning("onelane: relay: lane %r is now published by %s", lane, got.describe())
        return False

    def release_all(self) -> None:
        for lane in list(self._valid_until):
            try:
                Lease(self.client, self.keys.relay_lease(lane), keys=self.keys).release(self.token)
            except Exception as exc:  # Redis away: the lease expires by itself
                log.warning("onelane: relay: could not release lane %r (%s); it expires by itself", lane, exc)
        self._valid_until.clear()


@dataclass
class PassReport:
    published: int = 0
    dead_lettered: int = 0
    more: bool = False  # a lane had a full batch: run again at once


class Relay:
    """Publishes the committed rows of one database's outbox table to their lanes."""

    def __init__(self, db_url: str, *, settings: Settings | None = None, app=None, client=None,
                 batch_rows: int = BATCH_ROWS):
        self.s = settings or get_settings()
        self.keys = Keys(self.s.key_prefix)
        self.client = client or client_for(self.s)
        if app is None:
            from onelane.celery_app import app
        self.app = app
        self.db_url = db_url
        self.engine = open_engine(db_url)
        self.table = outbox.table()
        self.batch_rows = batch_rows
        self.label = f"relay@{socket.gethostname()} pid {os.getpid()}"
        self.leases = LaneLeases(self.client, self.keys, ttl_ms=self.s.guard_ttl_ms, label=self.label)
        self.ledger = Ledger(self.client, self.keys, window_s=self.s.dedupe_window_s)
        self.listener = Listener(self.engine) if self.s.outbox_listen and Listener.possible(self.engine) else None
        self._last_report = self._last_clean = self._pass_started = 0.0
        self._lanes: set[str] = set()  # every lane this relay has seen waiting rows of (reported, even at 0)

    @property
    def wake_up(self) -> str:
        if self.listener is not None:
            return f"LISTEN/NOTIFY (and a pass every {SAFETY_PASS_S:g} s)"
        why = "" if self.engine.dialect.name != "postgresql" else (
            " (ONELANE_OUTBOX_LISTEN=0)" if not self.s.outbox_listen else " (LISTEN needs psycopg 3)")
        return f"polling every {self.s.outbox_poll_ms} ms{why}"

    def describe(self) -> str:
        return f"{self.db_shown} -> {redact_url(self.s.redis_url)}"

    @property
    def db_shown(self) -> str:
        """The database URL with its password masked."""
        return self.engine.url.render_as_string(hide_password=True)

    # -- start-up -----------------------------------------------------------------------------
    def check_redis(self) -> None:
        """Raise OutboxError when Redis may evict keys (unless ONELANE_ALLOW_EVICTION=1): the relay's
        lane leases and the worker's memory of done callouts, which drops a republished copy."""
        problem = eviction_problem(self.client.info("memory"))
        if problem and not self.s.allow_eviction:
            raise OutboxError(f"the relay refuses to start: {problem}")
        if problem:
            log.warning("onelane: relay: %s (starting anyway: ONELANE_ALLOW_EVICTION=1)", problem)

    def check_table(self) -> None:
        """Raise OutboxError (what to do) when the outbox table is missing; database errors propagate."""
        sa = outbox._sqlalchemy()
        if not sa.inspect(self.engine).has_table(outbox.TABLE_NAME):
            raise OutboxError(
                f"the database {self.db_shown} has no table "
                f"{outbox.TABLE_NAME!r}: create it with onelane.outbox.create_table(engine), or apply the DDL "
                "from the README, then start the relay again")

    # -- one pass -------------------------------------------------------------------------------
    def pass_once(self, lanes=None) -> PassReport:
        """Publish up to one batch of each lane this relay holds: of ``lanes`` (those a notification
        named), or of every lane with waiting rows when None. Report what was done."""
        sa = outbox._sqlalchemy()
        t = self.table
        report = PassReport()
        if lanes is None:
            with self.engine.connect() as conn:
                lanes = conn.execute(sa.select(t.c.lane).where(t.c.published_ms.is_(None)).distinct()).scalars()
                lanes = list(lanes)
                conn.rollback()
        lanes = sorted(set(lanes))
        self._lanes.update(lanes)
        for lane in lanes:
            if not self.leases.hold(lane):
                continue  # another relay publishes this lane
            published, dead, full = self._relay_batch(lane)
            report.published += published
            report.dead_lettered += dead
            report.more = report.more or full
        return report

    def _relay_batch(self, lane: str) -> tuple[int, int, bool]:
        sa = outbox._sqlalchemy()
        t = self.table
        with self.engine.connect().execution_options(**{_WRITES: True}) as conn:
            txn = conn.begin()
            try:
                rows = conn.execute(
                    sa.select(t.c.id, t.c.nonce, t.c.kwargs)
                    .where(t.c.lane == lane, t.c.published_ms.is_(None))
                    .order_by(t.c.id).limit(self.batch_rows).with_for_update()
                ).all()
                # The read may have waited on another relay's row locks: publish only while the
                # lane's lease is still ours (renewed here when a third of it has gone).
                if not rows or not self.leases.hold(lane):
                    txn.rollback()
                    return 0, 0, False
                published, dead, failure = [], [], None
                for row in rows:
                    try:
                        reason = self._publish(lane, row)
                        if reason is None:
                            published.append(row)
                        else:
                            dead.append((row, reason))
                    except Exception as exc:  # Redis away: mark what went out, retry the rest later
                        failure = exc
                        break
                self._mark(conn, published, dead)
                txn.commit()
            except BaseException:
                txn.rollback()
                raise
        if published or dead:
            log.info("onelane: relay: published %d row(s) of lane %r%s", len(published), lane,
                     f", dead-lettered {len(dead)}" if dead else "")
        if failure is not None:
            raise failure
        return len(published), len(dead), len(rows) == self.batch_rows

    def _publish(self, lane: str, row) -> str | None:
        """Publish one row; when it does not validate, dead-letter it instead and return why."""
        task_id = outbox.task_id_of(row.id, row.nonce)
        try:
            try:
                kwargs = json.loads(row.kwargs)
            except (TypeError, ValueError) as exc:
                raise ValidationError("kwargs", f"the row's kwargs are not JSON ({exc})") from None
            outbox.check_lane(lane)
            req = validate(kwargs, max_bytes=self.s.max_message_bytes)
        except ValidationError as exc:
            return self._dead_letter(lane, row, task_id, exc)
        clean = req.as_kwargs()
        clean.setdefault("idempotency_key", task_id)
        self.app.send_task("tasks.callout", kwargs=clean, queue=lane, task_id=task_id, retry=True,
                           kwargsrepr=repr(redact_kwargs(clean, self.s.redact_headers)))
        return None

    def _dead_letter(self, lane: str, row, task_id: str, exc: ValidationError) -> str:
        try:
            request = storable(json.loads(row.kwargs), self.s.redact_headers)
        except (TypeError, ValueError):
            request = {"kwargs": str(row.kwargs)[:2000]}
        queue = lane
        try:
            outbox.check_lane(lane)
        except ValidationError:
            queue = self.s.queue  # a lane that is not a queue name: its dead letter goes to the default lane
        reason = f"outbox row {row.id}: {exc}; it was not published (the rows behind it were)"
        entry = dead_letter_entry(task_id, queue, request, reason=reason, kind="invalid", attempts=[])
        entry["outbox_row"] = row.id
        self.ledger.record_failure(task_id=task_id, queue=queue, error=reason, dead_letter=entry,
                                   now_ms=redis_now_ms(self.client))
        log.error("onelane: relay: %s; dead-lettered as %s in %r", reason, task_id, queue)
        return reason

    def _mark(self, conn, published: list, dead: list) -> None:
        sa = outbox._sqlalchemy()
        t = self.table
        now_ms = int(time.time() * 1000)
        ids = [r.id for r in published]
        if ids and self.s.outbox_keep_s == 0:
            conn.execute(t.delete().where(t.c.id.in_(ids)))
        elif ids:
            derived = sa.literal("outbox-") + sa.cast(t.c.id, sa.String) + sa.literal("-") + t.c.nonce
            conn.execute(t.update().where(t.c.id.in_(ids)).values(published_ms=now_ms, task_id=derived))
        for r, reason in dead:  # kept (for the keep time) with the reason, whatever the keep setting
            conn.execute(t.update().where(t.c.id == r.id).values(
                published_ms=now_ms, task_id=outbox.task_id_of(r.id, r.nonce), error=reason))

    # -- housekeeping ---------------------------------------------------------------------------
    def report(self, *, force: bool = False) -> None:
        """Write each lane's waiting rows and the oldest one's age to Redis (read by `onelane status`)."""
        now = time.monotonic()
        if not force and now - self._last_report < REPORT_EVERY_S:
            return
        sa = outbox._sqlalchemy()
        t = self.table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.lane, sa.func.count(), sa.func.min(t.c.created_ms))
                                .where(t.c.published_ms.is_(None)).group_by(t.c.lane)).all()
            conn.rollback()
        wall_ms = int(time.time() * 1000)
        redis_ms = redis_now_ms(self.client)
        seen = {}
        for lane, depth, oldest in rows:
            seen[lane] = {"depth": int(depth), "oldest_age_ms": max(0, wall_ms - int(oldest)),
                          "reported_ms": redis_ms, "relay": self.label}
        for lane in self._lanes - set(seen):
            seen[lane] = {"depth": 0, "oldest_age_ms": None, "reported_ms": redis_ms, "relay": self.label}
        if seen:
            self.client.hset(self.keys.outbox_lanes, mapping={k: json.dumps(v) for k, v in seen.items()})
        self._lanes.update(seen)
        self._last_report = now

    def clean(self, *, force: bool = False) -> int:
        """Delete published rows older than ONELANE_OUTBOX_KEEP, in chunks; return how many."""
        now = time.monotonic()
        if not force and now - self._last_clean < CLEAN_EVERY_S:
            return 0
        self._last_clean = now
        sa = outbox._sqlalchemy()
        t = self.table
        before_ms = int(time.time() * 1000) - self.s.outbox_keep_s * 1000
        deleted = 0
        while True:
            with self.engine.connect().execution_options(**{_WRITES: True}) as conn, conn.begin():
                old = sa.select(t.c.id).where(t.c.published_ms.is_not(None), t.c.published_ms < before_ms) \
                    .limit(CLEAN_CHUNK_ROWS).scalar_subquery()
                n = conn.execute(t.delete().where(t.c.id.in_(old))).rowcount
            deleted += n
            if n < CLEAN_CHUNK_ROWS:
                break
        if deleted:
            log.info("onelane: relay: deleted %d published row(s) older than %d s", deleted, self.s.outbox_keep_s)
        return deleted

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, stop: threading.Event, *, fail_fast: bool = True) -> None:
        """Relay until ``stop`` is set. Database or Redis errors are logged and waited out.

        With ``fail_fast`` a missing table raises OutboxError at once (``onelane relay``);
        without it (inside beat) it is logged and looked for again later.
        """
        backoff = 0.0
        ready = False
        lanes = None  # the lanes of the next pass: None for every lane with waiting rows
        try:
            while not stop.is_set():
                try:
                    if not ready:
                        self.check_redis()
                        self.check_table()
                        if self.listener is not None:
                            self.listener.open()
                        log.info("onelane: relay ready: %s, waking by %s", self.describe(), self.wake_up)
                        ready = True
                    self._pass_started = time.monotonic()
                    done = self.pass_once(lanes)
                    lanes = None
                    self.report(force=bool(done.published or done.dead_lettered) and not done.more)
                    self.clean()
                    backoff = 0.0
                    if not done.more:  # after a full batch, pass again at once
                        lanes = self._wait(stop)
                except OutboxError as exc:
                    if fail_fast:
                        raise
                    backoff = _BACKOFF_MAX_S
                    log.error("onelane: relay: %s; looking again in %.0f s", exc, backoff)
                    stop.wait(backoff)
                except Exception as exc:  # the database or Redis away: wait it out
                    backoff = min(_BACKOFF_MAX_S, max(_BACKOFF_FIRST_S, backoff * 2))
                    log.warning("onelane: relay: pass failed (%s: %s); retrying in %.1f s",
                                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", backoff)
                    if self.listener is not None:  # it may be the listening connection that broke
                        self.listener.close()
                        ready = False
                    stop.wait(backoff)
        finally:
            self.leases.release_all()
            if self.listener is not None:
                self.listener.close()
            self.engine.dispose()
            log.info("onelane: relay stopped")

    def drain(self) -> PassReport:
        """Pass until nothing this relay may publish is left (``onelane relay --once``)."""
        self.check_redis()
        self.check_table()
        total = PassReport()
        try:
            while True:
                done = self.pass_once()
                total.published += done.published
                total.dead_lettered += done.dead_lettered
                if not done.more:
                    break
            self.report(force=True)
            self.clean(force=True)
        finally:
            self.leases.release_all()
            self.engine.dispose()
        return total

    def _wait(self, stop: threading.Event):
        """Wait for the next pass; return the lanes it should look at (None: every lane)."""
        if self.listener is None:  # passes start every ONELANE_OUTBOX_POLL_MS, however long one took
            stop.wait(max(0.0, self._pass_started + self.s.outbox_poll_ms / 1000 - time.monotonic()))
            return None
        give_up = time.monotonic() + SAFETY_PASS_S
        while not stop.is_set() and (left := give_up - time.monotonic()) > 0:
            lanes = self.listener.wait(min(left, 0.25))  # short slices: a stop is seen within 0.25 s
            if lanes is None or lanes:
                return lanes  # notified: only the lanes named, without a query for the lane list
        return None  # the safety pass: every lane


class RelayThread(threading.Thread):
    """The relay inside another process (beat, with ONELANE_OUTBOX_DB): stopped by :meth:`stop`."""

    def __init__(self, relay: Relay):
        super().__init__(name="onelane-relay", daemon=True)
        self.relay = relay
        self._stop_event = threading.Event()

    def run(self) -> None:
        self.relay.run(self._stop_event, fail_fast=False)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop_event.set()
        self.join(timeout_s)
