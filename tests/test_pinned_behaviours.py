"""Behaviours that mutation testing found no test pinned: each test here
fails for a mutant of the pool, the dial or maintenance that the rest of
the suite let through (see tests/mutate.py)."""

from __future__ import annotations

import logging
import math

import gevent
import pytest
import redis
from gevent import GreenletExit, getcurrent
from gevent.monkey import get_original
from pools import check_invariants
from test_maintenance import FakeClock, quiet, settle

from greenpool import BlockingConnectionPool, PoolClosed, PoolTimeout, maintenance, sentinel
from greenpool.core import FAILED, WAKE


def test_a_timed_out_waiter_then_more_contention(make_pool):
    """After one waiter times out, the next waiter is served by the next release."""
    pool = make_pool(max_connections=1, timeout=0.05)
    held = pool.get_connection()
    with pytest.raises(PoolTimeout):
        pool.get_connection()
    pool._core.check()
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    assert pool.stats().waiting == 1
    pool.release(held)
    assert waiter.get(timeout=2) is held
    stats = pool.stats()
    # Waits: the cold first checkout, the timed-out one, the served one.
    assert (stats.timeouts, stats.waits, stats.checkouts) == (1, 3, 2)
    pool.release(held)
    check_invariants(pool)


def test_a_connection_failing_its_readiness_check_is_never_lent(make_pool, redis_server):
    """An idle connection the server closed is closed at checkout, and its
    replacement is dialled in a greenlet of the pool's, not the caller's."""
    clock = FakeClock()
    pool = make_pool(max_connections=1, timeout=2, clock=clock)
    old = pool.get_connection()
    old.send_command("CLIENT", "ID")
    client_id = old.read_response()
    pool.release(old)
    # Killed without running the hub, so the idle watch is not armed yet
    # (test_idle_watch.py covers the watch): a blocking socket, a blocking sleep.
    with get_original("socket", "socket")() as admin:
        admin.connect((redis_server.host, redis_server.port))
        admin.sendall(b"CLIENT KILL ID %d\r\n" % int(client_id))
        assert admin.recv(64).startswith(b":1")
    get_original("time", "sleep")(0.05)  # the FIN arrives
    clock.jump(10)  # past validation_window: checkout polls it
    dialled_in = []
    make_connection = pool.make_connection
    pool.make_connection = lambda: dialled_in.append(getcurrent()) or make_connection()
    conn = pool.get_connection()
    assert conn is not old
    assert dialled_in and dialled_in[0] is not getcurrent()
    assert pool.stats().closed["failed_check"] == 1
    conn.send_command("PING")
    assert conn.read_response() in (b"PONG", "PONG")
    pool.release(conn)
    check_invariants(pool)


def test_two_commands_written_one_reply_read_closes_the_connection(make_pool):
    """A connection released owing a reply is closed as dirty, never lent again."""
    pool = make_pool(max_connections=1, timeout=2)
    conn = pool.get_connection()
    conn.send_command("ECHO", "a")
    conn.send_command("ECHO", "b")
    assert conn.read_response() == b"a"
    pool.release(conn)
    assert pool.stats().closed["dirty"] == 1 and pool.stats().size == 0
    fresh = pool.get_connection()
    assert fresh is not conn
    fresh.send_command("ECHO", "c")
    assert fresh.read_response() == b"c"
    pool.release(fresh)
    check_invariants(pool)


def test_a_waiter_killed_after_an_error_was_delivered_to_it(make_pool, monkeypatch):
    """Killed between a dial's error reaching it and running, a waiter leaves
    nothing behind: no waiter counted, no slot taken."""
    pool = make_pool(max_connections=1, timeout=5)
    caller = gevent.spawn(pool.get_connection)
    real_act = pool._act

    def act() -> None:
        # The dial's error is in the outbox for the caller: kill the caller
        # before its wake-up is scheduled, so the kill is what it sees.
        if any(kind is WAKE and item.state is FAILED for kind, item in pool._core.outbox):
            caller.kill(block=False)
        real_act()

    monkeypatch.setattr(pool, "_act", act)
    monkeypatch.setattr(pool, "make_connection", lambda: (_ for _ in ()).throw(
        redis.exceptions.ConnectionError("refused")))
    caller.join(timeout=5)
    assert isinstance(caller.value, GreenletExit)  # how gevent reports a kill
    stats = pool.stats()
    assert (stats.waiting, stats.size, stats.dial_errors) == (0, 0, 1)
    check_invariants(pool)
    monkeypatch.undo()
    pool.release(pool.get_connection())
    check_invariants(pool)


def test_a_genuine_release_after_a_double_release_during_a_hand_off(make_pool, caplog):
    """A second release while the connection is handed to a waiter is ignored;
    the waiter's own release later is honoured."""
    pool = make_pool(max_connections=1, timeout=2, name="twice")
    held = pool.get_connection()
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    pool.release(held)  # handed to the waiter, which has not run yet
    with caplog.at_level(logging.WARNING, logger="greenpool"):
        pool.release(held)
    assert "already handed to another caller" in caplog.text
    assert waiter.get(timeout=2) is held
    assert pool.stats().in_use == 1
    pool.release(held)  # the waiter's genuine release
    stats = pool.stats()
    assert (stats.idle, stats.in_use, stats.misuses) == (1, 0, 1)
    check_invariants(pool)


def test_a_dial_finishing_after_close_is_closed(make_pool, tcp_proxy, server_clients):
    """A connection whose dial ends after close() is closed at once."""
    tcp_proxy.first_reply_delay = 0.3
    # A client name makes every redis-py version wait for a handshake reply.
    pool = BlockingConnectionPool.from_url(tcp_proxy.url, max_connections=1, timeout=5,
                                           client_name="late")
    caller = gevent.spawn(pool.get_connection)
    gevent.sleep(0.1)
    assert pool.stats().dialling == 1
    pool.close()
    with pytest.raises(PoolClosed):
        caller.get(timeout=2)
    for _ in range(100):
        if pool.stats().closed["pool_closed"] == 1:
            break
        gevent.sleep(0.01)
    stats = pool.stats()
    assert (stats.size, stats.created, stats.closed["pool_closed"]) == (0, 1, 1)
    check_invariants(pool)


def test_make_connection_raising_reaches_the_caller(make_pool, monkeypatch):
    """An exception from make_connection() (bad connection options) is the
    waiting caller's error; the slot is free again."""
    pool = make_pool(max_connections=1, timeout=2)
    monkeypatch.setattr(pool, "make_connection", lambda: (_ for _ in ()).throw(
        TypeError("unexpected keyword argument 'x'")))
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        pool.get_connection()
    assert (pool.stats().size, pool.stats().dial_errors) == (0, 1)
    monkeypatch.undo()
    pool.release(pool.get_connection())
    check_invariants(pool)


def test_max_lifetime_none_never_expires(make_pool):
    """max_lifetime=None: connections never expire, however old."""
    clock = FakeClock()
    pool = quiet(make_pool(max_connections=2, max_lifetime=None, idle_timeout=None, clock=clock))
    assert all(s.expires_at == math.inf for s in pool._core.idle)
    clock.jump(10**9)
    assert maintenance.run_once(pool).close_expired == []
    pool.release(pool.get_connection())
    assert pool.stats().closed["expired"] == 0 and pool.stats().created == 1


def test_leak_of_a_connection_obtained_by_waiting(make_pool, caplog):
    """A connection a caller got by waiting is tracked from its hand-off: not
    reported below the threshold, reported with the waiter's stack above it."""
    clock = FakeClock()
    pool = quiet(make_pool(max_connections=1, timeout=5, leak_detection_threshold=5,
                           clock=clock))
    held = pool.get_connection()

    def patient_waiter() -> object:
        return pool.get_connection()

    waiter = gevent.spawn(patient_waiter)
    gevent.sleep(0)
    clock.jump(3)
    pool.release(held)
    assert waiter.get(timeout=2) is held
    clock.jump(4)  # held 4 s by the waiter: under the threshold
    with caplog.at_level(logging.WARNING, logger="greenpool"):
        assert maintenance.run_once(pool).leaks == []
        clock.jump(2)
        assert len(maintenance.run_once(pool).leaks) == 1
    assert "held for 6.0 s" in caplog.text and "patient_waiter" in caplog.text
    assert pool.stats().leaks == 1
    pool.release(held)


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, 30.0),  # nothing to do: the longest period
        ({"idle_timeout": None, "max_lifetime": None}, 30.0),
        ({"idle_timeout": 8.0}, 2.0),
        ({"keepalive_ping_interval": 4.0, "idle_timeout": 100.0}, 1.0),
        ({"leak_detection_threshold": 2.0}, 0.5),
        ({"max_lifetime": 3600.0}, 30.0),
        ({"max_lifetime": 60.0, "idle_timeout": 20.0}, 5.0),
        ({"idle_timeout": 0.01}, 0.05),  # never busier than 20 runs a second
    ],
)
def test_period_is_a_quarter_of_the_shortest_setting(options, expected):
    """Maintenance runs every quarter of its shortest deadline, within bounds."""
    assert maintenance.period(options) == pytest.approx(expected)


def test_sentinel_role_master_from_the_environment():
    """GREENPOOL_SENTINEL_ROLE=master selects the master, as the default does."""
    environ = {"GREENPOOL_SENTINELS": "127.0.0.1:26379", "GREENPOOL_SENTINEL_SERVICE": "mymaster",
               "GREENPOOL_SENTINEL_ROLE": "master"}
    assert sentinel.resolve(environ).role == "master"
    environ["GREENPOOL_SENTINEL_ROLE"] = "replica"
    assert sentinel.resolve(environ).role == "replica"


def test_pool_timeout_names_the_last_connection_error(make_pool, tcp_proxy, monkeypatch):
    """A caller that times out while the pool cannot grow learns the last dial error."""
    pool = make_pool(max_connections=2, timeout=0.3, socket_connect_timeout=5)
    tcp_proxy.blackhole()  # dials after the first hang
    calls = []

    def make_connection() -> object:
        calls.append(1)
        if len(calls) == 1:
            raise redis.exceptions.ConnectionError("boom: connection refused")
        # The handshake (CLIENT SETNAME) hangs on every redis-py version.
        return redis.Connection(host=tcp_proxy.host, port=tcp_proxy.port, client_name="hang")

    monkeypatch.setattr(pool, "make_connection", make_connection)
    first = gevent.spawn(pool.get_connection)
    second = gevent.spawn(pool.get_connection)
    with pytest.raises(redis.exceptions.ConnectionError, match="boom"):
        first.get(timeout=2)
    with pytest.raises(PoolTimeout, match=r"; last connection error: boom: connection refused$"):
        second.get(timeout=2)
    pool.close()


def test_every_stats_counter_moves(make_pool, redis_server, caplog):
    """Each counter of stats() counts what its documentation says."""
    clock = FakeClock()
    pool = quiet(make_pool(max_connections=2, timeout=0.05, max_waiters=1, idle_timeout=10,
                           max_lifetime=100, keepalive_ping_interval=5,
                           leak_detection_threshold=50, clock=clock))
    settle(pool)
    base = pool.stats()
    assert (base.checkouts, base.created) == (1, 1)
    a, b = pool.get_connection(), pool.get_connection()  # one idle, one dialled by a wait
    with pytest.raises(PoolTimeout):
        pool.get_connection()  # waits, times out
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    from greenpool import TooManyWaiters

    with pytest.raises(TooManyWaiters):
        pool.get_connection()  # max_waiters=1 already waits
    clock.jump(2)
    waiter.kill()  # waited 2 s (by the fake clock), then killed
    caplog.set_level(logging.WARNING, logger="greenpool")
    pool.release(object())  # a misuse
    a.send_command("PING")
    pool.release(a)  # owes a reply: dirty
    b.disconnect()
    pool.release(b)  # no socket: broken
    stats = pool.stats()
    # Waits: the warm-up, b (dialled), the timed-out caller, the killed waiter.
    assert stats.checkouts == 3 and stats.waits == 4 and stats.timeouts == 1
    assert stats.rejected == 1 and stats.misuses == 1 and stats.wait_time == pytest.approx(2)
    assert stats.closed["dirty"] == 1 and stats.closed["broken"] == 1
    c = pool.get_connection()  # dialled: created
    pool.release(c)
    clock.jump(6)  # idle 6 s: past the ping interval
    assert len(maintenance.run_once(pool).ping) == 1
    assert pool.stats().pings == 1
    d = pool.get_connection()  # idle 6 s: a readiness check, passes
    clock.jump(60)
    assert len(maintenance.run_once(pool).leaks) == 1  # held 60 s
    pool.release(d)
    clock.jump(11)
    maintenance.run_once(pool)  # idle 11 s > idle_timeout, min_idle 0
    clock.jump(200)
    stats = pool.stats()
    assert stats.leaks == 1 and stats.closed["idle"] == 1
    e = pool.get_connection()
    clock.jump(200)  # past max_lifetime while lent
    pool.release(e)
    assert pool.stats().closed["expired"] == 1
    f = pool.get_connection()
    pool.release(f)
    if hasattr(f, "mark_for_reconnect"):  # redis-py 7+
        g = pool.get_connection()
        g.mark_for_reconnect()
        pool.release(g)
        assert pool.stats().closed["reconnect"] == 1
    h = pool.get_connection()
    pool.close()
    pool.release(h)  # in use at close(): closed on release
    stats = pool.stats()
    assert stats.closed["pool_closed"] == 1
    assert stats.created == sum(stats.closed.values()) + stats.size
    assert stats.dial_errors == 0
