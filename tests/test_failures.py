"""Failures users never see, against a real redis-server: a frozen server,
a half-open peer, and keepalive on the connections that replace killed ones.

Each caller SETs and GETs a key of its own and checks the value, so a reply
crossed between connections shows as a wrong value. redis-py's retries are
off (``retry=NO_RETRY``): they would hide a dead connection handed out.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Dict, List, Tuple

import gevent
import pytest
import redis
from admin import wait_until
from pools import check_invariants
from redis.backoff import NoBackoff
from redis.retry import Retry
from test_killsafe import checkout_all

from greenpool import _redispy
from greenpool._server import RedisServer
from greenpool.keepalive import read_options, supported_options

NO_RETRY = Retry(NoBackoff(), 0)
#: What a caller may get instead of its answer while the server is unusable.
EXPECTED_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def named_clients(server: RedisServer, name: str) -> int:
    """How many of *server*'s clients carry the client name *name*."""
    with redis.Redis(host=server.host, port=server.port, socket_timeout=5) as admin:
        count = sum(1 for c in admin.client_list() if c.get("name") == name)
        admin.connection_pool.disconnect()
    return count


# -- a frozen server ---------------------------------------------------------

MAX = 4
WORKERS = 12


@pytest.mark.slow
@pytest.mark.timeout_seconds(60)
def test_a_frozen_server_under_load(make_pool, fresh_redis_server: RedisServer) -> None:
    """redis-server stopped (SIGSTOP) for a second under 12 callers on 4 connections,
    then resumed: callers get their own value or a ConnectionError/TimeoutError
    (PoolTimeout included), never another's; the bound holds throughout (pool
    stats at every hub turn, the server's CLIENT LIST after SIGCONT, which must
    match the pool's size: nothing dropped unclosed); no slot leaks; commands
    succeed again after the resume.

    Pins the bound with dials in flight counted (with slow-dial growth
    allowed past max_connections the server sees 8 clients) and failed
    dials giving their slot back (with one leaked per failure, callers are
    still unserved after SIGCONT); the value check shows that no reply
    crosses between callers when the late replies arrive after SIGCONT."""
    server = fresh_redis_server
    pool = make_pool(
        host=server.host, port=server.port, max_connections=MAX, timeout=0.5,
        socket_timeout=0.3, socket_connect_timeout=0.5, retry=NO_RETRY, client_name="frozen",
    )
    client = redis.Redis(connection_pool=pool)
    stop: List[bool] = []
    resumed_at: List[float] = []
    outcomes: Dict[int, List[Tuple[float, str]]] = {i: [] for i in range(WORKERS)}
    wrong: List[Any] = []
    peak = [0]
    seen: List[int] = []  # the server's count of the pool's clients after SIGCONT

    def worker(i: int) -> None:
        for n in range(10_000):  # bounded; stop ends it long before
            if stop:
                return
            value = f"{i}:{n}"
            try:
                assert client.set(f"frozen:{i}", value) is True
                got = client.get(f"frozen:{i}")
            except EXPECTED_ERRORS as exc:
                outcomes[i].append((time.monotonic(), type(exc).__name__))
                gevent.sleep(0.01)
                continue
            if got != value.encode():
                wrong.append((i, value, got))
            outcomes[i].append((time.monotonic(), "ok"))
            gevent.sleep(0)

    def watch() -> None:
        while not stop:
            check_invariants(pool)
            peak[0] = max(peak[0], pool.stats().size)
            gevent.sleep(0)

    watcher = gevent.spawn(watch)
    workers = [gevent.spawn(worker, i) for i in range(WORKERS)]
    try:
        gevent.sleep(0.3)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            gevent.sleep(1.0)
        finally:
            os.kill(server.pid, signal.SIGCONT)
            resumed_at.append(time.monotonic())
        # The pool's clients as the server sees them, once it has reaped
        # those the pool closed while it was stopped (dials given up on).
        gevent.sleep(0.5)
        for _ in range(3):
            seen.append(named_clients(server, "frozen"))
            gevent.sleep(0.25)
    finally:
        stop.append(True)
        gevent.joinall([*workers, watcher], timeout=10)
    assert all(g.dead for g in workers) and watcher.dead
    for g in [*workers, watcher]:
        g.get()  # re-raises an invariant's AssertionError or an unexpected error
    assert wrong == []
    errors = {kind for results in outcomes.values() for _, kind in results if kind != "ok"}
    # The freeze was noticed (read timeouts), and nothing else went wrong.
    assert "TimeoutError" in errors and errors <= {"ConnectionError", "TimeoutError", "PoolTimeout"}
    assert peak[0] <= MAX and max(seen) <= MAX, (peak, seen)
    # Every caller was served again once the server was back.
    assert all(any(at > resumed_at[0] and kind == "ok" for at, kind in results)
               for results in outcomes.values()), outcomes
    stats = pool.stats()
    assert (stats.in_use, stats.waiting) == (0, 0)
    # The server's count settles to the pool's: every connection the pool
    # gave up on was closed, none left open behind its back.
    wait_until(lambda: named_clients(server, "frozen") == pool.stats().size, 5,
               "the server's clients to match the pool's connections")
    assert pool.stats().size <= MAX
    checkout_all(pool)  # every slot comes out, each connection clean


# -- a half-open peer ----------------------------------------------------------


@pytest.mark.timing
@pytest.mark.parametrize("when", ["in_use", "idle"])
def test_a_half_open_peer_times_out_and_is_replaced(make_pool, tcp_proxy, when: str) -> None:
    """The proxy stops forwarding one connection without closing it (a peer gone
    without FIN or RST), while it is lent mid-command or while it is idle: the
    caller gets TimeoutError within socket_timeout, the slot is freed, that
    connection is closed and never lent again, and the next command, on a
    fresh connection through the same proxy, works at once.

    Pins that a read timeout retires the connection (closed as "broken"): one
    lent again would time out again, or answer with the late reply."""
    pool = make_pool(port=tcp_proxy.port, max_connections=1, timeout=2, socket_timeout=0.3,
                     retry=NO_RETRY)
    client = redis.Redis(connection_pool=pool)
    client.set("half:k", "v")
    start = 0.0
    with pytest.raises(redis.exceptions.TimeoutError):
        if when == "in_use":
            conn = pool.get_connection()
            try:
                tcp_proxy.blackhole_existing()
                start = time.monotonic()
                conn.send_command("GET", "half:k")
                conn.read_response()
            finally:
                pool.release(conn)
        else:
            tcp_proxy.blackhole_existing()
            start = time.monotonic()
            client.get("half:k")
    assert time.monotonic() - start < 0.3 + 2.0  # socket_timeout, with room for a busy machine
    stats = pool.stats()
    assert (stats.in_use, stats.size, stats.closed["broken"]) == (0, 0, 1)
    wait_until(lambda: tcp_proxy.connections == 0, 2, "the silent connection to be closed")
    assert client.get("half:k") == b"v"  # the old path is still silent: a new connection
    stats = pool.stats()
    assert (stats.created, stats.in_use, tcp_proxy.connections) == (2, 0, 1)
    check_invariants(pool)


# -- keepalive after a forced reconnect ------------------------------------------

KEEPALIVE = {"keepalive_idle": 7, "keepalive_interval": 2, "keepalive_count": 4}


@pytest.mark.parametrize("how", ["client_kill", "restart"])
def test_keepalive_options_on_the_connections_that_replace_killed_ones(
    make_pool, fresh_redis_server: RedisServer, how: str
) -> None:
    """CLIENT KILL of the pool's idle connections, or a server restart: the first
    command succeeds with no error, and every new socket has SO_KEEPALIVE and
    the pool's TCP_KEEPIDLE/TCP_KEEPINTVL/TCP_KEEPCNT (not the defaults 30/5/3),
    read back with getsockopt.

    Pins that the options are part of every dial, not of the first socket
    only, and that idle connections the server dropped are not lent."""
    if not {"idle", "interval", "count"} <= supported_options():
        pytest.skip("this platform lacks one of the TCP keepalive options")
    server = fresh_redis_server
    pool = make_pool(host=server.host, port=server.port, max_connections=2, timeout=5,
                     retry=NO_RETRY, client_name="kept", **KEEPALIVE)
    held = [pool.get_connection() for _ in range(2)]
    # Held here, so that no new socket can be mistaken for one of these.
    old = [_redispy.sockets_of(_redispy.raw_connection(c))[0] for c in held]
    for conn in held:
        pool.release(conn)
    gevent.sleep(0.01)  # a hub iteration: the idle connections are watched
    if how == "client_kill":
        with redis.Redis(host=server.host, port=server.port) as admin:
            ids = [c["id"] for c in admin.client_list() if c.get("name") == "kept"]
            assert sum(admin.client_kill_filter(_id=i) for i in ids) == 2
            admin.connection_pool.disconnect()
    else:
        server.restart()
    gevent.sleep(0.1)
    client = redis.Redis(connection_pool=pool)
    assert client.set("kept:k", "v") is True  # no error: the dead ones were not lent
    held = [pool.get_connection() for _ in range(2)]
    try:
        sockets = [_redispy.sockets_of(_redispy.raw_connection(c))[0] for c in held]
        assert not any(new is dead for new in sockets for dead in old)
        for sock in sockets:
            options = read_options(sock)
            assert options["socket_keepalive"] is True
            assert {name: options[name] for name in KEEPALIVE} == KEEPALIVE
    finally:
        for conn in held:
            pool.release(conn)
    assert pool.stats().closed["server_closed"] == 2
    check_invariants(pool)
