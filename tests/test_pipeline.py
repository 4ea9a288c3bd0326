"""onelane's redis-py client: pipelines packed in one pass send redis-py's bytes and read its replies."""
from __future__ import annotations

import random

import pytest
import redis
from redis.connection import PythonRespSerializer
from redis._parsers.encoders import Encoder

from onelane.core.clients import get_client
from onelane.core.pipeline import OnelaneRedis, OnePassPipeline, pack_commands


def _redis_py_bytes(commands) -> bytes:
    """What redis-py's pure-Python serializer sends for the same commands."""
    enc = Encoder("utf-8", "strict", False)
    serializer = PythonRespSerializer(6000, enc.encode)
    return b"".join(b"".join(bytes(p) for p in serializer.pack(*args)) for args in commands)


def _ours(commands) -> bytes:
    return pack_commands(commands, Encoder("utf-8", "strict", False).encode)


CASES = [
    [("GET", "k")],
    [("SET", "k", "v", "NX", "PX", 61000), ("INCRBY", b"fence", 1), ("ZADD", "z", "NX", 1.5, "m")],
    [("HSET", "h", "é€😀", "x" * 7000), ("SET", "big", b"\x00\r\n" * 5000)],
    [("SCRIPT LOAD", "return 1"), ("CLIENT SETNAME", "n"), (b"SCRIPT EXISTS", b"abc")],
    [("SET", "k", bytearray(b"ba")), ("SET", "k2", memoryview(b"mv")), ("SET", "n", -12), ("SET", "f", 1e300)],
    [("ZADD", "z", 0.1, "a", float("inf"), "b", 2**70, "c")],
    [("GET", "")],
]


@pytest.mark.unit
@pytest.mark.parametrize("commands", CASES)
def test_the_bytes_are_those_redis_py_sends(commands):
    assert _ours(commands) == _redis_py_bytes(commands)


@pytest.mark.unit
def test_random_batches_pack_to_redis_py_bytes():
    rng = random.Random(20261207)
    atoms = [lambda: "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 40))),
             lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))),
             lambda: rng.randrange(-10**20, 10**20), lambda: rng.uniform(-1e9, 1e9), lambda: rng.random()]
    for _ in range(300):
        commands = [(rng.choice(["SET", "HSET", "ZADD", "EVALSHA", "SCRIPT LOAD"]),
                     *[rng.choice(atoms)() for _ in range(rng.randrange(0, 6))]) for _ in range(rng.randrange(1, 8))]
        assert _ours(commands) == _redis_py_bytes(commands), commands


@pytest.mark.unit
@pytest.mark.parametrize("bad", [True, None, object(), [1]])
def test_an_argument_redis_py_refuses_is_refused_the_same_way(bad):
    with pytest.raises(redis.DataError):
        _ours([("SET", "k", bad)])


@pytest.fixture
def both(redis_server):
    """onelane's client and a plain redis-py client of the session's server, emptied first."""
    ours, plain = OnelaneRedis.from_url(redis_server.url), redis.Redis.from_url(redis_server.url)
    plain.flushdb()
    yield ours, plain
    ours.close()
    plain.close()


def _batch(pipe, prefix: str):
    pipe.set(f"{prefix}:lease", "tok\nhost\n1", nx=True, px=60000)
    pipe.get(f"{prefix}:lease")
    pipe.incr(f"{prefix}:fence")
    pipe.zadd(f"{prefix}:index", {"m": 1.5}, nx=True)
    pipe.hset(f"{prefix}:h", mapping={"a": "1", "é": b"\x00\xff", "n": 3})
    pipe.hgetall(f"{prefix}:h")
    pipe.mget(f"{prefix}:lease", f"{prefix}:none")
    pipe.exists(f"{prefix}:lease")
    pipe.llen(f"{prefix}:list")
    pipe.zrange(f"{prefix}:index", 0, -1, withscores=True)
    return pipe


@pytest.mark.redis
@pytest.mark.parametrize("transaction", [False, True])
def test_a_pipeline_answers_as_redis_py_s_own(both, transaction):
    ours, plain = both
    pipe = ours.pipeline(transaction=transaction)
    assert isinstance(pipe, OnePassPipeline)
    mine = _batch(pipe, "ours").execute()
    theirs = _batch(plain.pipeline(transaction=transaction), "plain").execute()
    assert mine == theirs
    assert mine[0] is True and mine[2] == 1 and mine[5] == {b"a": b"1", "é".encode(): b"\x00\xff", b"n": b"3"}
    connection = ours.connection_pool.get_connection()
    assert "pack_commands" not in vars(connection)  # nothing left on the connection
    ours.connection_pool.release(connection)


@pytest.mark.redis
def test_errors_land_where_redis_py_puts_them(both):
    ours, plain = both
    for c in (ours, plain):
        c.set("str", "x")
    results = []
    for c in (ours, plain):
        replies = c.pipeline(transaction=False).get("str").hgetall("str").incr("n").execute(raise_on_error=False)
        results.append([type(r) if isinstance(r, Exception) else r for r in replies])
        with pytest.raises(redis.ResponseError, match=r"Command # 2 \(HGETALL str\) of pipeline"):
            c.pipeline(transaction=True).get("str").hgetall("str").execute()
        with pytest.raises(redis.exceptions.NoScriptError):
            c.pipeline(transaction=False).evalsha("0" * 40, 0).execute()
    assert results[0][0] == b"x" and results[0][1] is redis.ResponseError
    assert results[0][:2] == results[1][:2]


@pytest.mark.redis
def test_the_process_client_is_onelane_s(redis_server):
    c = get_client(redis_server.url)
    assert isinstance(c, OnelaneRedis)
    assert c.pipeline(transaction=False).ping().echo("é").execute() == [True, "é".encode()]
