"""docker-compose.yml, the Makefile and the README stay in step with the code's contract."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from onelane.core.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_the_public_commands():
    services = compose()["services"]
    assert services["worker"]["command"][:6] == ["celery", "-A", "tasks", "worker", "-Q", Settings.queue]
    assert services["beat"]["command"][:4] == ["celery", "-A", "tasks", "beat"]
    assert services["flower"]["command"][:4] == ["celery", "-A", "tasks", "flower"]
    assert "127.0.0.1:5555:5555" in services["flower"]["ports"]  # loopback only: /metrics has no login
    # every worker service consumes exactly one lane
    workers = {name: svc for name, svc in services.items() if svc.get("command", [])[3:4] == ["worker"]}
    assert len(workers) >= 2
    for name, svc in workers.items():
        cmd = svc["command"]
        lanes = cmd[cmd.index("-Q") + 1]
        assert "," not in lanes, (name, lanes)
    # no worker flag that would break the one-at-a-time configuration
    assert not {"-c", "--concurrency", "--prefetch-multiplier"} & set(services["worker"]["command"])


def test_compose_redis_has_aof_everysec_a_volume_and_a_password():
    redis = compose()["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--appendfsync") + 1] == "everysec"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--requirepass" in cmd
    assert any(v.endswith(":/data") for v in redis["volumes"])
    env = compose()["services"]["worker"]["environment"]
    assert env["REDIS_URL"].startswith("redis://:") and "@redis:6379" in env["REDIS_URL"]


def test_compose_exporter_runs_onelane_exporter_on_loopback():
    svc = compose()["services"]["exporter"]
    assert svc["command"][:2] == ["onelane", "exporter"]
    assert "127.0.0.1:9808:9808" in svc["ports"]  # /metrics has no login
    assert "onelane exporter" in (ROOT / "Makefile").read_text()


def test_flower_requires_a_login_everywhere():
    assert "FLOWER_BASIC_AUTH" in compose()["services"]["flower"]["environment"]
    assert "FLOWER_BASIC_AUTH" in (ROOT / "Makefile").read_text()


def test_make_help_lists_every_target_a_user_runs():
    import subprocess

    out = subprocess.run(["make", "-s", "help"], cwd=str(ROOT), capture_output=True, text=True, timeout=30).stdout
    for target in ("demo", "test", "test-fast", "worker", "beat", "flower", "exporter", "up", "bench", "install",
                   "clean"):
        assert f"make {target}" in out, (target, out)


def test_readme_first_screen_has_the_two_commands_and_every_setting_is_documented():
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen
    import re

    settings_src = (ROOT / "onelane" / "core" / "settings.py").read_text()
    internal = {"ONELANE_WORKER_ID", "ONELANE_WORKER_QUEUE"}
    names = set(re.findall(r'"((?:ONELANE|REDIS)_[A-Z_]+)"', settings_src)) - internal
    missing = sorted(n for n in names if f"`{n}`" not in readme)
    assert not missing, f"settings missing from the README: {missing}"
