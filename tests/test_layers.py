"""The layers: the bottom layer imports only the standard library, redis and itself; `tasks` is lazy."""
from __future__ import annotations

import json
import subprocess
import sys

from tests import procs

BOTTOM = [
    "tasks.settings", "tasks.keys", "tasks.errors", "tasks.lease", "tasks.scripts", "tasks.inflight",
    "tasks.ledger", "tasks.recovery", "tasks.fetching", "tasks.validation", "tasks.retry_policy", "tasks.redis_client",
]


def run_python(code: str, env: dict) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object on its last line."""
    done = subprocess.run([sys.executable, "-c", code], cwd=str(procs.ROOT), env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_bottom_layer_imports_only_the_standard_library_redis_and_itself(base_env):
    # Given a fresh interpreter, in which redis alone is imported first (its own dependencies are allowed)
    code = f"""
import importlib, json, sys
import redis, redis.backoff, redis.retry
before = set(sys.modules)
for name in {BOTTOM!r}:
    importlib.import_module(name)
after = set(sys.modules)
print(json.dumps({{"new": sorted(after - before), "all": sorted(after),
                   "stdlib": sorted(sys.stdlib_module_names)}}))
"""
    # When every bottom-layer module is imported
    got = run_python(code, base_env)
    loaded, stdlib = set(got["all"]), set(got["stdlib"])
    # Then each of them was really imported ...
    assert set(BOTTOM) <= loaded
    # ... and nothing from the app, Celery, kombu, the worker or beat came with them
    forbidden = sorted(m for m in loaded if m.split(".")[0] in ("celery", "kombu", "billiard", "worker", "beat")
                       or m in ("tasks.celery", "tasks.callout_task", "tasks.producer", "tasks.celery_request"))
    assert forbidden == []
    # ... and everything new is the standard library or onelane's own bottom layer
    outside = sorted(m for m in got["new"] if m.split(".")[0] not in stdlib and m.split(".")[0] != "tasks")
    assert outside == []
    # (tasks.limits is the one other tasks module they may pull in: settings checks limits with it)
    ours = sorted(m for m in got["new"] if m.startswith("tasks.") and m not in BOTTOM)
    assert set(ours) <= {"tasks.limits"}, ours


def test_importing_tasks_alone_does_not_build_the_app_but_tasks_app_is_the_celery_app(base_env):
    code = """
import json, sys
import tasks
lazy = {"celery": "celery" in sys.modules, "tasks.celery": "tasks.celery" in sys.modules,
        "tasks.callout_task": "tasks.callout_task" in sys.modules}
import tasks.lease
lazy["after_lease"] = "tasks.celery" in sys.modules
app = tasks.app
import celery
print(json.dumps({"lazy": lazy, "is_celery": isinstance(app, celery.Celery), "main": app.main,
                  "same": app is sys.modules["tasks.celery"].app,
                  "include": list(app.conf.include),
                  "task_module_loaded": "tasks.callout_task" in sys.modules}))
"""
    got = run_python(code, base_env)
    assert got["lazy"] == {"celery": False, "tasks.celery": False, "tasks.callout_task": False,
                           "after_lease": False}
    assert got["is_celery"] is True and got["same"] is True and got["main"] == "onelane"
    # the task module is named for the worker to import, not imported by a producer's ``tasks.app``
    assert got["include"] == ["tasks.callout_task"]
    assert got["task_module_loaded"] is False


def test_unknown_attribute_of_tasks_is_an_attribute_error(base_env):
    code = """
import json, tasks
try:
    tasks.no_such_thing
    print(json.dumps({"raised": None}))
except AttributeError as exc:
    print(json.dumps({"raised": str(exc)}))
"""
    got = run_python(code, base_env)
    assert got["raised"] and "no_such_thing" in got["raised"]
