"""Load the Lua scripts that sit beside the primitives, once per Redis client."""
from __future__ import annotations

import weakref
from importlib import resources

_SOURCES: dict[str, str] = {}
_REGISTERED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _source(name: str) -> str:
    if name not in _SOURCES:
        _SOURCES[name] = resources.files("tasks").joinpath("lua", f"{name}.lua").read_text()
    return _SOURCES[name]


def script(client, name: str):
    """The registered script ``tasks/lua/<name>.lua`` for ``client`` (EVALSHA, loaded on demand)."""
    per_client = _REGISTERED.setdefault(client, {})
    if name not in per_client:
        per_client[name] = client.register_script(_source(name))
    return per_client[name]


_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def queue_on(pipe, client, name: str, keys, args) -> None:
    """Queue script ``name`` on ``pipe`` as a bare EVALSHA.

    redis-py checks every script of a pipeline with SCRIPT EXISTS on each execute (one
    more round trip); here the script is loaded once per client instead. If Redis lost
    its script cache (a restart), the pipeline raises NoScriptError: call :func:`forget`
    and run the script directly, which loads it again.
    """
    s = script(client, name)
    loaded = _LOADED.setdefault(client, set())
    if name not in loaded:
        s.sha = client.script_load(s.script)
        loaded.add(name)
    pipe.evalsha(s.sha, len(keys), *keys, *args)


def forget(client) -> None:
    """Forget which scripts are loaded on ``client`` (after a NoScriptError)."""
    _LOADED.pop(client, None)
