"""The ``onelane`` command: dead letters, pause/resume, status and the reaper.

Every command reads the same settings as the worker (REDIS_URL, ONELANE_QUEUE, ...).
"""
from __future__ import annotations

import json
import sys
import time

import click
import redis
from rich.console import Console
from rich.table import Table

from onelane.core.clients import client_for, connect_hint, redact_url
from onelane.core.errors import ConfigError
from onelane.core.keys import Keys
from onelane.core.settings import get_settings
from onelane.core.text import text
from onelane.delivery import flow

console = Console()


class _Env:
    def __init__(self):
        try:
            self.s = get_settings()
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        self.keys = Keys(self.s.key_prefix)
        self.client = client_for(self.s)

    def queue(self, queue: str | None) -> str:
        return queue or self.s.queue


def _redis_errors(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            url = redact_url(get_settings().redis_url)
            raise click.ClickException(f"cannot reach Redis at {url} ({exc}); {connect_hint(exc)}") from None
    return wrapper


@click.group(help="onelane: one-at-a-time callouts to fragile APIs. Settings come from the environment.")
def main():
    pass


# -- dead letters ---------------------------------------------------------------------------
@main.group(help="Dead letters: callouts that failed for good.")
def dlq():
    pass


def _entries(env: _Env, queue: str) -> list[dict]:
    from onelane.callout.ledger import Ledger

    return Ledger(env.client, env.keys, window_s=env.s.dedupe_window_s).dead_letters(queue)


@dlq.command("list", help="List dead letters, oldest first.")
@click.option("--queue", "-q", default=None, help="queue (default ONELANE_QUEUE)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@_redis_errors
def dlq_list(queue, as_json):
    env = _Env()
    entries = _entries(env, env.queue(queue))
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        console.print(f"no dead letters in {env.queue(queue)!r}")
        return
    t = Table(title=f"dead letters of {env.queue(queue)!r} ({len(entries)})")
    for col in ("id", "when", "kind", "attempts", "request", "reason"):
        t.add_column(col, overflow="fold")
    for e in entries:
        req = e.get("request", {})
        t.add_row(e["id"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("dead_lettered_at", 0))),
                  e.get("kind", ""), str(len(e.get("attempts", []))),
                  f"{req.get('method', 'POST')} {req.get('url', '?')}", e.get("reason", "")[:200])
    console.print(t)


@dlq.command("show", help="Show one dead letter in full.")
@click.argument("entry_id")
@click.option("--queue", "-q", default=None)
@_redis_errors
def dlq_show(entry_id, queue):
    env = _Env()
    raw = env.client.hget(env.keys.dead_letters(env.queue(queue)), entry_id)
    if raw is None:
        raise click.ClickException(f"no dead letter {entry_id!r} in {env.queue(queue)!r}; see `onelane dlq list`")
    click.echo(json.dumps(json.loads(raw), indent=2))


@dlq.command("replay", help="Publish dead letters again, with the same idempotency key.")
@click.argument("entry_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="replay every dead letter of the queue")
@click.option("--queue", "-q", default=None)
@_redis_errors
def dlq_replay(entry_ids, replay_all, queue):
    env = _Env()
    q = env.queue(queue)
    if not entry_ids and not replay_all:
        raise click.UsageError("name the dead letters to replay, or pass --all")
    entries = _entries(env, q)
    if not replay_all:
        wanted = set(entry_ids)
        missing = wanted - {e["id"] for e in entries}
        if missing:
            raise click.ClickException(f"no dead letter {', '.join(sorted(missing))} in {q!r}")
        entries = [e for e in entries if e["id"] in wanted]
    from onelane.celery_app import app

    replayed = 0
    for e in entries:
        if e.get("kind") == "invalid":
            console.print(f"[yellow]skipped {e['id']}[/]: it was rejected as invalid input "
                          f"({e.get('reason', '')}); fix it and submit it anew")
            continue
        kwargs = dict(e["request"])
        kwargs.setdefault("idempotency_key", e["task_id"])
        result = app.send_task("tasks.callout", kwargs=kwargs, queue=q)
        pipe = env.client.pipeline(transaction=True)
        pipe.hdel(env.keys.dead_letters(q), e["id"])
        pipe.zrem(env.keys.dead_letter_index(q), e["id"])
        pipe.execute()
        replayed += 1
        console.print(f"replayed {e['id']} as task {result.id} (idempotency key {kwargs['idempotency_key']})")
    console.print(f"{replayed} dead letter(s) replayed to {q!r}")


@dlq.command("purge", help="Delete every dead letter of the queue.")
@click.option("--queue", "-q", default=None)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@_redis_errors
def dlq_purge(queue, yes):
    env = _Env()
    q = env.queue(queue)
    n = env.client.zcard(env.keys.dead_letter_index(q))
    if n == 0:
        console.print(f"no dead letters in {q!r}")
        return
    if not yes and not click.confirm(f"delete {n} dead letter(s) of {q!r} for good?", default=False):
        raise click.ClickException("nothing deleted")
    env.client.delete(env.keys.dead_letters(q), env.keys.dead_letter_index(q))
    console.print(f"deleted {n} dead letter(s) of {q!r}")


# -- the kill switch ---------------------------------------------------------------------------
@main.command(help="Stop new callouts from starting; the one in flight finishes, nothing is lost.")
@click.argument("queue", required=False)
@_redis_errors
def pause(queue):
    env = _Env()
    q = env.queue(queue)
    flow.pause(env.client, env.keys, q)
    console.print(f"paused {q!r}: no new callout starts until `onelane resume {q}` (survives worker restarts)")


@main.command(help="Let a paused queue run again, in order.")
@click.argument("queue", required=False)
@_redis_errors
def resume(queue):
    env = _Env()
    q = env.queue(queue)
    was = flow.resume(env.client, env.keys, q)
    console.print(f"resumed {q!r}" if was else f"{q!r} was not paused")


# -- the reaper ----------------------------------------------------------------------------------
@main.command(help="Run the reaper once and say what it did.")
@click.argument("queue", required=False)
@_redis_errors
def reap(queue):
    from onelane.delivery.reaper import reap as reap_once

    env = _Env()
    q = env.queue(queue)
    # the bulk queue has many consumers and rules of its own: it is reaped with the serial queue
    serial_q = env.s.queue if q == env.s.bulk_queue else q
    bulk_q = env.s.bulk_queue if serial_q == env.s.queue else None
    report = reap_once(env.client, env.keys, queue=serial_q, margin_ms=env.s.guard_ttl_ms, bulk_queue=bulk_q)
    where = " and ".join(repr(x) for x in (serial_q, bulk_q) if x)
    console.print(f"reaper on {where}: {report.summary()}")
    for name in report.zombie_leases:
        console.print(f"  cleared zombie lease {name}")
    for tid in report.requeued:
        console.print(f"  requeued {tid} at the head")


# -- status ----------------------------------------------------------------------------------------
@main.command(help="What the queue is doing now.")
@click.argument("queue", required=False)
@click.option("--json", "as_json", is_flag=True, help="print the stable JSON form")
@_redis_errors
def status(queue, as_json):
    from onelane.ops.status import dumps, snapshot

    env = _Env()
    snap = snapshot(env.client, env.keys, env.queue(queue), env.s.limits)
    if as_json:
        click.echo(dumps(snap))
        return
    console.print(render(snap))


def render(snap):
    from rich.console import Group

    head = Table.grid(padding=(0, 2))
    head.add_row("queue", f"[bold]{snap.queue}[/]", "depth", str(snap.depth))
    head.add_row("paused", "[red]yes[/]" if snap.paused else "no", "delayed retries", str(snap.delayed))
    head.add_row("dead letters", str(snap.dead_letters), "completed 1m / 1h",
                 f"{snap.completed['last_minute']} / {snap.completed['last_hour']}")
    g = snap.guard
    head.add_row("guard", f"{g['label']} on {g['host']} (pid {g['pid']}), renewed {g['renewed_ago_s']:.1f} s ago"
                 if g else "[yellow]no worker holds it[/]", "failed 1m / 1h",
                 f"{snap.failed['last_minute']} / {snap.failed['last_hour']}")
    for sb in snap.standbys:
        head.add_row("standby", f"{sb['label']} on {sb['host']} (pid {sb['pid']})", "", "")
    parts = [head]
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


@main.command(help="A live view of the queue, refreshed every second; Ctrl-C to leave.")
@click.argument("queue", required=False)
@click.option("--interval", default=1.0, show_default=True, help="seconds between refreshes")
@click.option("--count", default=0, help="stop after this many refreshes (0: until Ctrl-C)")
@_redis_errors
def watch(queue, interval, count):
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from onelane.ops.status import snapshot

    env = _Env()
    q = env.queue(queue)
    first = snapshot(env.client, env.keys, q, env.s.limits)
    base_done = first.completed["last_hour"] + first.failed["last_hour"]
    progress = Progress(TextColumn("queued work"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.completed:.0f}/{task.total:.0f} done"), TimeRemainingColumn())
    bar = progress.add_task("work", total=max(1, first.depth + len(first.in_flight) + first.delayed))
    shown = 0
    try:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while True:
                snap = snapshot(env.client, env.keys, q, env.s.limits)
                done = max(0, snap.completed["last_hour"] + snap.failed["last_hour"] - base_done)
                left = snap.depth + len(snap.in_flight) + snap.delayed
                progress.update(bar, completed=done, total=max(1, done + left))
                live.update(Group(render(snap), progress))
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
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    p = Progress(TextColumn(f"[bold]{st.batch_id}[/]"), BarColumn(), TaskProgressColumn(),
                 TextColumn("{task.description}"))
    eta = "-" if st.eta_s is None else f"{st.eta_s:.0f} s"
    desc = (f"{st.finished}/{st.published}{'' if st.complete else '+'} · done {st.done} · failed {st.failed} · "
            f"dead-lettered {st.dead_lettered} · {st.rate_per_s:.1f}/s · ETA {eta}")
    p.add_task(desc, total=max(1, st.published), completed=st.finished)
    return p


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
