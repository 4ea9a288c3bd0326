"""A real Prometheus server scrapes ``onelane exporter`` every second while real workers run
callouts: what Prometheus holds must be what the API saw, and the shipped alert rules must fire.

One run serves every assertion (a Prometheus, an exporter, two lane workers and a standby): the
machine is small and the suite's time is shared.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from demo.fragile_api import FragileAPI, Reply
from demo.processes import stop_group
from demo.redis_server import free_port
from tests import procs
from tests.procs import wait_for

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus not installed (Debian: apt-get install -y prometheus)")]

ONELANE = str(procs.VENV_BIN / "onelane")
ALERTS = procs.ROOT / "docs" / "alerts.yml"


def http_get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read()


class Prometheus:
    """A private Prometheus server on a free port scraping one target every second, with the
    shipped alert rules (their ``for:`` shortened to 0 s: the expressions are what is tested)."""

    def __init__(self, target: str):
        self.dir = Path(tempfile.mkdtemp(prefix="onelane-prometheus-"))
        self.port = free_port()
        rules = yaml.safe_load(ALERTS.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["for"] = "0s"
        (self.dir / "rules.yml").write_text(yaml.safe_dump(rules))
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(self.dir / "rules.yml")],
            "scrape_configs": [{"job_name": "onelane", "static_configs": [{"targets": [target]}]}],
        }))
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Prometheus":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                return http_get(f"http://127.0.0.1:{self.port}/-/ready", 1) is not None
            except OSError:
                return False
        wait_for(ready, 30, 0.2, "prometheus to be ready")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace_s=10)  # by pid (its own session), never by name
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def query(self, promql: str) -> dict:
        """{frozenset(labels): value} of an instant query (a range query: its values)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        data = json.loads(http_get(url))
        assert data["status"] == "success", data
        return {frozenset(r["metric"].items()): float(r["value"][1]) if "value" in r else [v for _t, v in r["values"]]
                for r in data["data"]["result"]}

    def one(self, promql: str) -> float | None:
        values = list(self.query(promql).values())
        return values[0] if len(values) == 1 else None

    def alerts(self) -> list[dict]:
        data = json.loads(http_get(f"http://127.0.0.1:{self.port}/api/v1/alerts"))
        return data["data"]["alerts"]


def send(app, lane, api, key, **extra):
    return app.send_task("tasks.callout", queue=lane,
                         kwargs={"url": f"{api.url}/{lane}", "json": {"key": key}, "idempotency_key": key, **extra})


def ok_calls(api: FragileAPI) -> int:
    return sum(1 for c in api.snapshot() if c.status is not None and 200 <= c.status < 300)


def test_prometheus_holds_what_the_api_saw_and_the_dead_letter_alert_fires(base_env, redis_client, start,
                                                                          celery_app):
    env = {**base_env, "ONELANE_GUARD_TTL": "3", "ONELANE_ORDERING": "relaxed", "ONELANE_CIRCUIT_THRESHOLD": "1",
           "ONELANE_CIRCUIT_COOLDOWN": "300"}
    export_port = free_port()
    exporter = subprocess.Popen([ONELANE, "exporter", "--port", str(export_port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    prom = Prometheus(f"127.0.0.1:{export_port}")
    with FragileAPI() as api1, FragileAPI() as api2:
        try:
            # Given two lane workers, a standby on the second lane, beat, the exporter and Prometheus
            w1 = start(procs.worker(env, "m1", queue="m1"), wait_ready=False)
            w2 = start(procs.worker(env, "m2", queue="m2"), wait_ready=False)
            beat_port = free_port()  # beat serves the same metrics with ONELANE_METRICS_PORT
            start(procs.beat({**env, "ONELANE_METRICS_PORT": str(beat_port)}), wait_ready=False)
            prom.start()
            w1.wait_log("ready.", 30)
            w2.wait_log("ready.", 30)
            standby = start(procs.worker({**env, "ONELANE_STANDBY": "1"}, "m2b", queue="m2"), wait_ready=False)
            standby.wait_log("standby", 30)
            # Prometheus has scraped both lanes (and no dead letter) before anything runs
            wait_for(lambda: prom.query('onelane_dead_letters{lane=~"m1|m2"} == 0').__len__() == 2, 30, 0.5,
                     "Prometheus to hold both lanes")

            # When m1 runs 4 good callouts, one the API refuses (400: dead-lettered at once) and one to
            # resource "flaky" that gets a 503 (its circuit opens; relaxed order: the retry waits in the
            # delay set), and m2 runs 3 good ones
            api1.script("bad", [Reply(400, {"error": "no such order"})])
            api1.script("flaky", [Reply(503, {"error": "down"})])
            results = [send(celery_app, "m1", api1, f"a{i}") for i in range(2)]
            results.append(send(celery_app, "m1", api1, "bad"))
            results.append(send(celery_app, "m1", api1, "flaky", resource="flaky"))
            results += [send(celery_app, "m1", api1, f"a{i}") for i in range(2, 4)]
            results += [send(celery_app, "m2", api2, f"b{i}") for i in range(3)]
            for r in results[:3] + results[4:]:
                r.get(timeout=30, propagate=False)
            wait_for(lambda: len(api1.calls_for("flaky")) == 1, 30, what="the flaky call")

            # ... and m2's worker stops (warm shutdown): the standby takes over and runs 3 more
            w2.stop()
            standby.wait_log("standby took over", 30)
            for r in [send(celery_app, "m2", api2, f"b{i}") for i in range(3, 6)]:
                assert r.get(timeout=30)["status_code"] == 200

            # Then Prometheus holds what the APIs saw: every success counted once, across a worker
            # stop and a standby's takeover
            assert (ok_calls(api1), ok_calls(api2)) == (4, 6)

            def settled():
                return (prom.one('sum(onelane_callouts_succeeded_total{lane="m1"})') == 4
                        and prom.one('sum(onelane_callouts_succeeded_total{lane="m2"})') == 6
                        and prom.one('onelane_dead_letters{lane="m1"}') == 1
                        and prom.one('onelane_circuit_state{resource="flaky",state="open"}') == 1
                        and prom.one('onelane_guard_takeovers_total{lane="m2"}') == 1)
            wait_for(settled, 20, 0.5, "Prometheus to hold the run's values")
            assert prom.one('onelane_dead_letters{lane="m2"}') == 0
            assert prom.one('onelane_callouts_failed_total{lane="m1",resource="m1"}') == 1
            assert prom.one('onelane_callouts_retried_total{lane="m1",resource="flaky"}') == 1
            assert prom.one('onelane_delayed_retries{lane="m1"}') == 1
            assert prom.one('sum(onelane_attempts_total{lane="m1"})') == len(api1.snapshot())
            assert prom.one('onelane_attempts_total{lane="m1",resource="flaky",status_class="5xx"}') == 1
            assert prom.one('onelane_attempts_total{lane="m1",resource="m1",status_class="4xx"}') == 1
            assert prom.one('sum(onelane_callout_duration_seconds_count)') == len(api1.snapshot()) + len(api2.snapshot())
            assert prom.one('onelane_guard_held{lane="m2"}') == 1
            assert prom.one('onelane_redis_up') == 1
            holder = list(prom.query('onelane_guard_holder_info{lane="m2"}'))
            assert len(holder) == 1 and "m2b@" in dict(holder[0])["label"], holder

            # ... and the "dead letters growing" alert fires for m1, "circuit open" for flaky, and, once the
            # lanes are idle, no other alert of the file (no lane stalled, every lane with work has its guard,
            # Redis reachable). With their `for:` at 0 s here, a message seen waiting by one scrape may
            # fire "stalled" for one evaluation: the shipped 10 minutes are there for that.
            def firing():
                return {(a["labels"]["alertname"], a["labels"].get("lane") or a["labels"].get("resource"))
                        for a in prom.alerts() if a["state"] == "firing"}
            expected = {("OnelaneDeadLettersGrowing", "m1"), ("OnelaneCircuitOpen", "flaky")}
            seen = []
            wait_for(lambda: seen.append(firing()) or seen[-1] == expected, 20, 0.5,
                     "exactly the dead-letter and circuit alerts to fire")

            def beat_metrics():
                try:
                    return http_get(f"http://127.0.0.1:{beat_port}/metrics").decode()
                except OSError:
                    return ""
            wait_for(lambda: 'onelane_callouts_succeeded_total{lane="m2",resource="m2"} 6.0' in beat_metrics(), 20,
                     0.5, "beat's metrics endpoint")

            scrape = http_get(f"http://127.0.0.1:{export_port}/metrics").decode()
            print("\n" + "\n".join(line for line in scrape.splitlines()
                                   if ('lane="m' in line or 'resource="flaky"' in line or "redis" in line)
                                   and "_bucket" not in line))
        finally:
            prom.stop()
            stop_group(exporter, grace_s=10)
            if exporter.stderr:
                exporter.stderr.close()
