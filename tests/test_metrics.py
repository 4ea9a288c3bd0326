"""The Prometheus exporter against the private Redis: its output parses, it answers with Redis
away, a scrape of many lanes stays a few round trips, and the workers' counters land where it
reads them. The real Prometheus server and real workers: tests/test_metrics_prometheus.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from demo.redis_server import free_port
from onelane.core import counters
from onelane.core.keys import Keys
from onelane.core.settings import load_settings
from onelane.ops import metrics
from tests import procs

KEYS = Keys()
ALERTS = procs.ROOT / "docs" / "alerts.yml"


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value} of an exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(scrape: dict, name: str, **labels) -> float | None:
    return scrape.get((name, frozenset(labels.items())))


def settings_for(url: str, **env):
    return load_settings({"REDIS_URL": url, **env})


def _message(task_id: str) -> str:
    return json.dumps({"headers": {"id": task_id, "task": "tasks.callout"}, "body": "", "properties": {}})


@pytest.mark.unit
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_alert_rules_pass_promtool():
    out = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 rules found" in out.stdout


@pytest.mark.unit
def test_histogram_buckets_are_cumulative_and_counters_parse():
    class Pipe:
        def __init__(self):
            self.h = {}

        def hincrby(self, key, f, n):
            self.h[f] = self.h.get(f, 0) + n

        def hincrbyfloat(self, key, f, n):
            self.h[f] = self.h.get(f, 0.0) + n

    p = Pipe()
    for s in (0.01, 0.3, 0.3, 7.0, 999.0):
        counters.observe(p, KEYS, "callout_duration_seconds", s, "erp", "erp")
    series = counters.parse_histograms({k: str(v) for k, v in p.h.items()})[("callout_duration_seconds", "erp", "erp")]
    bounds = counters.HISTOGRAMS["callout_duration_seconds"][1]
    assert series["buckets"][bounds.index(0.05)] == 1
    assert series["buckets"][bounds.index(0.5)] == 3
    assert series["buckets"][bounds.index(10.0)] == 4
    assert series["buckets"][-1] == 5  # +Inf: the count
    assert series["sum"] == pytest.approx(1006.61)
    assert all(isinstance(v, int) for v in p.h.values()), "every write an HINCRBY (no float parsing in Redis)"
    # a sum in seconds written by an earlier onelane is added in
    older = {**{k: str(v) for k, v in p.h.items()}, counters.field("callout_duration_seconds", "erp", "erp", "sum"): "1.5"}
    assert counters.parse_histograms(older)[("callout_duration_seconds", "erp", "erp")]["sum"] == pytest.approx(1008.11)
    assert counters.status_class(503) == "5xx" and counters.status_class(None) == "error"
    # an observation of zero (a slot granted at once) counts in its bucket and writes no sum: one command
    waits = Pipe()
    counters.observe(waits, KEYS, "slot_wait_seconds", 0.0, "bulk", "acme")
    assert list(waits.h) == [counters.field("slot_wait_seconds", "bulk", "acme", 0)]
    wait = counters.parse_histograms({k: str(v) for k, v in waits.h.items()})[("slot_wait_seconds", "bulk", "acme")]
    assert wait["buckets"][-1] == 1 and wait["sum"] == 0.0
    with pytest.raises(ValueError):
        counters.count(p, KEYS, "succeeded", "erp")  # a label missing


@pytest.mark.redis
def test_exporter_output_parses_and_shows_each_lane_and_resource(redis_client, redis_server):
    # Given a lane with a queued callout, a dead letter, a paused flag, a held resource lease and an open circuit
    s = settings_for(redis_server.url, ONELANE_LIMITS='{"bulkapi": {"concurrency": 3, "adaptive": true}}')
    redis_client.hset(KEYS.queues, "erp", json.dumps({"kind": "lane", "first_ms": 1, "seen_ms": 1}))
    redis_client.lpush("erp", _message("t-queued"))
    redis_client.zadd(KEYS.dead_letter_index("erp"), {"t-dead": 1})
    redis_client.set(KEYS.paused("erp"), "{}")
    redis_client.set(KEYS.lease(KEYS.resource_lease("erp")), "tok", px=60_000)
    redis_client.zadd(KEYS.lease_index, {KEYS.resource_lease("erp"): time.time() * 1000 + 60_000})
    redis_client.set(KEYS.lease_fence(KEYS.resource_lease("erp")), 41)
    redis_client.hset(KEYS.circuit("erp"), mapping={"state": "open", "failures": 5,
                                                    "open_until": int(time.time() * 1000) + 60_000})
    redis_client.sadd(KEYS.circuit_index, "erp")
    redis_client.set(KEYS.lease(KEYS.slot("bulkapi", 2)), "tok", px=60_000)
    redis_client.hset(KEYS.outbox_lanes, "erp", json.dumps({"depth": 4, "oldest_age_ms": 2000,
                                                            "reported_ms": int(time.time() * 1000)}))
    counters.count(redis_client, KEYS, "succeeded", "erp", "erp", by=7)
    counters.count(redis_client, KEYS, "attempts", "erp", "erp", "5xx")
    counters.observe(redis_client, KEYS, "slot_wait_seconds", 0.02, "bulk", "bulkapi")

    # When the exporter is scraped twice (the second look sees the same head: its wait clock runs)
    metrics.render(s)
    time.sleep(0.05)
    text = metrics.render(s).decode()
    print("\n" + "\n".join(line for line in text.splitlines() if not line.startswith("#"))[:3000])

    # Then prometheus_client's own parser reads it, with every value where it belongs
    scrape = samples(text)
    assert value(scrape, "onelane_redis_up") == 1
    assert value(scrape, "onelane_queue_depth", lane="erp", kind="lane") == 1
    assert value(scrape, "onelane_queue_depth", lane="serial", kind="lane") == 0  # the default lane, always
    assert value(scrape, "onelane_oldest_waiting_age_seconds", lane="erp", kind="lane") > 0
    assert value(scrape, "onelane_dead_letters", lane="erp", kind="lane") == 1
    assert value(scrape, "onelane_paused", lane="erp", kind="lane") == 1
    assert value(scrape, "onelane_guard_held", lane="erp", kind="lane") == 0
    assert value(scrape, "onelane_lease_held", resource="erp") == 1
    assert value(scrape, "onelane_fencing_token", resource="erp") == 41
    assert value(scrape, "onelane_circuit_state", resource="erp", state="open") == 1
    assert value(scrape, "onelane_circuit_state", resource="erp", state="closed") == 0
    assert value(scrape, "onelane_outbox_depth", lane="erp") == 4
    assert value(scrape, "onelane_outbox_oldest_age_seconds", lane="erp") >= 2
    assert value(scrape, "onelane_slots_held", resource="bulkapi") == 1
    assert value(scrape, "onelane_slots_cap", resource="bulkapi") == 3
    assert value(scrape, "onelane_adaptive_cap", resource="bulkapi") == 3
    assert value(scrape, "onelane_callouts_succeeded_total", lane="erp", resource="erp") == 7
    assert value(scrape, "onelane_attempts_total", lane="erp", resource="erp", status_class="5xx") == 1
    assert value(scrape, "onelane_slot_wait_seconds_bucket", lane="bulk", resource="bulkapi", le="0.05") == 1
    assert value(scrape, "onelane_slot_wait_seconds_count", lane="bulk", resource="bulkapi") == 1
    assert value(scrape, "onelane_scrape_redis_round_trips") <= 3


@pytest.mark.redis
def test_exporter_answers_with_redis_down():
    # Given a Redis URL nothing listens on
    s = settings_for(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    scrape = samples(metrics.render(s).decode())
    # Then the scrape still answers, fast, saying so
    assert value(scrape, "onelane_redis_up") == 0
    assert time.monotonic() - started < 5


@pytest.mark.redis
def test_scrape_of_50_lanes_by_10_resources_is_three_round_trips(redis_client, redis_server):
    # Given 50 lanes, each with 10 resources that have a lease, a fencing counter, a circuit and counts
    s = settings_for(redis_server.url)
    pipe = redis_client.pipeline(transaction=False)
    now_ms = int(time.time() * 1000)
    for i in range(50):
        lane = f"lane{i:02d}"
        pipe.hset(KEYS.queues, lane, json.dumps({"kind": "lane", "first_ms": 1, "seen_ms": 1}))
        pipe.lpush(lane, _message(f"{lane}-head"))
        for j in range(10):
            res = f"{lane}-r{j}"
            name = KEYS.resource_lease(res)
            pipe.set(KEYS.lease(name), "tok", px=60_000)
            pipe.zadd(KEYS.lease_index, {name: now_ms + 60_000})
            pipe.set(KEYS.lease_fence(name), j + 1)
            pipe.hset(KEYS.circuit(res), mapping={"state": "closed", "failures": 0})
            pipe.sadd(KEYS.circuit_index, res)
            counters.count(pipe, KEYS, "succeeded", lane, res, by=3)
            counters.count(pipe, KEYS, "attempts", lane, res, "2xx", by=3)
            counters.observe(pipe, KEYS, "callout_duration_seconds", 0.2, lane, res)
    pipe.execute()
    client = metrics.exporter_client(s)

    # When it is read a few times
    reads = []
    for _ in range(5):
        t0 = time.perf_counter()
        reading = metrics.read(client, KEYS, s)
        reads.append((reading.redis_s, time.perf_counter() - t0, reading.round_trips))
    t0 = time.perf_counter()
    text = metrics.render(s, client)
    render_s = time.perf_counter() - t0

    # Then every lane and resource is there, read in at most three round trips; the time is reported
    assert len(reading.queues) == 51 and len(reading.resources) == 500
    assert all(trips <= 3 for _r, _w, trips in reads)
    scrape = samples(text.decode())
    assert value(scrape, "onelane_fencing_token", resource="lane49-r9") == 10
    best = min(reads)
    print(f"\nscrape of 50 lanes x 10 resources ({len(text)} bytes): Redis {best[0] * 1000:.1f} ms in "
          f"{best[2]} round trips (median of 5: {sorted(r[0] for r in reads)[2] * 1000:.1f} ms); whole read "
          f"{best[1] * 1000:.1f} ms; read + text exposition {render_s * 1000:.1f} ms")


@pytest.mark.redis
def test_serve_answers_http(redis_client, redis_server):
    import urllib.request

    s = settings_for(redis_server.url)
    server, thread = metrics.serve(s, port=0)
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert value(samples(body), "onelane_redis_up") == 1
    finally:
        server.shutdown()
        thread.join(timeout=10)


class RoundTrips:
    """Counts what reaches Redis: pipeline executions and single commands (a pipeline's own
    commands are not single commands; nor is the one-time SCRIPT LOAD of a script)."""

    def __init__(self, monkeypatch):
        self.pipelines = 0
        self.commands = 0
        self.names = []
        real_execute, real_command = redis.client.Pipeline.execute, redis.Redis.execute_command

        def execute(pipe, *a, **kw):
            self.pipelines += 1
            return real_execute(pipe, *a, **kw)

        def command(client, *a, **kw):
            # a script is loaded once per process, not per callout
            if not isinstance(client, redis.client.Pipeline) and a[0] != "SCRIPT LOAD":
                self.commands += 1
                self.names.append(a[0])
            return real_command(client, *a, **kw)
        monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
        monkeypatch.setattr(redis.Redis, "execute_command", command)

    @property
    def total(self) -> int:
        return self.pipelines + self.commands


@pytest.mark.redis
def test_the_callout_steps_count_on_the_round_trips_they_already_make(redis_client, redis_server, monkeypatch):
    from onelane.callout.classify import FAILED, RETRY, Reply, Verdict

    from tests.test_run_steps import begin_on, ok_response

    s = settings_for(redis_server.url, ONELANE_ALLOW_PRIVATE_NETWORKS="1")

    def begin(task_id):
        return begin_on(s, task_id, "erp", resource="acme")

    ok = ok_response()
    # Given a run that succeeds: its outcome, release and counters go in one transaction
    run = begin("t-ok")
    with run.permit(run.preflight()) as attempt:
        trips = RoundTrips(monkeypatch)
        run.record_success(attempt, Reply(response=ok, started=1.0, elapsed_ms=120.0), Verdict("succeeded",
                                                                                              api_up=True))
        assert trips.total == 1, (trips.pipelines, trips.names)
    monkeypatch.undo()
    # ... a run whose attempt fails and will be retried: the attempt and its counters, one transaction
    run = begin("t-bad")
    with run.permit(run.preflight()) as attempt:
        pass
    trips = RoundTrips(monkeypatch)
    run.record_attempt(attempt, Reply(error="connection error: refused", started=1.0, elapsed_ms=3.0),
                       Verdict(RETRY, "connection error: refused", wait_s=1.0))
    assert trips.total == 1, (trips.pipelines, trips.names)
    monkeypatch.undo()
    run.record_attempt(attempt, Reply(error="connection error: refused", started=1.0, elapsed_ms=3.0),
                       Verdict(FAILED, "connection error: refused"))
    run.dead_letter("failed after 2 attempts")

    # Then the counters say so, once each
    got = counters.parse_counters({k.decode(): v for k, v in redis_client.hgetall(KEYS.metric_counters).items()})
    assert got == {("succeeded", "erp", "acme"): 1, ("attempts", "erp", "acme", "2xx"): 1,
                   ("attempts", "erp", "acme", "error"): 2, ("retried", "erp", "acme"): 1,
                   ("failed", "erp", "acme"): 1, ("dead_lettered", "erp", "acme"): 1}
    hist = counters.parse_histograms({k.decode(): v for k, v in
                                      redis_client.hgetall(KEYS.metric_histograms).items()})
    series = hist[("callout_duration_seconds", "erp", "acme")]
    assert series["buckets"][-1] == 3 and series["sum"] == pytest.approx(0.126)


@pytest.mark.redis
def test_the_reaper_counts_the_orphans_it_requeues(redis_client, celery_app):
    from onelane.core.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX
    from onelane.delivery.reaper import reap

    # Given a bulk message kombu holds unacked for a receiver that is gone
    celery_app.send_task("tasks.callout", kwargs={"url": "http://api.example/x"}, queue="bulk")
    message = json.loads(redis_client.rpop("bulk"))
    tag = message["properties"]["delivery_tag"]
    redis_client.zadd(KOMBU_UNACKED_INDEX, {tag: time.time()})
    redis_client.hset(KOMBU_UNACKED, tag, json.dumps([message, "", "bulk"]))
    redis_client.hset(KEYS.reserved("bulk"), tag, "dead-token")
    # When the reaper runs twice
    first = reap(redis_client, KEYS, lanes=["serial"], bulk_queues=["bulk"], margin_ms=2000)
    reap(redis_client, KEYS, lanes=["serial"], bulk_queues=["bulk"], margin_ms=2000)
    # Then the orphan is counted once
    assert len(first.requeued) == 1
    assert redis_client.hget(KEYS.metric_counters, counters.field("orphans_requeued", "bulk")) == b"1"


@pytest.mark.redis
def test_a_scrape_survives_a_redis_out_of_memory_and_fields_nobody_should_have_written(redis_client, redis_server):
    # Given a lane with a callout waiting at its head, a count, and hand-made fields in the metric hashes
    s = settings_for(redis_server.url)
    redis_client.hset(KEYS.queues, "erp", json.dumps({"kind": "lane", "first_ms": 1, "seen_ms": 1}))
    redis_client.lpush("erp", _message("t-waiting"))
    counters.count(redis_client, KEYS, "succeeded", "erp", "erp", by=3)
    redis_client.hset(KEYS.metric_counters, mapping={"{}": 1, '["succeeded",1,"erp"]': 2, "null": 3, "[]": 4})
    redis_client.hset(KEYS.metric_histograms, mapping={'["callout_duration_seconds",null,"x","0"]': 1, "{}": 1})
    # When Redis refuses every write (maxmemory reached, noeviction): the scrape's one write, the
    # head's waiting clock, is refused
    redis_client.config_set("maxmemory", "1")
    try:
        scrape = samples(metrics.render(s).decode())
    finally:
        redis_client.config_set("maxmemory", "0")
    # Then the scrape still shows everything it read, and skips what no worker wrote
    assert value(scrape, "onelane_redis_up") == 1
    assert value(scrape, "onelane_queue_depth", lane="erp", kind="lane") == 1
    assert value(scrape, "onelane_callouts_succeeded_total", lane="erp", resource="erp") == 3
