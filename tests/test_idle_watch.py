"""An idle connection the server closes is never lent (greenpool._watch).

Each test freezes the pool's clock, so every idle connection stays "used
within validation_window" and checkout makes no readiness check: only the
hub's watch of idle connections can notice that the server closed them.
redis-py's retries are off (``retry=NO_RETRY``): they would hide a dead
connection handed to a caller. Without the watch each test fails with
"Connection closed by server." on the first command.
"""

from __future__ import annotations

import socket as _socket_module

import gevent
import pytest
import redis
from gevent.monkey import get_original
from pools import check_invariants
from redis.backoff import NoBackoff
from redis.retry import Retry

from greenpool._server import RedisServer

NO_RETRY = Retry(NoBackoff(), 0)
_blocking_sleep = get_original("time", "sleep")
_BlockingSocket = get_original("socket", "socket")


def _frozen_pool(make_pool, **kwargs):
    return make_pool(clock=lambda: 1000.0, retry=NO_RETRY, client_name="watched", **kwargs)


def _warm(pool, n: int) -> None:
    held = [pool.get_connection() for _ in range(n)]
    for conn in held:
        conn.send_command("PING")
        conn.read_response()
    for conn in held:
        pool.release(conn)


def _kill_pool_clients(host: str, port: int) -> int:
    with redis.Redis(host=host, port=port) as admin:
        ids = [c["id"] for c in admin.client_list() if c.get("name") == "watched"]
        return sum(admin.client_kill_filter(_id=i) for i in ids)


@pytest.mark.parametrize("pause", [None, 0.1])
@pytest.mark.parametrize("concurrent", [False, True])
def test_client_kill_of_idle_connections_costs_callers_nothing(make_pool, redis_server, pause, concurrent):
    """CLIENT KILL, then commands at the next hub iteration (pause None) or
    100 ms later. (With no hub iteration at all between reading the KILL's
    reply and the checkout, nothing has looked at the sockets yet: only a
    system call per checkout could tell, which the hot path does not make.)"""
    pool = _frozen_pool(make_pool, max_connections=4, timeout=2)
    _warm(pool, 4)
    gevent.sleep(0.01)  # a hub iteration: the idle connections are watched
    assert _kill_pool_clients(redis_server.host, redis_server.port) == 4
    if pause is None:
        gevent.idle()  # one pass of the hub's loop, I/O polling included
    else:
        gevent.sleep(pause)
    client = redis.Redis(connection_pool=pool)
    if concurrent:
        jobs = [gevent.spawn(client.incr, "watch:n") for _ in range(8)]
        gevent.joinall(jobs, raise_error=True, timeout=5)
    else:
        for _ in range(8):
            client.incr("watch:n")
    assert int(client.get("watch:n")) == 8
    stats = pool.stats()
    assert stats.closed["server_closed"] == 4 and stats.closed["failed_check"] == 0
    assert stats.size <= 4
    check_invariants(pool)


def test_server_restart_costs_callers_nothing(make_pool):
    with RedisServer() as server:
        pool = _frozen_pool(make_pool, host=server.host, port=server.port, max_connections=3, timeout=5)
        _warm(pool, 3)
        gevent.sleep(0.01)
        server.restart()
        client = redis.Redis(connection_pool=pool)
        jobs = [gevent.spawn(client.set, f"k{i}", i) for i in range(6)]
        gevent.joinall(jobs, raise_error=True, timeout=10)
        assert client.get("k5") == b"5"
        assert pool.stats().closed["server_closed"] == 3
        check_invariants(pool)
        pool.close()


def test_server_idle_timeout_costs_callers_nothing(make_pool, redis_server):
    admin = redis.Redis(host=redis_server.host, port=redis_server.port)
    admin.config_set("timeout", 1)
    try:
        pool = _frozen_pool(make_pool, max_connections=2, timeout=2)
        _warm(pool, 2)
        gevent.sleep(2.5)  # the server's idle sweep closes both
        client = redis.Redis(connection_pool=pool)
        assert client.ping()
        assert pool.stats().closed["server_closed"] == 2
    finally:
        admin.config_set("timeout", 0)


def test_the_watch_stops_at_checkout(make_pool, redis_server):
    """A lent connection's replies are its holder's: its watch is off while lent."""
    pool = _frozen_pool(make_pool, max_connections=1, timeout=2)
    _warm(pool, 1)
    gevent.sleep(0.01)
    conn = pool.get_connection()
    conn.send_command("PING")
    gevent.sleep(0.05)  # the reply waits, readable, while the hub runs
    assert conn.read_response() in (b"PONG", "PONG")
    pool.release(conn)
    assert pool.stats().closed["server_closed"] == 0


def test_where_the_watch_cannot_have_run_the_readiness_check_still_does(make_pool, redis_server):
    """Killed while the hub never ran since the release (a greenlet that does
    not yield): no watch armed yet, so checkout polls a connection idle past
    validation_window, and replaces it."""
    now = [1000.0]
    pool = make_pool(clock=lambda: now[0], retry=NO_RETRY, max_connections=1, timeout=2)
    conn = pool.get_connection()
    conn.send_command("CLIENT", "ID")
    client_id = int(conn.read_response())
    pool.release(conn)  # the watch is only scheduled: the hub must run to arm it
    with _BlockingSocket(_socket_module.AF_INET, _socket_module.SOCK_STREAM) as admin:
        admin.connect((redis_server.host, redis_server.port))
        admin.sendall(b"CLIENT KILL ID %d\r\n" % client_id)
        assert admin.recv(64).startswith(b":1")
    _blocking_sleep(0.05)  # the FIN arrives; the hub still has not run
    now[0] += 10
    assert redis.Redis(connection_pool=pool).ping()
    assert pool.stats().closed["failed_check"] == 1
