"""Settings: defaults from an empty environment, and every bad value named in its ConfigError."""
from __future__ import annotations

import subprocess

import pytest

from onelane.core.errors import ConfigError, OnelaneError
from onelane.core.settings import MAX_CALLOUT_TIMEOUT_S, Settings, load_settings
from tests import procs


@pytest.mark.unit
def test_an_empty_environment_gives_the_documented_defaults():
    s = load_settings({})
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.queue == "serial"
    assert s.callout_timeout_s == 60.0
    assert s.max_attempts == 5
    assert s.standby is False
    assert s.backoff_base_s == 1.0 and s.backoff_max_s == 60.0
    assert s.key_prefix == "onelane"
    assert s.bulk_queue == "bulk"
    assert s.ordering == "strict"
    # derived values keep their relations
    assert s.visibility_timeout_s == 0
    assert s.effective_visibility_timeout_s > s.longest_unacked_s()
    assert s.renew_every_ms * 2 < s.guard_ttl_ms
    assert s == Settings()


@pytest.mark.unit
def test_good_values_are_read_and_typed():
    s = load_settings({
        "REDIS_URL": "redis://example:6390/2", "ONELANE_QUEUE": "calls.v2", "ONELANE_CALLOUT_TIMEOUT": "12.5",
        "ONELANE_MAX_ATTEMPTS": "3", "ONELANE_STANDBY": "yes", "ONELANE_BACKOFF_BASE": "0.5",
        "ONELANE_BACKOFF_MAX": "0.5",
    })
    assert (s.redis_url, s.queue, s.callout_timeout_s, s.max_attempts, s.standby) == (
        "redis://example:6390/2", "calls.v2", 12.5, 3, True)
    assert isinstance(s.max_attempts, int) and isinstance(s.callout_timeout_s, float)
    assert s.backoff_base_s == s.backoff_max_s == 0.5


@pytest.mark.unit
def test_blank_values_mean_the_default():
    s = load_settings({"ONELANE_CALLOUT_TIMEOUT": "  ", "ONELANE_MAX_ATTEMPTS": "", "REDIS_URL": ""})
    assert s.callout_timeout_s == 60.0 and s.max_attempts == 5 and s.redis_url == Settings.redis_url


@pytest.mark.unit
def test_the_longest_allowed_callout_timeout_is_accepted():
    assert load_settings({"ONELANE_CALLOUT_TIMEOUT": str(MAX_CALLOUT_TIMEOUT_S)}).callout_timeout_s == 3600.0


BAD = [
    ({"REDIS_URL": "ftp://x"}, "REDIS_URL"),
    ({"REDIS_URL": "redis://"}, "REDIS_URL"),
    ({"REDIS_URL": "redis://host:notaport/0"}, "REDIS_URL"),
    ({"ONELANE_QUEUE": "bad queue"}, "ONELANE_QUEUE"),
    ({"ONELANE_QUEUE": "-leading-dash"}, "ONELANE_QUEUE"),
    ({"ONELANE_CALLOUT_TIMEOUT": "0"}, "ONELANE_CALLOUT_TIMEOUT"),
    ({"ONELANE_CALLOUT_TIMEOUT": "-1"}, "ONELANE_CALLOUT_TIMEOUT"),
    ({"ONELANE_CALLOUT_TIMEOUT": "abc"}, "ONELANE_CALLOUT_TIMEOUT"),
    ({"ONELANE_CALLOUT_TIMEOUT": "4000"}, "ONELANE_CALLOUT_TIMEOUT"),
    ({"ONELANE_CALLOUT_TIMEOUT": "nan"}, "ONELANE_CALLOUT_TIMEOUT"),
    ({"ONELANE_CALLOUT_TIMEOUT": "inf"}, "ONELANE_CALLOUT_TIMEOUT"),
    ({"ONELANE_MAX_ATTEMPTS": "0"}, "ONELANE_MAX_ATTEMPTS"),
    ({"ONELANE_MAX_ATTEMPTS": "2.5"}, "ONELANE_MAX_ATTEMPTS"),
    ({"ONELANE_STANDBY": "maybe"}, "ONELANE_STANDBY"),
    ({"ONELANE_VISIBILITY_TIMEOUT": "60"}, "ONELANE_VISIBILITY_TIMEOUT"),
    ({"ONELANE_BACKOFF_BASE": "5", "ONELANE_BACKOFF_MAX": "2"}, "ONELANE_BACKOFF_MAX"),
    ({"ONELANE_TASK_EVENTS_BATCH_MS": "-1"}, "ONELANE_TASK_EVENTS_BATCH_MS"),
    ({"ONELANE_TASK_EVENTS_BATCH_MS": "10001"}, "ONELANE_TASK_EVENTS_BATCH_MS"),
    ({"ONELANE_TASK_EVENTS_BATCH_MS": "2.5"}, "ONELANE_TASK_EVENTS_BATCH_MS"),
]


@pytest.mark.unit
@pytest.mark.parametrize("env, variable", BAD, ids=[f"{v}={e.get(v)!r}" for e, v in BAD])
def test_a_bad_value_raises_config_error_naming_the_variable(env, variable):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert variable in str(info.value)
    # it is a ValueError and an OnelaneError, so callers can catch either
    assert isinstance(info.value, ValueError) and isinstance(info.value, OnelaneError)


@pytest.mark.unit
def test_backoff_relation_names_both_values():
    with pytest.raises(ConfigError) as info:
        load_settings({"ONELANE_BACKOFF_BASE": "5", "ONELANE_BACKOFF_MAX": "2"})
    assert "ONELANE_BACKOFF_MAX=2" in str(info.value) and "ONELANE_BACKOFF_BASE=5" in str(info.value)


@pytest.mark.unit
def test_a_low_visibility_timeout_message_names_the_limit():
    s = Settings()
    with pytest.raises(ConfigError) as info:
        load_settings({"ONELANE_VISIBILITY_TIMEOUT": str(s.longest_unacked_s())})
    assert str(s.longest_unacked_s()) in str(info.value)
    # one second above the limit is accepted
    ok = load_settings({"ONELANE_VISIBILITY_TIMEOUT": str(s.longest_unacked_s() + 1)})
    assert ok.effective_visibility_timeout_s == s.longest_unacked_s() + 1


@pytest.mark.e2e
def test_a_worker_with_a_bad_setting_exits_non_zero_naming_the_variable(base_env):
    # Given the public worker command and a malformed setting
    env = {**base_env, "ONELANE_CALLOUT_TIMEOUT": "abc"}
    # When it starts (bounded: subprocess.run kills it after 60 s)
    done = subprocess.run([procs.CELERY, "-A", "tasks", "worker", "-Q", "serial"], cwd=str(procs.ROOT), env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    # Then it refuses to start, and says which variable is wrong
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "ONELANE_CALLOUT_TIMEOUT" in out, out[-3000:]
    assert "ready." not in out
    # ... in one line, without Celery's "Unable to load" and a traceback
    assert "Traceback" not in out and "Unable to load" not in out, out[-3000:]


@pytest.mark.unit
def test_a_reconnect_behind_sentinel_keeps_onelanes_transport():
    """kombu's failover would take the next sentinel:// address's scheme as the transport (its plain
    one, without the loss-proof fetch); onelane's broker keeps its own on every reconnect."""
    from onelane.celery_app import make_app
    from onelane.delivery.transport import SentinelTransport

    url = "sentinel://:pw@10.0.0.1:26379;sentinel://:pw@10.0.0.2:26380;sentinel://:pw@10.0.0.3:26381"
    app = make_app(load_settings({"REDIS_URL": url, "ONELANE_SENTINEL_MASTER": "mymaster"}))
    conn = app.connection_for_read()
    try:
        assert conn.transport.__class__ is SentinelTransport
        for _ in range(4):  # what Celery does each time a connection attempt fails
            conn.maybe_switch_next()
            assert conn.transport.__class__ is SentinelTransport
        # the Sentinel pool still asks every sentinel of the URL where the master is
        assert [a.split("@")[1] for a in conn.alt] == ["10.0.0.1:26379", "10.0.0.2:26380", "10.0.0.3:26381"]
    finally:
        conn.release()
