"""The ``onelane`` command: status of every lane, dead letters, pause/resume, the reaper, batches.

Every command reads the same settings as the worker (REDIS_URL, ONELANE_QUEUE, ...). A
command about one lane takes it as an argument or as ``-q/--lane``; without one it means
the default lane (ONELANE_QUEUE) — or, for ``status`` and ``reap``, every lane.
"""
from __future__ import annotations

import functools
import json
import sys
import time

import click
import redis
from rich.console import Console
from rich.table import Table

from onelane.core.clients import (
    client_for,
    connect_hint,
    is_not_redis,
    not_redis_message,
    redact_url,
    refusal_reason,
    sentinel_problem,
)
from onelane.core.errors import ConfigError
from onelane.core.keys import Keys
from onelane.core.settings import get_settings
from onelane.core.text import text
from onelane.delivery import flow, registry

console = Console()


class _Env:
    def __init__(self):
        try:
            self.s = get_settings()
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        self.keys = Keys(self.s.key_prefix)
        self.client = client_for(self.s)

    def lane(self, *given: str | None) -> str:
        """The lane named by the argument or the option (they must agree), else the default lane."""
        named = {g for g in given if g}
        if len(named) > 1:
            raise click.UsageError(f"two different lanes given: {', '.join(sorted(named))}")
        return named.pop() if named else self.s.queue

    def known(self, lane: str) -> bool:
        return registry.is_known(self.client, self.keys, lane, default_lane=self.s.queue,
                                 bulk_queue=self.s.bulk_queue)

    def unknown_note(self, lane: str) -> str | None:
        if self.known(lane):
            return None
        lanes = registry.lanes(self.client, self.keys, default_lane=self.s.queue, bulk_queue=self.s.bulk_queue)
        return (f"no worker has ever consumed a lane {lane!r} (known lanes: {', '.join(lanes)}); "
                f"start one with `celery -A tasks worker -Q {lane}`")


def _redis_errors(fn):
    """Turn an unreachable or wrong Redis into one line saying what to check."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            problem = sentinel_problem(get_settings(), exc)
            if problem:
                raise click.ClickException(problem) from None
            url = redact_url(get_settings().redis_url)
            raise click.ClickException(f"cannot reach Redis at {url} ({exc}); {connect_hint(exc)}") from None
        except redis.RedisError as exc:
            if is_not_redis(exc):
                raise click.ClickException(not_redis_message(get_settings().redis_url, exc)) from None
            reason = refusal_reason(exc)
            if reason:
                raise click.ClickException(f"{reason} ({exc}); nothing was changed — try again once it "
                                           "answers (see `onelane status`)") from None
            raise
    return wrapper


def lane_option(fn):
    return click.option("--lane", "--queue", "-q", "lane_opt", default=None, metavar="LANE",
                        help="the lane (default ONELANE_QUEUE)")(fn)


@click.group(help="onelane: one-at-a-time callouts to fragile APIs. Settings come from the environment.")
def main():
    pass


# -- dead letters ---------------------------------------------------------------------------
@main.group(help="Dead letters: callouts that failed for good, per lane.")
def dlq():
    pass


def _entries(env: _Env, queue: str) -> list[dict]:
    from onelane.callout.ledger import Ledger

    return Ledger(env.client, env.keys, window_s=env.s.dedupe_window_s).dead_letters(queue)


def _when(ts) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(ts or 0))


@dlq.command("list", help="List the dead letters of a lane, oldest first.")
@click.argument("lane", required=False)
@lane_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@_redis_errors
def dlq_list(lane, lane_opt, as_json):
    env = _Env()
    q = env.lane(lane, lane_opt)
    entries = _entries(env, q)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        console.print(f"no dead letters in {q!r}")
        return
    wide = console.width >= 120
    t = Table(title=f"dead letters of {q!r} ({len(entries)})", expand=False)
    t.add_column("id", no_wrap=True, overflow="ellipsis", max_width=36 if wide else 14)
    if wide:
        t.add_column("when", no_wrap=True)
    t.add_column("kind", no_wrap=True)
    t.add_column("att.", justify="right", no_wrap=True)
    if wide:
        t.add_column("request", overflow="ellipsis", no_wrap=True, max_width=50)
    t.add_column("reason", overflow="ellipsis", no_wrap=True, ratio=1)
    for e in entries:
        req = e.get("request", {})
        row = [e["id"]] + ([_when(e.get("dead_lettered_at"))] if wide else []) + [
            e.get("kind", ""), str(len(e.get("attempts", [])))]
        if wide:
            row.append(f"{req.get('method', 'POST')} {req.get('url', '?')}")
        row.append(" ".join(str(e.get("reason", "")).split())[:300])
        t.add_row(*row)
    console.print(t)
    if not wide:
        console.print("(ids shortened; `onelane dlq list --json` or a wider terminal shows them whole)")


@dlq.command("show", help="Show one dead letter in full.")
@click.argument("entry_id")
@lane_option
@_redis_errors
def dlq_show(entry_id, lane_opt):
    env = _Env()
    q = env.lane(lane_opt)
    raw = env.client.hget(env.keys.dead_letters(q), entry_id)
    if raw is None:
        raise click.ClickException(f"no dead letter {entry_id!r} in {q!r}; see `onelane dlq list {q}`")
    click.echo(json.dumps(json.loads(raw), indent=2))


@dlq.command("replay", help="Publish dead letters again, with the same idempotency key. A header masked "
                            "when stored comes from the worker's credentials file or from --header; "
                            "otherwise that entry is refused.")
@click.argument("entry_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="replay every dead letter of the lane")
@click.option("--header", "-H", "headers", multiple=True, metavar="'NAME: VALUE'",
              help="a header to send with the replay (for one masked when stored); repeatable")
@lane_option
@_redis_errors
def dlq_replay(entry_ids, replay_all, headers, lane_opt):
    from onelane.callout import credentials
    from onelane.celery_app import app
    from onelane.ops.replay import parse_header_options, plan_replay

    env = _Env()
    q = env.lane(lane_opt)
    if not entry_ids and not replay_all:
        raise click.UsageError("name the dead letters to replay, or pass --all")
    try:
        supplied = parse_header_options(headers)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    entries = _entries(env, q)
    if not replay_all:
        wanted = set(entry_ids)
        missing = wanted - {e["id"] for e in entries}
        if missing:
            raise click.ClickException(f"no dead letter {', '.join(sorted(missing))} in {q!r}")
        entries = [e for e in entries if e["id"] in wanted]
    replayed, refused = 0, 0
    for e in entries:
        resource = (e.get("request") or {}).get("resource") or q
        plan = plan_replay(e, queue=q, credentials=credentials.headers_for(env.s.credentials_file, resource),
                           supplied=supplied)
        if plan.kwargs is None:
            refused += 1
            console.print(f"[yellow]not replayed {e['id']}[/]: {plan.refused}")
            continue
        from onelane.core.redaction import redact_kwargs

        shown = repr(redact_kwargs(plan.kwargs, env.s.redact_headers))
        result = app.send_task("tasks.callout", kwargs=plan.kwargs, queue=q, kwargsrepr=shown)
        pipe = env.client.pipeline(transaction=True)
        pipe.hdel(env.keys.dead_letters(q), e["id"])
        pipe.zrem(env.keys.dead_letter_index(q), e["id"])
        pipe.execute()
        replayed += 1
        note = f"; {', '.join(plan.from_credentials)} from the credentials file" if plan.from_credentials else ""
        console.print(f"replayed {e['id']} as task {result.id} (idempotency key "
                      f"{plan.kwargs['idempotency_key']}){note}")
    console.print(f"{replayed} dead letter(s) replayed to {q!r}" + (f", {refused} not replayed" if refused else ""))
    if refused:
        sys.exit(1)


@dlq.command("purge", help="Delete every dead letter of a lane.")
@click.argument("lane", required=False)
@lane_option
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@_redis_errors
def dlq_purge(lane, lane_opt, yes):
    env = _Env()
    q = env.lane(lane, lane_opt)
    n = env.client.zcard(env.keys.dead_letter_index(q))
    if n == 0:
        console.print(f"no dead letters in {q!r}")
        return
    if not yes and not click.confirm(f"delete {n} dead letter(s) of {q!r} for good?", default=False):
        raise click.ClickException("nothing deleted")
    env.client.delete(env.keys.dead_letters(q), env.keys.dead_letter_index(q))
    console.print(f"deleted {n} dead letter(s) of {q!r}")


# -- the kill switch ---------------------------------------------------------------------------
@main.command(help="Stop new callouts of a lane from starting; the one in flight finishes, nothing is lost.")
@click.argument("lane", required=False)
@lane_option
@_redis_errors
def pause(lane, lane_opt):
    env = _Env()
    q = env.lane(lane, lane_opt)
    note = env.unknown_note(q)
    if note:
        console.print(f"[yellow]warning[/]: {note}; pausing it anyway")
    flow.pause(env.client, env.keys, q)
    console.print(f"paused {q!r}: no new callout starts until `onelane resume {q}` (survives worker restarts)")


@main.command(help="Let a paused lane run again, in order.")
@click.argument("lane", required=False)
@lane_option
@_redis_errors
def resume(lane, lane_opt):
    env = _Env()
    q = env.lane(lane, lane_opt)
    was = flow.resume(env.client, env.keys, q)
    console.print(f"resumed {q!r}" if was else f"{q!r} was not paused")


# -- the reaper ----------------------------------------------------------------------------------
@main.command(help="Run the reaper once over every lane (or one) and say what it did.")
@click.argument("lane", required=False)
@lane_option
@_redis_errors
def reap(lane, lane_opt):
    from onelane.delivery.reaper import reap_everything

    env = _Env()
    only = lane or lane_opt
    if lane and lane_opt and lane != lane_opt:
        raise click.UsageError(f"two different lanes given: {lane}, {lane_opt}")
    report = reap_everything(env.client, env.keys, env.s, only=only)
    where = ", ".join(repr(x) for x in report.queues) or "no queue"
    console.print(f"reaper on {where}: {report.summary()}")
    for name in report.zombie_leases:
        console.print(f"  cleared zombie lease {name}")
    for tid in report.requeued:
        console.print(f"  requeued {tid} at the head")


# -- status ----------------------------------------------------------------------------------------
@main.command(help="Every lane at a glance, or one lane in detail.")
@click.argument("lane", required=False)
@lane_option
@click.option("--json", "as_json", is_flag=True, help="print the stable JSON form")
@_redis_errors
def status(lane, lane_opt, as_json):
    from onelane.ops.status import dumps, overview, snapshot

    env = _Env()
    if not lane and not lane_opt:
        data = overview(env.client, env.keys, env.s)
        if as_json:
            click.echo(dumps(data))
        else:
            console.print(render_overview(data))
        return
    q = env.lane(lane, lane_opt)
    snap = snapshot(env.client, env.keys, q, env.s)
    if as_json:
        click.echo(dumps(snap))
        return
    note = env.unknown_note(q)
    if note:
        console.print(f"[yellow]note[/]: {note}")
    console.print(render(snap))


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _holder(h) -> str:
    return f"{h['label'].removeprefix('worker ')} (pid {h['pid']})" if h else "[yellow]none[/]"


def render_overview(data):
    from rich.console import Group

    t = Table(title="lanes", expand=False)
    for col, kw in (("lane", {"no_wrap": True}), ("depth", {"justify": "right"}),
                    ("in flight", {"justify": "right"}), ("holder", {"overflow": "ellipsis", "max_width": 30}),
                    ("stby", {"justify": "right"}), ("paused", {}), ("dlq", {"justify": "right"}),
                    ("coalesced", {"justify": "right"}), ("head waits", {"justify": "right"})):
        t.add_column(col, **kw)
    lines = data["lanes"] + data["bulk"]
    with_outbox = any(line.get("outbox") for line in lines)  # the column only where a relay reports
    if with_outbox:
        t.add_column("outbox (oldest)", justify="right")
    for line in lines:
        name = line["name"] + (" (bulk)" if line["kind"] == "bulk" else "")
        holder = _holder(line["holder"]) if line["kind"] == "lane" else "-"
        row = [name, str(line["depth"]), str(line["in_flight"]), holder, str(line["standbys"]),
               "[red]yes[/]" if line["paused"] else "no", str(line["dead_letters"]), str(line.get("coalesced", 0)),
               _age(line["head_waiting_s"])]
        if with_outbox:
            o = line.get("outbox")
            row.append("-" if o is None else f"{o['depth']} ({_age(o['oldest_age_s'])})")
        t.add_row(*row)
    parts = [t]
    opened = [c for c in data["circuits"] if c["state"] != "closed"]
    if opened:
        parts.append("circuits not closed: " + ", ".join(f"{c['resource']} {c['state']}" for c in opened))
    parts += _redis_lines(data["redis"])
    return Group(*parts)


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MB"


def _redis_lines(r: dict) -> list[str]:
    """Redis as onelane depends on it: its policy, memory, and any data loss noticed."""
    cap = _mb(r["maxmemory"]) if r["maxmemory"] else "no limit"
    policy = r["maxmemory_policy"] if r["eviction_safe"] else f"[red]{r['maxmemory_policy']} (may evict leases)[/]"
    lines = [f"redis {r['version']}: memory {_mb(r['used_memory'])} / {cap}, maxmemory-policy {policy}"]
    if r.get("replicas") or r.get("min_replicas"):
        reps = ", ".join(f"{x['address']} ({x['state']}, lag {x['lag']} s)" for x in r["replicas"]) or "[red]none[/]"
        lines.append(f"master {r['master']}, replicas: {reps}; writes wait for {r['min_replicas']} replica(s)")
    for loss in r["data_losses"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(loss["detected_ms"] / 1000))
        lines.append(f"[red]Redis lost its data[/]: noticed {when} by {loss['detected_by']} (queued and in-flight "
                     "callouts, dedupe history, dead letters and results held then are gone)")
    return lines


def render(snap):
    from rich.console import Group

    head = Table.grid(padding=(0, 2))
    head.add_row("lane" if snap.kind == "lane" else "bulk queue", f"[bold]{snap.queue}[/]", "depth", str(snap.depth))
    head.add_row("paused", "[red]yes[/]" if snap.paused else "no", "delayed retries", str(snap.delayed))
    head.add_row("dead letters", str(snap.dead_letters), "completed 1m / 1h",
                 f"{snap.completed['last_minute']} / {snap.completed['last_hour']}")
    g = snap.guard
    guard = (f"{g['label']} on {g['host']} (pid {g['pid']}), renewed {g['renewed_ago_s']:.1f} s ago" if g
             else ("-" if snap.kind == "bulk" else "[yellow]no worker holds it[/]"))
    head.add_row("guard", guard, "failed 1m / 1h", f"{snap.failed['last_minute']} / {snap.failed['last_hour']}")
    c = snap.coalescing or {}
    head.add_row("head waits", _age(snap.head_waiting_s), "coalesced",
                 f"{c.get('coalesced', 0)} (parked {c.get('parked', 0)}, keys waiting {c.get('waiting_keys', 0)})")
    for sb in snap.standbys:
        head.add_row("standby", f"{sb['label']} on {sb['host']} (pid {sb['pid']})", "", "")
    if snap.outbox is not None:  # the lane's transactional outbox, as its relay last reported it
        o = snap.outbox
        age = "-" if o["oldest_age_s"] is None else f"{o['oldest_age_s']:.1f} s"
        relay = f" by {o['relay']['label']}" if o["relay"] else ""
        head.add_row("outbox", f"{o['depth']} waiting, oldest {age}", "outbox reported",
                     f"{o['reported_ago_s']:.1f} s ago{relay}")
    parts = [head, *_redis_lines(snap.redis)]
    if snap.in_flight:
        t = Table(title="in flight")
        for col in ("task id", "resource", "attempt", "elapsed s", "deadline in s", "fence"):
            t.add_column(col)
        for r in snap.in_flight:
            t.add_row(r["task_id"], r["resource"], str(r["attempt"]), f"{r['elapsed_s']:.1f}",
                      f"{(r['deadline_ms'] - snap.now_ms) / 1000:.1f}", str(r["fence"]))
        parts.append(t)
    if snap.leases:
        t = Table(title="resource leases")
        for col in ("lease", "fencing counter", "held by", "expires in s"):
            t.add_column(col)
        for r in snap.leases:
            t.add_row(r["name"], str(r["fence"]), r["holder"] or "-",
                      f"{r['expires_in_s']:.1f}" if r["expires_in_s"] is not None else "-")
        parts.append(t)
    if snap.circuits:
        t = Table(title="circuits")
        for col in ("resource", "state", "failures", "open for s", "cool-down s"):
            t.add_column(col)
        for c in snap.circuits:
            colour = {"open": "red", "half-open": "yellow"}.get(c["state"], "green")
            t.add_row(c["resource"], f"[{colour}]{c['state']}[/]", str(c["failures"]),
                      f"{c['open_for_s']:.1f}", f"{c['cooldown_s']:.1f}")
        parts.append(t)
    if snap.limits:
        t = Table(title="capped resources")
        for col in ("resource", "held / cap", "declared", "rate /s", "adaptive", "waits", "avg wait ms"):
            t.add_column(col)
        for r in snap.limits:
            t.add_row(r["resource"], f"{r['held']} / {r['effective_cap']}", str(r["concurrency"]),
                      f"{r['rate_per_s']:g}" if r["rate_per_s"] else "-", "yes" if r["adaptive"] else "no",
                      str(r["waits"]), f"{r['average_wait_ms']:.1f}")
        parts.append(t)
    return Group(*parts)


def _watch_line(snap, done: int, left: int) -> str:
    holder = snap.guard["label"] if snap.guard else ("-" if snap.kind == "bulk" else "no worker")
    state = "paused" if snap.paused else ("idle" if left == 0 else "working")
    return (f"{time.strftime('%H:%M:%S')} {snap.queue}: {state}, depth {snap.depth}, in flight "
            f"{len(snap.in_flight)}, delayed {snap.delayed}, done {done}, dead letters {snap.dead_letters}, "
            f"holder {holder}")


@main.command(help="A live view of a lane, refreshed every second; Ctrl-C to leave. Prints plain lines "
                   "when the output is not a terminal.")
@click.argument("lane", required=False)
@lane_option
@click.option("--interval", default=1.0, show_default=True, help="seconds between refreshes")
@click.option("--count", default=0, help="stop after this many refreshes (0: until Ctrl-C)")
@_redis_errors
def watch(lane, lane_opt, interval, count):
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from onelane.ops.status import snapshot

    env = _Env()
    q = env.lane(lane, lane_opt)
    first = snapshot(env.client, env.keys, q, env.s)
    base_done = first.completed["last_hour"] + first.failed["last_hour"]
    progress = Progress(TextColumn("queued work"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.completed:.0f}/{task.total:.0f} done"), TimeRemainingColumn())
    bar = progress.add_task("work", total=1)

    def frame(snap):
        done = max(0, snap.completed["last_hour"] + snap.failed["last_hour"] - base_done)
        left = snap.depth + len(snap.in_flight) + snap.delayed
        return done, left

    shown = 0
    try:
        if not console.is_terminal:
            while True:
                snap = snapshot(env.client, env.keys, q, env.s)
                click.echo(_watch_line(snap, *frame(snap)), nl=True)
                shown += 1
                if count and shown >= count:
                    break
                time.sleep(interval)
            return
        # refreshed here, not by Live's own thread: a Ctrl-C that lands on that thread while this one
        # waits on a slow terminal would never stop the watch
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                snap = snapshot(env.client, env.keys, q, env.s)
                done, left = frame(snap)
                if done + left == 0:
                    view = Group(render(snap), f"queued work: idle — nothing queued or in flight on {q!r}")
                else:
                    progress.update(bar, completed=done, total=done + left)
                    view = Group(render(snap), progress)
                live.update(view, refresh=True)
                shown += 1
                if count and shown >= count:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        console.print("stopped watching")


# -- batches ----------------------------------------------------------------------------------------
@main.group(help="Batches published with onelane.submit_many.")
def batch():
    pass


def _batch_or_fail(env, batch_id):
    from onelane.ops.batches import batch_status

    st = batch_status(env.client, env.keys, batch_id)
    if st is None:
        raise click.ClickException(f"no batch {batch_id!r}; see `onelane batch list`")
    return st


def _batch_view(st):
    """Two lines that fit 80 columns: the bar, then the counts."""
    from rich.console import Group
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    p = Progress(TextColumn(f"[bold]{st.batch_id}[/]"), BarColumn(bar_width=None), TaskProgressColumn(),
                 TextColumn(f"{st.finished}/{st.published}{'' if st.complete else '+'}"), expand=True)
    p.add_task("", total=max(1, st.published), completed=st.finished)
    eta = "done" if st.over else ("-" if st.eta_s is None else f"ETA {st.eta_s:.0f} s")
    counts = (f"  done {st.done} · failed {st.failed} · dead-lettered {st.dead_lettered} · "
              f"{st.rate_per_s:.1f}/s · {eta}")
    return Group(p, counts)


@batch.command("list", help="Batches, newest first.")
@_redis_errors
def batch_list():
    from onelane.ops.batches import batch_status

    env = _Env()
    for raw in env.client.zrevrange(env.keys.batch_index, 0, 49):
        st = batch_status(env.client, env.keys, text(raw))
        if st:
            console.print(_batch_view(st))


@batch.command("status", help="Counts, rate and ETA of a batch.")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True)
@_redis_errors
def batch_status_cmd(batch_id, as_json):
    env = _Env()
    st = _batch_or_fail(env, batch_id)
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2))
    else:
        console.print(_batch_view(st))


@batch.command("watch", help="A live progress bar of a batch until it is done; Ctrl-C to leave.")
@click.argument("batch_id")
@click.option("--interval", default=1.0, show_default=True)
@_redis_errors
def batch_watch(batch_id, interval):
    from rich.live import Live

    env = _Env()
    st = _batch_or_fail(env, batch_id)
    try:
        with Live(_batch_view(st), console=console, refresh_per_second=4) as live:
            while not st.over:
                time.sleep(interval)
                st = _batch_or_fail(env, batch_id)
                live.update(_batch_view(st))
    except KeyboardInterrupt:
        console.print("stopped watching")
        return
    console.print(f"batch {batch_id} finished: {st.done} done, {st.failed} failed, "
                  f"{st.dead_lettered} dead-lettered")


# -- the outbox relay ---------------------------------------------------------------------------------
@main.command(help="Publish committed outbox rows to their lanes (see the README: the outbox).")
@click.option("--db", "db_url", default=None, metavar="URL",
              help="SQLAlchemy URL of the database with the outbox table (default ONELANE_OUTBOX_DB)")
@click.option("--once", is_flag=True, help="publish what is waiting now, then exit")
def relay(db_url, once):
    import logging
    import signal
    import threading

    from onelane.ops.outbox import OutboxError
    from onelane.ops.relay import Relay

    try:
        s = get_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    db_url = db_url or s.outbox_db
    if not db_url:
        raise click.UsageError("name the database: onelane relay --db URL, or set ONELANE_OUTBOX_DB "
                               "(e.g. postgresql+psycopg://user:password@host/db)")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    try:
        r = Relay(db_url, settings=s)
        if once:
            done = r.drain()
            console.print(f"published {done.published} row(s), dead-lettered {done.dead_lettered}")
            return
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):  # finish the batch in hand, release the lanes
            signal.signal(sig, lambda *_: stop.set())
        r.run(stop)
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise click.ClickException(f"cannot reach Redis at {redact_url(s.redis_url)} ({exc}); "
                                   f"{connect_hint(exc)}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("sqlalchemy"):  # the database refused or is away (--once)
            raise click.ClickException(f"the database failed: {str(exc).splitlines()[0]}; is it running, "
                                       "and is the URL right?") from None
        raise

# -- Prometheus metrics ----------------------------------------------------------------------------
@main.command(help="Serve Prometheus metrics of every lane and resource at http://BIND:PORT/metrics "
                   "(read from Redis at each scrape). Ctrl-C / SIGTERM stops it.")
@click.option("--port", default=9808, show_default=True, type=click.IntRange(0, 65535))
@click.option("--bind", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--once", is_flag=True, help="print one scrape to stdout and exit (0 even when Redis is away)")
def exporter(port, bind, once):
    import signal
    import threading

    from onelane.ops import metrics

    try:
        s = get_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if once:
        sys.stdout.write(metrics.render(s).decode())
        return
    try:
        server, _thread = metrics.serve(s, port=port, bind=bind)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {bind}:{port} ({exc}); is another exporter running? "
                                   "Choose another --port") from None
    click.echo(f"onelane: exporter serving http://{bind}:{server.server_port}/metrics "
               f"(Redis {redact_url(s.redis_url)})", err=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # timed: a signal is noticed within half a second, whatever the platform
        pass
    server.shutdown()


# -- the HTTP intake -------------------------------------------------------------------------------
@main.group(invoke_without_command=True,
            help="The HTTP intake: any platform hands callouts to a lane with one request "
                 "(needs the extra: pip install 'onelane[intake]'). Without a subcommand, run it.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; beyond loopback only with ONELANE_INTAKE_TOKENS_FILE")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="server processes")
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="one log line per request")
@click.pass_context
def intake(ctx, host, port, workers, access_log):
    if ctx.invoked_subcommand is not None:
        return
    try:
        from onelane.ops.intake.server import serve
    except ImportError as exc:
        raise click.ClickException(f"the intake needs its extra ({exc}): pip install 'onelane[intake]'") from None
    try:
        serve(host, port, workers=workers, access_log=access_log)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@intake.group(help="Bearer tokens of the intake, kept hashed in ONELANE_INTAKE_TOKENS_FILE.")
def token():
    pass


def _tokens_file(path):
    from onelane.ops.intake.tokens import TokensFile

    try:
        path = path or get_settings().intake_tokens_file
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if not path:
        raise click.UsageError("name the tokens file: --file PATH, or set ONELANE_INTAKE_TOKENS_FILE")
    return TokensFile(path)


_file_option = click.option("--file", "path", default=None, help="the tokens file (default ONELANE_INTAKE_TOKENS_FILE)")


@token.command("add", help="Make a token for the lanes; print it once (stdout), store only its hash.")
@click.option("--lane", "lanes", multiple=True, required=True, help="a lane it may use (repeat; '*': every lane)")
@click.option("--rate", default=None, help="its request rate across every intake process, e.g. 100/s or 600/m")
@click.option("--name", default="", help="a name to recognise it by (default: its id)")
@_file_option
def token_add(lanes, rate, name, path):
    tokens = _tokens_file(path)
    try:
        secret, entry = tokens.add(list(lanes), rate=rate, name=name)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(secret)
    click.echo(f"token {entry.name!r} (id {entry.id}) for lane(s) {', '.join(sorted(entry.lanes))}"
               f"{f', rate {entry.rate}' if entry.rate else ''} added to {tokens.path}. It is shown only now: "
               "keep it in your secret store; the file holds its hash. A running intake picks it up within a second.",
               err=True)


@token.command("list", help="The tokens in the file (names, ids, lanes, rates; never the tokens).")
@_file_option
def token_list(path):
    tokens = _tokens_file(path)
    try:
        entries = tokens.entries()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if not entries:
        console.print(f"no tokens in {tokens.path}")
        return
    t = Table(title=f"intake tokens in {tokens.path}")
    for col in ("name", "id", "lanes", "rate", "created"):
        t.add_column(col)
    for e in entries.values():
        t.add_row(e.name, e.id, ", ".join(sorted(e.lanes)), e.rate or "-", e.created)
    console.print(t)


@token.command("revoke", help="Remove the token with this name or id; a running intake refuses it within a second.")
@click.argument("name_or_id")
@_file_option
def token_revoke(name_or_id, path):
    tokens = _tokens_file(path)
    try:
        gone = tokens.revoke(name_or_id)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if not gone:
        raise click.ClickException(f"no token named {name_or_id!r} or with that id in {tokens.path}; "
                                   "see `onelane intake token list`")
    for e in gone:
        console.print(f"revoked {e.name!r} (id {e.id})")


if __name__ == "__main__":
    sys.exit(main())
