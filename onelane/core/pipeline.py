"""The redis-py client onelane's own code runs on: its pipelines pack their commands in one pass.

A callout's Redis work is two pipelines — the preflight (13 commands) and the outcome's
transaction (about 20). redis-py packs each command of a pipeline through its general
serializer: an encoder call per argument, checks of the command name, a list per command.
Under a profiler that packing was the largest single cost of those round trips in the worker
(more than reading the replies), and it is on every callout's critical path.

:class:`OnelaneRedis` is ``redis.Redis`` with one difference: its pipelines pack the whole
batch of commands with :func:`pack_commands`, one loop and one ``bytes`` for the batch.
Everything else is redis-py's own code: the connection, the retries, MULTI/EXEC, the reading
of replies and their callbacks, the errors a pipeline raises. The bytes it sends are the ones
redis-py's serializer would send (``tests/test_pipeline.py`` checks them against it).
"""
from __future__ import annotations

import redis
from redis.client import Pipeline


def pack_commands(commands, encode, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """The commands (tuples of arguments) in the Redis protocol, as one ``bytes``.

    Arguments are converted as redis-py's ``Encoder.encode`` converts them (``encode`` is that
    function, called for anything but ``str`` and ``bytes``: numbers become their ``repr``, a
    ``bool`` or an unknown type raises ``redis.DataError``); a command name holding spaces
    ("SCRIPT LOAD") is split into its words, as redis-py does.
    """
    out: list[bytes] = []
    add = out.append
    for args in commands:
        name = args[0]
        if (" " in name) if isinstance(name, str) else (b" " in name):
            args = (*name.split(), *args[1:])
        add(b"*%d\r\n" % len(args))
        for arg in args:
            kind = type(arg)
            if kind is str:
                arg = arg.encode(encoding, errors)
            elif kind is not bytes:
                arg = encode(arg)
            add(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


class _PackedInOnePass:
    """While it is entered, ``connection.pack_commands`` is :func:`pack_commands` (an attribute
    of that connection object only, removed on exit)."""

    __slots__ = ("connection",)

    def __init__(self, connection):
        self.connection = connection

    def __enter__(self) -> None:
        c = self.connection
        encoder = c.encoder
        encode, encoding, errors = encoder.encode, encoder.encoding, encoder.encoding_errors
        c.pack_commands = lambda commands: [pack_commands(commands, encode, encoding, errors)]

    def __exit__(self, *exc) -> None:
        self.connection.__dict__.pop("pack_commands", None)


class OnePassPipeline(Pipeline):
    """redis-py's pipeline, whose batch (with MULTI/EXEC around it in a transaction) is packed by
    :func:`pack_commands`. Replies, callbacks, errors and retries are redis-py's."""

    def _execute_pipeline(self, connection, commands, raise_on_error):
        with _PackedInOnePass(connection):
            return super()._execute_pipeline(connection, commands, raise_on_error)

    def _execute_transaction(self, connection, commands, raise_on_error):
        with _PackedInOnePass(connection):
            return super()._execute_transaction(connection, commands, raise_on_error)


class OnelaneRedis(redis.Redis):
    """``redis.Redis`` whose pipelines are :class:`OnePassPipeline`."""

    def pipeline(self, transaction: bool = True, shard_hint=None) -> OnePassPipeline:
        return OnePassPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
