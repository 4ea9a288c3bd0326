"""Lua scripts: each one a file in the ``lua/`` folder beside the module that runs it.

A :class:`LuaScript` is declared once per module (``_ACQUIRE = LuaScript(__package__,
"lease_acquire")``) and registered once per Redis client. Pipelines run it as a bare
EVALSHA (:meth:`LuaScript.queue_on`): redis-py would otherwise check every script of a
pipeline with SCRIPT EXISTS on each execute, one more round trip per call.
"""
from __future__ import annotations

import weakref
from importlib import resources

#: client -> names of the scripts known to be loaded in its server's script cache
_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class LuaScript:
    """The script ``<package>/lua/<name>.lua``, callable on any redis-py client."""

    def __init__(self, package: str, name: str):
        self.package = package
        self.name = name
        self._source: str | None = None
        self._registered: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    @property
    def source(self) -> str:
        if self._source is None:
            self._source = resources.files(self.package).joinpath("lua", f"{self.name}.lua").read_text()
        return self._source

    def registered(self, client):
        """redis-py's Script object for ``client`` (EVALSHA, loading the script when missing)."""
        s = self._registered.get(client)
        if s is None:
            s = self._registered[client] = client.register_script(self.source)
        return s

    def __call__(self, client, *, keys, args):
        """Run the script now and return its raw reply."""
        return self.registered(client)(keys=keys, args=args)

    def queue_on(self, pipe, client, *, keys, args) -> None:
        """Queue the script on ``pipe`` as a bare EVALSHA (its reply comes with the pipeline's).

        If Redis lost its script cache (a restart) the pipeline raises NoScriptError: call
        :func:`forget` and run the script directly, which loads it again.
        """
        pipe.evalsha(self.loaded_sha(client), len(keys), *keys, *args)

    def loaded_sha(self, client) -> str:
        """The script's SHA, loaded into ``client``'s server first if this process has not yet."""
        s = self.registered(client)
        loaded = _LOADED.setdefault(client, set())
        key = (self.package, self.name)
        if key not in loaded:
            s.sha = client.script_load(s.script)
            loaded.add(key)
        return s.sha


def forget(client) -> None:
    """Forget which scripts are loaded on ``client`` (after a NoScriptError)."""
    _LOADED.pop(client, None)
