"""Contracts 6 and 7: a connection handed out is clean, and cheap to hand out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import greenlet
import pytest
import redis
from gevent.monkey import get_original

import greenpool._redispy

PARSERS = ["hiredis", "python"]


def parser_kwargs(parser: str) -> dict:
    if parser == "hiredis":
        pytest.importorskip("hiredis")
        from redis.connection import DefaultParser

        if "Hiredis" not in DefaultParser.__name__:  # pragma: no cover
            pytest.skip("redis-py is not using hiredis")
        return {}
    try:
        from redis._parsers import _RESP2Parser as Resp2  # redis-py >= 5
        from redis._parsers import _RESP3Parser as Resp3
    except ImportError:  # redis-py 4.6
        from redis.connection import PythonParser as Resp2

        Resp3 = Resp2
    return {"parser_class": Resp2, "_resp3_parser": Resp3}


def make_kwargs(protocol: int, parser: str) -> dict:
    kwargs = parser_kwargs(parser)
    resp3 = kwargs.pop("_resp3_parser", None)
    if protocol == 3:
        if redis.VERSION < (5,):
            pytest.skip("redis-py 4.6 has no RESP3")
        kwargs["protocol"] = 3
        if resp3 is not None:
            kwargs["parser_class"] = resp3
    return kwargs


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("parser", PARSERS)
def test_connection_released_owing_a_reply_is_never_handed_out(make_pool, protocol, parser):
    """A command sent but not read, then released: the next caller still gets its own replies."""
    pool = make_pool(max_connections=1, timeout=1, **make_kwargs(protocol, parser))
    client = redis.Redis(connection_pool=pool)
    client.set("a", "value-of-a")
    client.set("b", "value-of-b")
    conn = pool.get_connection()
    conn.send_command("GET", "a")  # the reply is never read
    pool.release(conn)
    assert client.get("b") == b"value-of-b"
    assert pool.stats().closed["dirty"] == 1


def test_a_reply_nobody_counted_does_not_cancel_one_owed(make_pool):
    """A reply read that no counted write asked for (here a PING written past
    send_packed_command, as a PubSub message or a mocked write would be) owes
    nothing: the next command's unread reply still makes the connection dirty."""
    pool = make_pool(max_connections=1, timeout=1)
    client = redis.Redis(connection_pool=pool)
    client.set("a", "value-of-a")
    client.set("b", "value-of-b")
    conn = pool.get_connection()
    greenpool._redispy.raw_connection(conn)._sock.sendall(b"*1\r\n$4\r\nPING\r\n")
    assert conn.read_response() == b"PONG"
    conn.send_command("GET", "a")  # the reply is never read
    pool.release(conn)
    assert client.get("b") == b"value-of-b"
    assert pool.stats().closed["dirty"] == 1


@pytest.mark.parametrize("protocol", [2, 3])
def test_pipeline_whose_callback_fails_leaves_no_reply_behind(make_pool, protocol):
    """A response callback raising mid-pipeline leaves replies unread; the connection is closed."""
    pool = make_pool(max_connections=1, timeout=1, **make_kwargs(protocol, "hiredis"))
    client = redis.Redis(connection_pool=pool)
    client.set("a", "1")
    client.set("b", "2")

    def explode(response, **options):
        raise ValueError("callback failed")

    client.set_response_callback("ECHO", explode)
    pipe = client.pipeline(transaction=False)
    pipe.echo("x").get("a").get("b")
    with pytest.raises(ValueError, match="callback failed"):
        pipe.execute()
    assert client.get("b") == b"2"
    assert pool.stats().closed["dirty"] == 1


def test_redis_py_pool_hands_out_a_dirty_connection_under_resp3(redis_server):
    """Control: redis-py 8's own pool, RESP3, returns the previous caller's reply."""
    if redis.VERSION < (8,):
        pytest.skip("redis-py before 8 does not turn its checkout guard off under RESP3")
    pool = redis.BlockingConnectionPool(
        host=redis_server.host, port=redis_server.port, protocol=3, max_connections=1
    )
    try:
        client = redis.Redis(connection_pool=pool)
        client.set("a", "value-of-a")
        conn = pool.get_connection()
        conn.send_command("GET", "a")
        pool.release(conn)
        assert client.get("b") == b"value-of-a"  # one reply behind
    finally:
        pool.disconnect()


def test_stray_data_on_an_idle_connection_is_caught_by_the_readiness_check(make_pool, redis_server):
    """A connection idle past the validation window with unread data is replaced."""
    now = [100.0]
    pool = make_pool(max_connections=1, timeout=1, clock=lambda: now[0])
    client = redis.Redis(connection_pool=pool)
    client.set("k", "v")
    conn = pool.get_connection()
    # Write behind the pool's back: the server's reply arrives unasked.
    conn._sock.sendall(b"*1\r\n$4\r\nPING\r\n")
    pool.release(conn)
    # Let the reply land without running the hub: the idle watch (which
    # would drop it as server_closed) is not armed yet; the check at
    # checkout must catch it.
    get_original("time", "sleep")(0.05)
    now[0] += 10  # well past the validation window
    assert client.get("k") == b"v"
    assert pool.stats().closed["failed_check"] == 1


def test_server_closed_idle_connection_is_replaced_transparently(make_pool, redis_server):
    """CLIENT KILL between commands: the next caller succeeds without seeing an error."""
    now = [100.0]
    pool = make_pool(max_connections=2, timeout=1, clock=lambda: now[0])
    client = redis.Redis(connection_pool=pool)
    client.set("k", "v")
    redis.Redis(host=redis_server.host, port=redis_server.port).client_kill_filter(
        _type="normal", skipme=True
    )
    now[0] += 10
    assert client.get("k") == b"v"


def test_recent_connection_checkout_makes_no_syscall_and_no_switch(make_pool, monkeypatch):
    """Checkout+release of a recently used connection neither polls nor yields to the hub."""
    polls = []
    real_poll = greenpool._redispy._poll
    monkeypatch.setattr(greenpool._redispy, "_poll", lambda: polls.append(1) or real_poll())
    now = [100.0]
    pool = make_pool(max_connections=2, timeout=1, clock=lambda: now[0])
    conn = pool.get_connection()
    pool.release(conn)
    switches = []
    old = greenlet.settrace(lambda event, args: switches.append(event))
    try:
        for _ in range(100):
            pool.release(pool.get_connection())
    finally:
        greenlet.settrace(old)
    assert switches == [] and polls == []
    now[0] += 10  # older than the validation window: one readiness check
    pool.release(pool.get_connection())
    assert len(polls) == 1


def test_old_idle_connection_is_polled_not_pinged(make_pool, redis_server):
    """Without health_check_interval the readiness check sends nothing to the server."""
    now = [100.0]
    pool = make_pool(max_connections=1, timeout=1, clock=lambda: now[0])
    admin = redis.Redis(host=redis_server.host, port=redis_server.port)
    pool.release(pool.get_connection())
    admin.config_resetstat()
    for _ in range(3):
        now[0] += 10
        pool.release(pool.get_connection())
    assert "cmdstat_ping" not in admin.info("commandstats")


def test_readiness_check_does_not_switch_to_the_hub(make_pool):
    """Checking an old idle connection is a zero-timeout poll of the real fd, no hub round trip."""
    now = [100.0]
    pool = make_pool(max_connections=1, timeout=1, clock=lambda: now[0])
    pool.release(pool.get_connection())
    now[0] += 10
    switches = []
    old = greenlet.settrace(lambda event, args: switches.append(event))
    try:
        conn = pool.get_connection()
    finally:
        greenlet.settrace(old)
    pool.release(conn)
    assert switches == []


def test_connection_marked_for_reconnect_is_closed_on_release(make_pool):
    """redis-py 8's should_reconnect() (maintenance notifications) closes the connection on release."""
    if not hasattr(redis.Connection, "mark_for_reconnect"):
        pytest.skip("redis-py before 7 has no maintenance notifications")
    pool = make_pool(max_connections=1, protocol=3)
    conn = pool.get_connection()
    conn.mark_for_reconnect()
    pool.release(conn)
    assert pool.stats().closed["reconnect"] == 1


HOT_LOOP = """
import sys
from greenpool import BlockingConnectionPool
pool = BlockingConnectionPool(max_connections=1, host="127.0.0.1", port={port})
pool.release(pool.get_connection())
n = int(sys.argv[1])
sys.stdout.write("MARK\\n"); sys.stdout.flush()
for _ in range(n):
    pool.release(pool.get_connection())
sys.stdout.write("MARK\\n"); sys.stdout.flush()
"""


def test_hot_path_makes_no_system_call(redis_server):
    """strace: 20,000 checkouts of a recent connection make no more syscalls than 2,000."""
    if not shutil.which("strace"):
        pytest.skip("needs strace")
    counts = []
    for n in (2000, 20000):
        out = subprocess.run(
            ["strace", "-f", "-qq", "-e", "signal=none", sys.executable, "-c",
             HOT_LOOP.format(port=redis_server.port), str(n)],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )
        if "PTRACE_TRACEME" in out.stderr or "Operation not permitted" in out.stderr:
            pytest.skip("ptrace is not permitted here")
        lines = out.stderr.splitlines()
        marks = [i for i, line in enumerate(lines) if "MARK" in line and "write(1" in line]
        assert len(marks) == 2, out.stderr[-2000:]
        counts.append(marks[1] - marks[0] - 1)
    assert counts[1] - counts[0] < 50, counts
