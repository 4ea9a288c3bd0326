"""Take the README's screenshot of Flower's task list from a real run.

Starts a private redis-server (never the shared one), the fragile API, a real worker and
a real Flower with a login (FLOWER_BASIC_AUTH, as ``make flower``), runs ten callouts
(one of them bad), waits until Flower lists every one finished, then has headless
Chromium save the task page, logged in through the URL. Every process it starts is
stopped by pid. Needs Debian's chromium (apt-get install -y chromium).

Usage: .venv/bin/python docs/screenshot.py [OUT.png]      (default docs/flower-tasks.png)
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.fragile_api import FragileAPI  # noqa: E402
from demo.processes import stop_group  # noqa: E402
from demo.redis_server import RedisServer, free_port  # noqa: E402
from tests.procs import CeleryProcess, wait_for  # noqa: E402

USER, PASSWORD = "user", "password"  # a throwaway login for this one local, short-lived Flower
GOOD, WAIT_S = 9, 60


def chromium_cmd(url: str, out: Path, profile: str) -> list[str]:
    return ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=5000",
            f"--screenshot={out}", url]


def main(out: Path) -> int:
    if shutil.which("chromium") is None:
        print("chromium is not on the PATH (Debian/Ubuntu: apt-get install -y chromium)", file=sys.stderr)
        return 2
    with RedisServer() as redis_server, FragileAPI(delay_s=0.3) as api:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ONELANE_", "FLOWER_"))}
        env.update(REDIS_URL=redis_server.url, ONELANE_ALLOW_PRIVATE_NETWORKS="1", PYTHONPATH=str(ROOT),
                   PYTHONUNBUFFERED="1", FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
        worker = CeleryProcess(["worker", "-Q", "serial", "-n", "w1@%h", "-l", "info"], env, "worker")
        flower = CeleryProcess(["flower", f"--port={port}", "--address=127.0.0.1"], env, "flower")
        flower.ready_marker = "Visit me at"
        base, auth = f"http://127.0.0.1:{port}", (USER, PASSWORD)
        profile = tempfile.mkdtemp(prefix="onelane-chromium-")
        browser: subprocess.Popen | None = None
        try:
            worker.start()
            flower.start()
            # events are pub/sub: publish only once Flower receives the worker's events
            name = f"w1@{socket.gethostname()}"
            wait_for(lambda: requests.get(f"{base}/api/workers", params={"status": "true"}, auth=auth,
                                          timeout=5).json().get(name) is True,
                     WAIT_S, 0.3, what=f"Flower to see {name}")
            from celery import Celery

            app = Celery(broker=redis_server.url, backend=redis_server.url)
            calls = [{"url": f"{api.url}/orders/{i}", "json": {"order": i}, "idempotency_key": f"order-{i}"}
                     for i in range(GOOD)]
            calls.insert(GOOD // 2, {"url": "ftp://bad"})  # refused by the worker: FAILURE, the queue moves on
            results = [app.send_task("tasks.callout", queue="serial", kwargs=kw) for kw in calls]
            for r in results:
                r.get(timeout=WAIT_S, propagate=False)

            def all_listed():
                tasks = requests.get(f"{base}/api/tasks", auth=auth, timeout=5).json()
                return all(tasks.get(r.id, {}).get("state") in ("SUCCESS", "FAILURE") for r in results)

            wait_for(all_listed, WAIT_S, 0.3, what="every callout finished in Flower")
            cmd = chromium_cmd(f"http://{USER}:{PASSWORD}@127.0.0.1:{port}/tasks", out, profile)
            browser = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            code = browser.wait(timeout=120)
            if code != 0 or not out.exists():
                print(f"chromium exited with {code}", file=sys.stderr)
                return 1
            print(f"wrote {out}\n{shlex.join(cmd)}")
            return 0
        finally:
            if browser is not None:
                stop_group(browser, grace_s=0, ask=False)  # its helper processes share its session
            flower.stop()
            worker.stop()
            shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "flower-tasks.png"
    sys.exit(main(target.resolve()))
