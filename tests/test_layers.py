"""The layers of the onelane package, as rules between its subpackages, and the lazy entry points.

core → coordination → delivery → callout → celery_app/task → ops: each layer imports only
the layers before it (and itself), so a primitive never pulls in the app or the CLI.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import procs

pytestmark = pytest.mark.unit

PACKAGE = procs.ROOT / "onelane"
ORDER = ["core", "coordination", "delivery", "callout", "composition", "ops", "facade"]
#: third-party packages each layer may use (the standard library is always allowed)
THIRD_PARTY = {
    "core": {"redis"},
    "coordination": {"redis"},
    "delivery": {"redis", "celery", "kombu"},
    "callout": {"redis", "celery", "requests", "urllib3"},
    "composition": {"celery", "kombu"},
    # sqlalchemy and psycopg (the outbox extra) only inside the functions that need them;
    # starlette and uvicorn: the HTTP intake only (onelane/ops/intake/, the extra onelane[intake])
    # prometheus_client: the exporter (onelane/ops/metrics.py)
    "ops": {"redis", "celery", "kombu", "click", "rich", "sqlalchemy", "psycopg", "starlette", "uvicorn",
            "prometheus_client"},
    "facade": set(),
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "facade"  # onelane/__init__.py: lazy names from every layer
    if parts[1] in ("celery_app", "task", "consumer", "task_events"):
        return "composition"
    return parts[1]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(procs.ROOT).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        out[name] = path
    return out


def imports_of(path: Path) -> set[str]:
    """Every module an onelane file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "onelane":
                found |= {f"onelane.{alias.name}" for alias in node.names}
    return found


def test_every_subpackage_is_a_known_layer():
    layers = {layer_of(m) for m in modules()}
    assert layers <= set(ORDER), layers - set(ORDER)


@pytest.mark.parametrize("module", sorted(modules()))
def test_a_module_imports_only_its_own_and_earlier_layers(module):
    path = modules()[module]
    here = layer_of(module)
    allowed_layers = set(ORDER[: ORDER.index(here) + 1])
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    problems = []
    for imported in sorted(imports_of(path)):
        top = imported.split(".")[0]
        if top == "onelane":
            if imported == "onelane" and here != "facade":
                problems.append(f"{imported} (the package facade)")
            elif imported != "onelane" and layer_of(imported) not in allowed_layers:
                problems.append(f"{imported} (layer {layer_of(imported)})")
        elif top in ("tasks", "worker", "beat", "demo", "bench", "tests"):
            problems.append(f"{imported} (an entry point or tool of the project root)")
        elif top not in stdlib and top not in THIRD_PARTY[here]:
            problems.append(f"{imported} (third party, not allowed in {here})")
    assert problems == [], f"{module} ({here}) imports {problems}"


def run_python(code: str, env: dict) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object on its last line."""
    done = subprocess.run([sys.executable, "-c", code], cwd=str(procs.ROOT), env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_bottom_layers_load_without_celery_kombu_or_the_app(base_env):
    # Given a fresh interpreter
    names = sorted(m for m in modules() if layer_of(m) in ("core", "coordination"))
    code = f"""
import importlib, json, sys
for name in {names!r}:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""
    # When every core and coordination module is imported
    loaded = set(run_python(code, base_env))
    # Then each really loaded, and nothing of Celery, kombu, requests or onelane's upper layers came along
    assert set(names) <= loaded
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("celery", "kombu", "billiard", "requests", "click")
                   or (m.startswith("onelane.") and layer_of(m) not in ("core", "coordination")))
    assert heavy == []


def test_importing_tasks_or_onelane_does_not_build_the_app_but_their_app_is_the_celery_app(base_env):
    code = """
import json, sys
import tasks, onelane
import onelane.coordination.lease
lazy = {"celery": "celery" in sys.modules, "onelane.celery_app": "onelane.celery_app" in sys.modules,
        "onelane.task": "onelane.task" in sys.modules}
app = tasks.app
import celery
print(json.dumps({"lazy": lazy, "is_celery": isinstance(app, celery.Celery), "main": app.main,
                  "same": app is onelane.app is sys.modules["onelane.celery_app"].app,
                  "submit_same": tasks.submit is onelane.submit,
                  "include": list(app.conf.include),
                  "task_module_loaded": "onelane.task" in sys.modules,
                  "tasks_file": tasks.__file__}))
"""
    got = run_python(code, base_env)
    assert got["lazy"] == {"celery": False, "onelane.celery_app": False, "onelane.task": False}
    assert got["is_celery"] is True and got["same"] is True and got["main"] == "onelane"
    assert got["submit_same"] is True
    # the task module is named for the worker to import, not imported by a producer's ``tasks.app``
    assert got["include"] == ["onelane.task"]
    assert got["task_module_loaded"] is False
    # ``tasks`` is the project root's entry point, not an installed package
    assert Path(got["tasks_file"]).resolve() == (procs.ROOT / "tasks" / "__init__.py").resolve()


def test_only_onelane_is_installed_not_the_entry_points(base_env):
    # Given the environment outside the project root (no PYTHONPATH, another working directory)
    env = {k: v for k, v in base_env.items() if k != "PYTHONPATH"}
    code = """
import importlib.util, json
print(json.dumps({name: importlib.util.find_spec(name) is not None
                  for name in ("onelane", "onelane.celery_app", "tasks", "worker", "beat", "demo", "bench")}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"onelane": True, "onelane.celery_app": True, "tasks": False, "worker": False,
                     "beat": False, "demo": False, "bench": False}


def test_unknown_attribute_of_tasks_or_onelane_is_an_attribute_error(base_env):
    code = """
import json, tasks, onelane
out = {}
for mod in (tasks, onelane):
    try:
        mod.no_such_thing
        out[mod.__name__] = None
    except AttributeError as exc:
        out[mod.__name__] = str(exc)
print(json.dumps(out))
"""
    got = run_python(code, base_env)
    assert got["tasks"] and "no_such_thing" in got["tasks"]
    assert got["onelane"] and "no_such_thing" in got["onelane"]
