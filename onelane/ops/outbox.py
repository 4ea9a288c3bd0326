"""The transactional outbox: a callout is published if and only if the producer's transaction commits.

    from onelane import outbox

    with engine.begin() as conn:                      # the producer's own transaction
        conn.execute(orders.insert().values(id=42))
        outbox.add(conn, "https://erp.example.com/orders", json={"order": 42}, lane="erp")
    # committed: the relay (onelane.ops.relay) publishes the callout to its lane;
    # rolled back: no row, nothing is ever sent

Guarantees kept here:

* :func:`add` checks the arguments exactly as :func:`onelane.submit` does (``ValueError`` naming
  the bad one) before anything is written;
* :func:`add` writes one row through the caller's own connection or session, inside the caller's
  transaction; it never commits and never publishes. On PostgreSQL it also queues a ``NOTIFY``,
  which the database delivers only when that transaction commits;
* row ids come from a sequence that never hands out a value twice (SQLite: ``AUTOINCREMENT``),
  and every row carries a random nonce: the task id derived from both, ``outbox-<id>-<nonce>``,
  is the same every time the row is relayed and differs from every other row's, also across
  databases that relay into one Redis.

SQLAlchemy (2, Core) is the optional extra ``onelane[outbox]``: it is imported only when this
module is used, so onelane works without it.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import time

from onelane.callout.validation import validate
from onelane.core.errors import OnelaneError, ValidationError
from onelane.core.settings import get_settings

log = logging.getLogger(__name__)

#: the table every producer writes to and every relay reads
TABLE_NAME = "onelane_outbox"
#: the PostgreSQL channel a committed row is announced on (the payload is its lane)
CHANNEL = "onelane_outbox"
#: a lane is a queue name: the rule of ONELANE_QUEUE (onelane.core.settings)
_LANE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_INSTALL_HINT = "the outbox needs SQLAlchemy 2 (and psycopg for PostgreSQL): pip install 'onelane[outbox]'"

_table = None


class OutboxError(OnelaneError):
    """Raised when the outbox cannot be used as asked: no SQLAlchemy, no table, not a transaction."""


def _sqlalchemy():
    try:
        import sqlalchemy
    except ImportError as exc:  # the optional extra is not installed
        raise OutboxError(_INSTALL_HINT) from exc
    if int(sqlalchemy.__version__.split(".")[0]) < 2:
        raise OutboxError(f"SQLAlchemy {sqlalchemy.__version__} is too old; {_INSTALL_HINT}")
    return sqlalchemy


def table():
    """The outbox table (SQLAlchemy Core), the same for every producer and relay.

    ``published_ms`` is NULL while a row waits; the partial index on (lane, id) of waiting rows
    is what the relay reads, in id order.
    """
    global _table
    if _table is None:
        sa = _sqlalchemy()
        waiting = sa.text("published_ms IS NULL")
        done = sa.text("published_ms IS NOT NULL")
        _table = sa.Table(
            TABLE_NAME, sa.MetaData(),
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                      autoincrement=True),
            sa.Column("lane", sa.String(100), nullable=False),
            sa.Column("kwargs", sa.Text(), nullable=False),
            sa.Column("nonce", sa.String(16), nullable=False),
            sa.Column("created_ms", sa.BigInteger(), nullable=False),
            sa.Column("published_ms", sa.BigInteger(), nullable=True),
            sa.Column("task_id", sa.String(64), nullable=True),
            sa.Column("error", sa.Text(), nullable=True),
            sa.Index(f"{TABLE_NAME}_waiting", "lane", "id", postgresql_where=waiting, sqlite_where=waiting),
            sa.Index(f"{TABLE_NAME}_published", "published_ms", postgresql_where=done, sqlite_where=done),
            # never reuse a deleted row's id: its task id may still be remembered as done
            sqlite_autoincrement=True,
        )
    return _table


def create_table(engine) -> None:
    """Create the outbox table and its indexes if they do not exist yet (safe to run every start-up)."""
    table().metadata.create_all(engine, checkfirst=True)


def ddl(dialect: str = "postgresql") -> str:
    """The CREATE statements of the table and its indexes for ``dialect``, for those who manage schemas."""
    sa = _sqlalchemy()
    from sqlalchemy.schema import CreateIndex, CreateTable

    d = sa.create_mock_engine(f"{dialect}://", executor=None).dialect
    t = table()
    parts = [str(CreateTable(t).compile(dialect=d)).strip()]
    parts += [str(CreateIndex(ix).compile(dialect=d)).strip() for ix in sorted(t.indexes, key=lambda i: i.name)]
    return ";\n\n".join(parts) + ";\n"


def task_id_of(row_id: int, nonce: str) -> str:
    """The task id (and default idempotency key) of an outbox row: the same on every relay of it."""
    return f"outbox-{int(row_id)}-{nonce}"


def is_lane(name) -> bool:
    """Is ``name`` a lane, i.e. a queue name: 1-100 letters, digits, '_', '.' or '-'?"""
    return isinstance(name, str) and _LANE_RE.match(name) is not None


def check_lane(lane) -> str:
    """``lane`` if it is a lane name; raises ValidationError naming the argument otherwise."""
    if not is_lane(lane):
        raise ValidationError("lane", f"must be a queue name (1-100 letters, digits, '_', '.' or '-'), got {lane!r}")
    return lane


def add(conn, url: str | None = None, *, lane: str | None = None, **kwargs) -> int:
    """Write a callout into the caller's transaction; return its row id.

    ``conn`` is the SQLAlchemy ``Connection`` or ORM ``Session`` of the producer's transaction;
    the other arguments are those of :func:`onelane.submit` (``json``, ``resource``,
    ``idempotency_key``, ...), plus ``lane`` (the queue, default ``ONELANE_QUEUE``). Bad
    arguments raise ``ValueError`` naming the argument before anything is written. Nothing is
    committed or published here: the row becomes visible to the relay when the caller commits,
    and a rollback removes it (on PostgreSQL with the NOTIFY that would have woken the relay).
    """
    sa = _sqlalchemy()
    if isinstance(conn, sa.Engine):
        raise OutboxError("outbox.add() needs the connection of your transaction, not the Engine: "
                          "`with engine.begin() as conn: ...; outbox.add(conn, ...)` (or an ORM Session)")
    if isinstance(conn, sa.Connection):
        dialect = conn.dialect
    elif callable(getattr(conn, "get_bind", None)) and callable(getattr(conn, "execute", None)):
        # an ORM Session (not imported here: a first import of sqlalchemy.orm racing another
        # thread's can fail half-initialised, and producers are often threaded)
        dialect = conn.get_bind().dialect
    else:
        raise OutboxError(f"outbox.add() needs a SQLAlchemy Connection or Session, got {type(conn).__name__}")
    s = get_settings()
    lane = check_lane(s.queue if lane is None else lane)
    req = validate({"url": url, **kwargs}, max_bytes=s.max_message_bytes)
    row = {"lane": lane, "kwargs": json.dumps(req.as_kwargs(), separators=(",", ":")),
           "nonce": secrets.token_hex(6), "created_ms": int(time.time() * 1000)}
    t = table()
    try:
        row_id = conn.execute(t.insert().values(**row)).inserted_primary_key[0]
        if dialect.name == "postgresql":
            # delivered at commit only, and once per lane per transaction: wakes the relay within ms
            conn.execute(sa.select(sa.func.pg_notify(CHANNEL, lane)))
    except sa.exc.DBAPIError as exc:
        if _is_missing_table(exc):
            raise OutboxError(
                f"the table {TABLE_NAME!r} does not exist in this database: create it once with "
                "onelane.outbox.create_table(engine), or apply the DDL from the README") from exc
        raise
    return int(row_id)


def _is_missing_table(exc) -> bool:
    msg = str(exc.orig if getattr(exc, "orig", None) is not None else exc).lower()
    return TABLE_NAME in msg and ("no such table" in msg or "does not exist" in msg or "doesn't exist" in msg)
