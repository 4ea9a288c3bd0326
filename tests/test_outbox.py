"""The transactional outbox: a callout reaches the API if and only if the producer's transaction commits.

unit: ``outbox.add`` and the settings against SQLite files; redis: the relay in this process
against SQLite and the session's Redis; e2e: a private PostgreSQL server, real ``onelane relay``,
``celery worker`` and ``celery beat`` processes, producer processes and the fragile API.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import sqlalchemy as sa

from onelane import outbox
from onelane.core.errors import ConfigError
from onelane.core.keys import Keys
from onelane.core.settings import get_settings, load_settings
from onelane.ops.outbox import OutboxError
from tests import procs
from tests.outbox_procs import RelayProcess
from tests.pg_server import PostgresServer
from tests.procs import wait_for


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = sa.create_engine(url)
    outbox.create_table(engine)
    engine.dispose()
    return url


def rows(url: str) -> list:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        out = conn.execute(sa.select(outbox.table()).order_by(outbox.table().c.id)).all()
    engine.dispose()
    return out


def write(url: str, *callouts: dict, commit: bool = True, lane: str | None = None) -> list[int]:
    """One transaction writing ``callouts`` (kwargs of outbox.add); committed or rolled back."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        ids = [outbox.add(conn, lane=lane, **c) for c in callouts]
        conn.commit() if commit else conn.rollback()
    engine.dispose()
    return ids


def queued(client, lane: str) -> list[tuple[str, dict]]:
    """(task id, kwargs) of the messages waiting on ``lane``, in the order a worker takes them."""
    import base64

    out = []
    for raw in reversed(client.lrange(lane, 0, -1)):  # kombu LPUSHes; the worker takes from the right
        msg = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
        out.append((msg["headers"]["id"], kwargs))
    return out


def relay_for(url: str, **settings):
    from onelane.ops.relay import Relay

    return Relay(url, settings=replace(get_settings(), **settings))


# -- unit: outbox.add ----------------------------------------------------------------------------
BAD_ADDS = [
    (dict(url="ftp://example.com/x"), "url"),
    (dict(url="https://example.com/x", json={"a": 1}, data="x"), "json"),
    (dict(url="https://example.com/x", headers={"Idempotency-Key": "k"}), "headers"),
    (dict(url="https://example.com/x", timeout=0), "timeout"),
    (dict(url="https://example.com/x", lane="no spaces"), "lane"),
    (dict(url="https://example.com/x", colour="red"), "colour"),
    (dict(), "url"),
]


@pytest.mark.unit
@pytest.mark.parametrize("kwargs, field", BAD_ADDS)
def test_add_checks_the_arguments_like_submit_and_writes_nothing(sqlite_url, kwargs, field):
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        with pytest.raises(ValueError, match=f"'{field}'"):
            outbox.add(conn, **kwargs)
        conn.commit()
    assert rows(sqlite_url) == []


@pytest.mark.unit
def test_add_writes_in_the_callers_transaction_and_never_commits(sqlite_url):
    # Given two callouts written in a transaction that is rolled back, then three in one that commits
    write(sqlite_url, {"url": "https://example.com/a"}, {"url": "https://example.com/b"}, commit=False)
    ids = write(sqlite_url, *({"url": f"https://example.com/{i}", "json": {"i": i}} for i in range(3)))
    # Then only the committed three exist, in insertion order, on the default lane, normalised
    got = rows(sqlite_url)
    assert [r.id for r in got] == ids and ids == sorted(ids)
    assert [json.loads(r.kwargs) for r in got] == [
        {"url": f"https://example.com/{i}", "method": "POST", "json": {"i": i}} for i in range(3)]
    assert {r.lane for r in got} == {"serial"}
    assert all(r.published_ms is None and r.task_id is None for r in got)
    assert len({r.nonce for r in got}) == 3 and all(re.fullmatch(r"[0-9a-f]{12}", r.nonce) for r in got)
    assert all(abs(r.created_ms - time.time() * 1000) < 60_000 for r in got)


@pytest.mark.unit
def test_add_through_an_orm_session_and_on_a_named_lane(sqlite_url):
    from sqlalchemy.orm import Session

    engine = sa.create_engine(sqlite_url)
    with Session(engine) as session:
        row_id = outbox.add(session, "https://example.com/erp", json={"order": 1}, lane="erp",
                            resource="erp-api", idempotency_key="order-1")
        session.commit()
    [r] = rows(sqlite_url)
    assert r.id == row_id and r.lane == "erp"
    assert json.loads(r.kwargs)["resource"] == "erp-api" and json.loads(r.kwargs)["idempotency_key"] == "order-1"


@pytest.mark.unit
def test_add_refuses_an_engine_and_names_a_missing_table(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(OutboxError, match="not the Engine"):
        outbox.add(engine, "https://example.com/x")
    with engine.connect() as conn:
        with pytest.raises(OutboxError, match=r"does not exist.*create_table"):
            outbox.add(conn, "https://example.com/x")


@pytest.mark.unit
def test_sqlite_never_reuses_a_deleted_rows_id(sqlite_url):
    # a reused id would give a new callout the task id of one the worker remembers as done
    [first] = write(sqlite_url, {"url": "https://example.com/1"})
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(outbox.table().delete())
    [second] = write(sqlite_url, {"url": "https://example.com/2"})
    assert second > first


@pytest.mark.unit
def test_task_ids_come_from_the_row_and_bare_postgres_urls_get_psycopg():
    from onelane.ops.relay import database_url

    assert outbox.task_id_of(17, "0a1b2c3d4e5f") == "outbox-17-0a1b2c3d4e5f"
    assert database_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert database_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert database_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


@pytest.mark.unit
def test_outbox_settings_defaults_and_bad_values_named():
    s = load_settings({})
    assert (s.outbox_db, s.outbox_poll_ms, s.outbox_keep_s, s.outbox_listen) == ("", 100, 86_400, True)
    s = load_settings({"ONELANE_OUTBOX_DB": "postgresql+psycopg://u:pw@db/app", "ONELANE_OUTBOX_POLL_MS": "25",
                       "ONELANE_OUTBOX_KEEP": "0", "ONELANE_OUTBOX_LISTEN": "0"})
    assert (s.outbox_db, s.outbox_poll_ms, s.outbox_keep_s, s.outbox_listen) == (
        "postgresql+psycopg://u:pw@db/app", 25, 0, False)
    for env, name in [({"ONELANE_OUTBOX_POLL_MS": "0"}, "ONELANE_OUTBOX_POLL_MS"),
                      ({"ONELANE_OUTBOX_POLL_MS": "fast"}, "ONELANE_OUTBOX_POLL_MS"),
                      ({"ONELANE_OUTBOX_KEEP": "-1"}, "ONELANE_OUTBOX_KEEP"),
                      ({"ONELANE_OUTBOX_LISTEN": "maybe"}, "ONELANE_OUTBOX_LISTEN"),
                      ({"ONELANE_OUTBOX_DB": "secret-pw@db-host/app"}, "ONELANE_OUTBOX_DB")]:
        with pytest.raises(ConfigError, match=name) as info:
            load_settings(env)
        assert "secret-pw" not in str(info.value)


@pytest.mark.unit
def test_the_outbox_is_reachable_as_onelane_outbox_and_tasks_outbox():
    import onelane
    import tasks

    assert onelane.outbox is outbox and tasks.outbox is outbox
    assert "CREATE TABLE onelane_outbox" in outbox.ddl("postgresql") and "AUTOINCREMENT" in outbox.ddl("sqlite")


@pytest.mark.unit
def test_onelane_works_without_the_outbox_extra(base_env):
    # Given an interpreter where SQLAlchemy cannot be imported (the extra is not installed)
    code = """
import json, sys
sys.modules["sqlalchemy"] = None
import onelane.ops.cli, onelane.ops.beat, onelane.ops.relay, onelane.ops.status
from onelane import outbox
try:
    outbox.add(object(), "https://example.com/x")
    err = None
except outbox.OutboxError as exc:
    err = str(exc)
print(json.dumps({"err": err}))
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=str(procs.ROOT), env=base_env, capture_output=True,
                         text=True, timeout=60)
    # Then every onelane module still imports, and using the outbox says what to install
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pip install 'onelane[outbox]'" in json.loads(run.stdout.strip().splitlines()[-1])["err"]


# -- redis: the relay in this process ------------------------------------------------------------
@pytest.mark.redis
def test_relay_publishes_committed_rows_per_lane_in_order_with_task_ids_from_the_row(sqlite_url, redis_client):
    # Given three committed callouts on the default lane and one on "erp", and a rolled-back one
    ids = write(sqlite_url, *({"url": f"https://example.com/{i}", "json": {"i": i}} for i in range(3)))
    write(sqlite_url, {"url": "https://example.com/gone"}, commit=False)
    [erp] = write(sqlite_url, {"url": "https://example.com/erp", "idempotency_key": "own-key"}, lane="erp")
    relay = relay_for(sqlite_url)
    # When the relay makes a pass
    done = relay.pass_once()
    # Then each lane's queue holds its callouts in commit order, task ids derived from the rows
    assert (done.published, done.dead_lettered, done.more) == (4, 0, False)
    by_id = {r.id: r for r in rows(sqlite_url)}
    serial = queued(redis_client, "serial")
    assert [tid for tid, _ in serial] == [outbox.task_id_of(i, by_id[i].nonce) for i in ids]
    assert [kw["json"] for _, kw in serial] == [{"i": 0}, {"i": 1}, {"i": 2}]
    # the default idempotency key is the task id; a key of the producer's own is kept
    assert all(kw["idempotency_key"] == tid for tid, kw in serial)
    [(erp_tid, erp_kw)] = queued(redis_client, "erp")
    assert erp_tid == outbox.task_id_of(erp, by_id[erp].nonce) and erp_kw["idempotency_key"] == "own-key"
    # rows are marked with their task id, and a second pass publishes nothing again
    assert all(r.published_ms and r.task_id == outbox.task_id_of(r.id, r.nonce) and r.error is None
               for r in by_id.values())
    assert relay.pass_once().published == 0 and len(queued(redis_client, "serial")) == 3
    relay.leases.release_all()


@pytest.mark.redis
def test_a_row_that_no_longer_validates_is_dead_lettered_with_its_row_id_and_blocks_nothing(sqlite_url,
                                                                                              redis_client):
    # Given four committed rows, two of them edited by hand afterwards
    ids = write(sqlite_url, *({"url": f"https://example.com/{i}"} for i in range(4)))
    engine = sa.create_engine(sqlite_url)
    t = outbox.table()
    with engine.begin() as conn:
        conn.execute(t.update().where(t.c.id == ids[1]).values(kwargs='{"url": "ftp://example.com/1"}'))
        conn.execute(t.update().where(t.c.id == ids[3]).values(kwargs="{not json"))
    # When the relay passes
    relay = relay_for(sqlite_url)
    done = relay.pass_once()
    relay.leases.release_all()
    # Then the good rows are published in order, the bad ones dead-lettered with their row ids
    assert (done.published, done.dead_lettered) == (2, 2)
    assert [kw["url"] for _, kw in queued(redis_client, "serial")] == ["https://example.com/0",
                                                                      "https://example.com/2"]
    from onelane.callout.ledger import Ledger

    letters = Ledger(redis_client, Keys(), window_s=60).dead_letters("serial")
    assert [(e["outbox_row"], e["kind"]) for e in letters] == [(ids[1], "invalid"), (ids[3], "invalid")]
    assert "'url'" in letters[0]["reason"] and f"outbox row {ids[1]}" in letters[0]["reason"]
    assert "not JSON" in letters[1]["reason"]
    by_id = {r.id: r for r in rows(sqlite_url)}
    assert by_id[ids[1]].error == letters[0]["reason"] and by_id[ids[1]].published_ms
    assert by_id[ids[0]].error is None
    # and `onelane dlq list` shows them with the row id
    out = subprocess.run([str(procs.VENV_BIN / "onelane"), "dlq", "list", "--json"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and [e["outbox_row"] for e in json.loads(out.stdout)] == [ids[1], ids[3]]


@pytest.mark.redis
def test_status_shows_the_outbox_depth_and_the_oldest_rows_age_per_lane(sqlite_url, redis_client):
    from rich.console import Console

    from onelane.ops.cli import render, render_overview
    from onelane.ops.status import overview, snapshot

    # Given two rows waiting on "serial", the oldest written 30 s ago, and one on "erp"
    ids = write(sqlite_url, {"url": "https://example.com/1"}, {"url": "https://example.com/2"})
    write(sqlite_url, {"url": "https://example.com/3"}, lane="erp")
    engine = sa.create_engine(sqlite_url)
    t = outbox.table()
    with engine.begin() as conn:
        conn.execute(t.update().where(t.c.id == ids[0]).values(created_ms=int(time.time() * 1000) - 30_000))
    keys, s = Keys(), get_settings()
    assert snapshot(redis_client, keys, "serial", s).outbox is None  # no relay has reported yet
    # When a relay reports before publishing
    relay = relay_for(sqlite_url)
    relay.report(force=True)
    # Then status shows each lane's depth and oldest age, from Redis alone
    serial = snapshot(redis_client, keys, "serial", s).outbox
    assert serial["depth"] == 2 and 29 <= serial["oldest_age_s"] < 60 and serial["relay"] is None
    assert snapshot(redis_client, keys, "erp", s).outbox["depth"] == 1
    # the overview lists every lane the outbox feeds (no worker has consumed "erp" yet), with its outbox
    lines = {line["name"]: line for line in overview(redis_client, keys, s)["lanes"]}
    assert lines["erp"]["outbox"]["depth"] == 1 and lines["serial"]["outbox"]["depth"] == 2
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(render_overview(overview(redis_client, keys, s)))
    assert re.search(r"serial .* 2 \(3\d s\)", console.export_text()), console.export_text()
    # and after the relay published them: depth 0, and the relay that holds the lane
    relay.pass_once()
    relay.report(force=True)
    after = snapshot(redis_client, keys, "serial", s).outbox
    assert after["depth"] == 0 and after["oldest_age_s"] is None and after["relay"]["label"] == relay.label
    # the resource lease table does not list the relay's lane leases
    assert not [le for le in snapshot(redis_client, keys, "serial", s).leases if le["name"].startswith("relay:")]
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(render(snapshot(redis_client, keys, "serial", s)))
    assert re.search(r"outbox\s+0 waiting, oldest -", console.export_text())
    relay.leases.release_all()


@pytest.mark.redis
def test_published_rows_are_kept_for_the_keep_time_or_deleted_at_once(sqlite_url, redis_client):
    # Given ONELANE_OUTBOX_KEEP=0: published rows are deleted by the batch that publishes them
    write(sqlite_url, {"url": "https://example.com/1"}, {"url": "https://example.com/2"})
    relay = relay_for(sqlite_url, outbox_keep_s=0)
    assert relay.pass_once().published == 2 and rows(sqlite_url) == []
    relay.leases.release_all()
    # Given a keep time of 60 s: rows stay, until they are older than that
    ids = write(sqlite_url, {"url": "https://example.com/3"}, {"url": "https://example.com/4"})
    relay = relay_for(sqlite_url, outbox_keep_s=60)
    assert relay.pass_once().published == 2 and [r.id for r in rows(sqlite_url)] == ids
    assert relay.clean(force=True) == 0
    engine = sa.create_engine(sqlite_url)
    t = outbox.table()
    with engine.begin() as conn:
        conn.execute(t.update().where(t.c.id == ids[0]).values(published_ms=int(time.time() * 1000) - 61_000))
    assert relay.clean(force=True) == 1 and [r.id for r in rows(sqlite_url)] == ids[1:]
    relay.leases.release_all()


@pytest.mark.redis
def test_one_relay_at_a_time_publishes_a_lane(sqlite_url, redis_client):
    # Given relay A holding the lane "serial"
    write(sqlite_url, {"url": "https://example.com/1"})
    a, b = relay_for(sqlite_url), relay_for(sqlite_url)
    assert a.pass_once().published == 1
    # When more rows commit, relay B (a live standby) publishes nothing while A holds the lane
    write(sqlite_url, {"url": "https://example.com/2"})
    assert b.pass_once().published == 0
    assert len(queued(redis_client, "serial")) == 1
    # and takes over as soon as A lets go
    a.leases.release_all()
    assert b.pass_once().published == 1
    assert [kw["url"] for _, kw in queued(redis_client, "serial")] == ["https://example.com/1",
                                                                      "https://example.com/2"]
    b.leases.release_all()


@pytest.mark.redis
def test_sqlite_producers_and_the_relay_write_at_the_same_time_without_lock_errors(sqlite_url, redis_client):
    import threading

    # Given a producer thread committing 60 transactions while a relay passes in a loop
    relay = relay_for(sqlite_url)
    errors, committed = [], []

    def produce():
        try:
            for i in range(60):
                committed.extend(write(sqlite_url, {"url": f"https://example.com/{i}", "json": {"i": i}}))
        except Exception as exc:  # "database is locked" would land here
            errors.append(exc)
    producer = threading.Thread(target=produce)
    producer.start()
    published = 0
    give_up = time.monotonic() + 60
    while (producer.is_alive() or published < len(committed)) and time.monotonic() < give_up:
        published += relay.pass_once().published
    producer.join(10)
    relay.leases.release_all()
    # Then nothing failed, and every row was published once, in commit order
    assert errors == [] and published == len(committed) == 60
    assert [kw["json"]["i"] for _, kw in queued(redis_client, "serial")] == list(range(60))


@pytest.mark.redis
def test_relay_command_says_what_is_missing(base_env, tmp_path, sqlite_url):
    onelane = str(procs.VENV_BIN / "onelane")
    # no database named
    run = subprocess.run([onelane, "relay"], env=base_env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--db URL" in run.stderr and "ONELANE_OUTBOX_DB" in run.stderr
    # a database without the table
    run = subprocess.run([onelane, "relay", "--db", f"sqlite:///{tmp_path / 'none.db'}", "--once"],
                         env=base_env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "onelane_outbox" in run.stderr and "create_table" in run.stderr
    # a Redis that may evict keys (the relay's leases, the worker's memory of done callouts)
    from demo.redis_server import RedisServer

    with RedisServer(appendonly=False, extra_args=("--maxmemory-policy", "allkeys-lru")) as evicting:
        run = subprocess.run([onelane, "relay", "--db", sqlite_url, "--once"], env={**base_env, "REDIS_URL": evicting.url},
                             capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "'allkeys-lru'" in run.stderr and "ONELANE_ALLOW_EVICTION=1" in run.stderr
    # a URL SQLAlchemy does not know
    run = subprocess.run([onelane, "relay", "--db", "nosuchdb://x/y"], env=base_env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1 and "not a database URL" in run.stderr


# -- e2e: PostgreSQL, real relay, worker and beat processes ---------------------------------------
@pytest.fixture(scope="session")
def pg_server():
    server = PostgresServer().start()
    yield server
    server.close()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh PostgreSQL database with the outbox table."""
    url = pg_server.create_database()
    engine = sa.create_engine(url)
    outbox.create_table(engine)
    engine.dispose()
    return url


def api_keys(api) -> list[str]:
    return [c.key for c in api.snapshot()]


@pytest.mark.e2e
def test_rolled_back_callouts_never_reach_the_api_committed_ones_once_each_in_order(
        base_env, redis_client, api, start, pg_url):
    # Given a worker and a relay woken by NOTIFY
    start(procs.worker(base_env))
    relay = start(RelayProcess(base_env, pg_url))
    assert "waking by LISTEN/NOTIFY" in relay.log()
    # When a transaction with two callouts rolls back, then one with three commits
    write(pg_url, {"url": f"{api.url}/x", "idempotency_key": "rb-1"},
          {"url": f"{api.url}/x", "idempotency_key": "rb-2"}, commit=False)
    write(pg_url, *({"url": f"{api.url}/o", "json": {"n": n}, "idempotency_key": f"c-{n}"} for n in range(3)))
    # Then the API sees each committed callout once, in insertion order, and nothing of the rollback
    wait_for(lambda: len(api.snapshot()) >= 3, 30, what="three callouts at the API")
    time.sleep(0.5)  # room for anything extra to arrive
    assert api_keys(api) == ["c-0", "c-1", "c-2"]
    assert [c.json() for c in api.snapshot()] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert api.overlaps == 0
    wait_for(lambda: all(r.published_ms for r in rows(pg_url)), 10, what="rows marked published")
    assert len(rows(pg_url)) == 3
    # and a stopped relay (SIGTERM) exits cleanly and lets go of its lane at once
    assert redis_client.exists("onelane:lease:relay:serial")
    assert relay.stop() == 0 and "relay stopped" in relay.log()
    assert not redis_client.exists("onelane:lease:relay:serial")


@pytest.mark.e2e
def test_a_producer_killed_right_after_its_commit_loses_nothing(base_env, redis_client, api, start, pg_url):
    # Given a producer that commits two callouts and is killed -9 before it could publish anything
    producer = subprocess.Popen([sys.executable, "-m", "tests.outbox_procs", "commit-and-hang", "--db", pg_url,
                                 "--api", api.url, "--keys", "k-1,k-2"], cwd=str(procs.ROOT), env=base_env,
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert producer.stdout.readline().strip() == "committed"
    finally:
        producer.kill()
        producer.wait(timeout=10)
    assert producer.returncode == -9
    # When a relay and a worker run
    start(procs.worker(base_env))
    start(RelayProcess(base_env, pg_url))
    # Then both callouts arrive, once each, in order
    wait_for(lambda: len(api.snapshot()) >= 2, 30, what="both callouts at the API")
    time.sleep(0.3)
    assert api_keys(api) == ["k-1", "k-2"]


@pytest.mark.e2e
def test_a_relay_killed_between_publishing_and_marking_does_not_double_the_call(
        base_env, redis_client, api, start, pg_url, pg_server):
    import psycopg

    # Given a committed callout, and the table locked so that marking it waits (SHARE: reads and
    # SELECT ... FOR UPDATE pass, the relay's UPDATE blocks)
    [row_id] = write(pg_url, {"url": f"{api.url}/once", "idempotency_key": "once"})
    worker = start(procs.worker(base_env))
    lock = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"))
    try:
        lock.execute("LOCK TABLE onelane_outbox IN SHARE MODE")
        # When a relay publishes it (the worker runs it) and is killed -9 while marking it
        first = start(RelayProcess(base_env, pg_url, name="relay1"))
        wait_for(lambda: len(api.calls_for("once")) == 1, 30, what="the call at the API")
        first.kill9()
        assert lock.execute("SELECT published_ms FROM onelane_outbox WHERE id = %s", (row_id,)).fetchone() == (None,)
    finally:
        lock.rollback()
        lock.close()
    # and a relay starts again: it takes over the dead relay's lane and publishes the row again
    second = start(RelayProcess(base_env, pg_url, name="relay2"))
    wait_for(lambda: rows(pg_url)[0].published_ms, 30, what="the row marked published")
    second.wait_log("published 1 row(s)", 10)
    # Then the worker dropped the second copy (same task id): the API saw the call once
    task_id = rows(pg_url)[0].task_id
    worker.wait_log(f"{task_id} already has a recorded outcome", 30)
    assert len(api.calls_for("once")) == 1 and len(api.snapshot()) == 1


@pytest.mark.e2e
def test_postgresql_restarted_under_the_relay_loses_nothing(base_env, redis_client, api, start):
    # Given a relay (NOTIFY) and a worker on a PostgreSQL server of this test's own
    with PostgresServer() as pg:
        url = pg.create_database()
        engine = sa.create_engine(url)
        outbox.create_table(engine)
        engine.dispose()
        start(procs.worker(base_env))
        relay = start(RelayProcess(base_env, url))
        write(url, {"url": f"{api.url}/r", "idempotency_key": "before"})
        wait_for(lambda: api_keys(api) == ["before"], 30, what="the first callout")
        # When the server restarts under it (every connection cut) and a callout commits after that
        pg.restart()
        write(url, {"url": f"{api.url}/r", "idempotency_key": "after"})
        # Then the relay waits the outage out, listens again, and the callout arrives once
        wait_for(lambda: api_keys(api) == ["before", "after"], 30, what="the callout after the restart")
        assert "pass failed" in relay.log() and relay.log().count("relay ready") >= 2
        relay.stop()


def run_producers(base_env, pg_url, api, producers: int, transactions: int, gap_ms: float = 4
                  ) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "tests.outbox_procs", "produce", "--db", pg_url, "--api", api.url,
                              "--producer", str(p), "--transactions", str(transactions), "--gap-ms", str(gap_ms)],
                             cwd=str(procs.ROOT),
                             env=base_env, stdout=subprocess.PIPE, text=True, start_new_session=True)
            for p in range(producers)]


def producer_results(ps: list[subprocess.Popen]) -> dict[int, dict]:
    out = {}
    try:
        for p, proc in enumerate(ps):
            stdout, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"producer {p} exited with {proc.returncode}"
            out[p] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for proc in ps:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return out


def check_exactly_committed_in_order(api, produced: dict[int, dict]) -> int:
    calls = api.snapshot()
    keys = [c.key for c in calls]
    committed = [k for r in produced.values() for k in r["committed"]]
    assert len(keys) == len(set(keys)), "a callout reached the API twice"
    assert set(keys) == set(committed), (set(committed) - set(keys), set(keys) - set(committed))
    assert not set(keys) & {k for r in produced.values() for k in r["rolled_back"]}
    for p, r in produced.items():
        seen = [k for k in keys if k.startswith(f"p{p}-")]
        assert seen == r["committed"], f"producer {p}'s callouts out of commit order"
    assert api.overlaps == 0 and api.max_concurrency == 1
    return len(keys)


@pytest.mark.e2e
def test_3_producers_x_100_transactions_exactly_the_committed_callouts_once_each_in_commit_order(
        base_env, redis_client, api, start, pg_url):
    # Given a worker and a relay woken by NOTIFY
    start(procs.worker(base_env))
    start(RelayProcess(base_env, pg_url))
    # When 3 producer processes run 100 transactions each (1-3 callouts, every tenth rolled back)
    t0 = time.time()
    produced = producer_results(run_producers(base_env, pg_url, api, 3, 100))
    expected = sum(len(r["committed"]) for r in produced.values())
    wait_for(lambda: len(api.snapshot()) >= expected, 120, 0.1, what=f"{expected} callouts at the API")
    took = time.time() - t0
    time.sleep(0.5)
    # Then the API saw exactly the committed callouts, once each, each producer's in commit order
    n = check_exactly_committed_in_order(api, produced)
    rolled_back = sum(len(r["rolled_back"]) for r in produced.values())
    print(f"\n3x100: {n} committed callouts reached the API once each, {rolled_back} rolled back never did; "
          f"{took:.1f} s from the first transaction to the last call, 0 overlaps")
    assert rolled_back > 0


@pytest.mark.e2e
def test_two_relays_at_once_still_once_each_in_order_and_the_standby_takes_over(
        base_env, redis_client, api, start, pg_url):
    # Given a worker and two relays on the same database (relay lease TTL 2 s)
    env = {**base_env, "ONELANE_GUARD_TTL": "2"}
    start(procs.worker(env))
    relays = [start(RelayProcess(env, pg_url, name=f"relay{i}")) for i in (1, 2)]
    # When 2 producers run 60 transactions each and, while they run, the relay holding the lane is killed -9
    ps = run_producers(base_env, pg_url, api, 2, 60, gap_ms=40)
    wait_for(lambda: sum(1 for r in rows(pg_url) if r.published_ms) >= 20, 60, what="the first rows published")
    holder = wait_for(lambda: redis_client.hget("onelane:lease:relay:serial:holder", "pid"), 10,
                      what="the relay lease")
    [killed] = [r for r in relays if r.pid == int(holder)]
    [standby] = [r for r in relays if r is not killed]
    killed.kill9()
    assert all(p.poll() is None for p in ps), "the producers finished before the kill: nothing left to take over"
    produced = producer_results(ps)
    expected = sum(len(r["committed"]) for r in produced.values())
    wait_for(lambda: len(api.snapshot()) >= expected, 60, 0.1, what=f"{expected} callouts at the API")
    time.sleep(0.5)
    # Then still once each, in commit order; the standby published after the kill
    check_exactly_committed_in_order(api, produced)
    assert "published" in killed.log() and "published" in standby.log()
    assert "taking over lane 'serial'" in standby.log() or "now publishing lane 'serial'" in standby.log()


@pytest.mark.e2e
def test_beat_runs_the_relay_with_onelane_outbox_db_polling_sqlite(base_env, redis_client, api, start, sqlite_url):
    # Given beat with ONELANE_OUTBOX_DB (SQLite: no NOTIFY, polled every 50 ms) and a worker
    env = {**base_env, "ONELANE_OUTBOX_DB": sqlite_url, "ONELANE_OUTBOX_POLL_MS": "50"}
    start(procs.worker(env))
    beat = start(procs.beat(env))
    beat.wait_log("relay ready", 30)
    assert "polling every 50 ms" in beat.log()
    # When a transaction commits three callouts
    write(sqlite_url, *({"url": f"{api.url}/b", "idempotency_key": f"b-{n}"} for n in range(3)))
    # Then they reach the API once each, in order
    wait_for(lambda: len(api.snapshot()) >= 3, 30, what="three callouts at the API")
    time.sleep(0.3)
    assert api_keys(api) == ["b-0", "b-1", "b-2"]
    # and status shows the drained outbox of the lane
    wait_for(lambda: json.loads(redis_client.hget("onelane:outbox", "serial") or "{}").get("depth") == 0, 10,
             what="the outbox reported empty")


@pytest.mark.e2e
def test_the_readme_ddl_makes_a_table_the_outbox_and_relay_use(redis_client, pg_server):
    # Given the table created from the README's DDL instead of create_table
    readme = (procs.ROOT / "README.md").read_text()
    [ddl] = re.findall(r"```sql\n(.*?)```", readme, re.S)
    url = pg_server.create_database()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(ddl)  # the whole block, as a user would paste it into psql
    # Then it has the columns and indexes create_table makes
    insp = sa.inspect(engine)
    assert [c["name"] for c in insp.get_columns("onelane_outbox")] == [c.name for c in outbox.table().columns]
    assert {i["name"] for i in insp.get_indexes("onelane_outbox")} == {i.name for i in outbox.table().indexes}
    # and a callout written into it is relayed
    write(url, {"url": "https://example.com/readme"})
    from onelane.ops.relay import Relay

    assert Relay(url).drain().published == 1
    assert [kw["url"] for _, kw in queued(redis_client, "serial")] == ["https://example.com/readme"]
    engine.dispose()
