"""Contracts 11 and 12 (stats) and the misuse rules: close, stats, repr, bad releases, threads."""

from __future__ import annotations

import logging
import re

import gevent
import pytest
import redis
from gevent.monkey import get_original
from pools import check_invariants

from greenpool import BlockingConnectionPool, ConfigError, PoolClosed, PoolStats


def test_close_wakes_waiters_closes_idle_and_is_idempotent(make_pool, redis_server, server_clients):
    """close() wakes every waiter with PoolClosed and closes idle connections, twice safely."""
    pool = make_pool(max_connections=2, timeout=5)
    a, b = pool.get_connection(), pool.get_connection()
    pool.release(b)  # one idle
    pool.release(pool.get_connection())
    held = pool.get_connection()
    assert held is b
    waiters = [gevent.spawn(pool.get_connection) for _ in range(3)]
    gevent.sleep(0)
    assert pool.stats().waiting == 3
    pool.close()
    pool.close()
    for waiter in waiters:
        with pytest.raises(PoolClosed, match="closed while waiting"):
            waiter.get(timeout=1)
    with pytest.raises(PoolClosed, match="is closed"):
        pool.get_connection()
    pool.release(a)  # released after close: closed, not kept
    pool.release(held)
    stats = pool.stats()
    assert stats.size == 0 and stats.closed["pool_closed"] == 2
    assert a._sock is None and held._sock is None
    assert pool.closed


def test_pool_is_a_context_manager(redis_server):
    """Leaving the with block closes the pool and stops its maintenance greenlet."""
    with BlockingConnectionPool(host=redis_server.host, port=redis_server.port) as pool:
        redis.Redis(connection_pool=pool).ping()
        maintenance = pool._maintenance
        assert maintenance is not None and not maintenance.greenlet.dead
    assert pool.closed
    maintenance.greenlet.join(timeout=1)
    assert maintenance.greenlet.dead


def test_stats_snapshot_counts_everything(make_pool):
    """stats() is a frozen snapshot with gauges and counters."""
    pool = make_pool(max_connections=2, timeout=0.05, name="s")
    client = redis.Redis(connection_pool=pool)
    client.ping()
    held = [pool.get_connection(), pool.get_connection()]
    with pytest.raises(redis.ConnectionError):
        pool.get_connection()
    stats = pool.stats()
    assert isinstance(stats, PoolStats)
    assert (stats.name, stats.max_connections, stats.size, stats.idle, stats.in_use) == ("s", 2, 2, 0, 2)
    assert (stats.checkouts, stats.waits, stats.timeouts, stats.created) == (3, 3, 1, 2)
    assert stats.wait_time > 0.04
    with pytest.raises(AttributeError):
        stats.size = 3  # type: ignore[misc]
    assert stats.as_dict()["closed"]["dirty"] == 0
    for conn in held:
        pool.release(conn)


def test_repr_shows_the_live_state(make_pool, redis_server):
    """repr(pool) names the pool, the server and every gauge."""
    pool = make_pool(max_connections=3, name="cache")
    conn = pool.get_connection()
    assert re.fullmatch(
        rf"<greenpool.BlockingConnectionPool 'cache' 127.0.0.1:{redis_server.port}/0 "
        r"size=1/3 idle=0 in_use=1 dialling=0 waiting=0 "
        rf"\(<redis.connection.Connection\(host=127.0.0.1,port={redis_server.port}\)>\)>",
        repr(pool),
    )
    pool.release(conn)
    pool.close()
    assert " closed size=0/3 " in repr(pool)


def test_double_release_is_ignored_with_a_warning(make_pool, caplog):
    """Releasing twice never makes a connection idle twice or lends it to two callers."""
    pool = make_pool(max_connections=2, timeout=1)
    conn = pool.get_connection()
    pool.release(conn)
    with caplog.at_level(logging.WARNING, logger="greenpool"):
        pool.release(conn)
    assert "released twice (it is already idle)" in caplog.text
    assert pool.stats().idle == 1 and pool.stats().misuses == 1
    first, second = pool.get_connection(), pool.get_connection()
    assert first is not second
    pool.release(first)
    pool.release(second)
    check_invariants(pool)


def test_double_release_during_a_hand_off_is_ignored(make_pool, caplog):
    """A second release of a connection already handed to a waiter does not take it back."""
    pool = make_pool(max_connections=1, timeout=1)
    conn = pool.get_connection()
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    pool.release(conn)  # handed to the waiter
    with caplog.at_level(logging.WARNING, logger="greenpool"):
        pool.release(conn)
    assert "already handed to another caller" in caplog.text
    assert waiter.get(timeout=1) is conn
    assert pool.stats().in_use == 1
    pool.release(conn)
    check_invariants(pool)


def test_release_of_a_foreign_connection_is_ignored(make_pool, caplog):
    """A connection of another pool is neither adopted nor closed."""
    ours, theirs = make_pool(max_connections=1), make_pool(max_connections=1)
    conn = theirs.get_connection()
    with caplog.at_level(logging.WARNING, logger="greenpool"):
        ours.release(conn)
    assert "not lent out by this pool" in caplog.text
    assert ours.stats().idle == 0 and conn._sock is not None
    theirs.release(conn)


def test_use_from_another_os_thread_is_refused(make_pool):
    """A real OS thread (another hub) gets a clear error and the state is untouched."""
    pool = make_pool(max_connections=1, timeout=1)
    pool.release(pool.get_connection())
    result = run_in_os_thread(pool.get_connection)
    assert isinstance(result, RuntimeError) and "used from OS thread" in str(result)
    assert pool.stats().idle == 1
    check_invariants(pool)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_connections": 0}, r"max_connections must be an integer >= 1 \(got 0\)"),
        ({"max_connections": -3}, r"max_connections must be an integer >= 1 \(got -3\)"),
        ({"max_connections": True}, r"max_connections must be an integer >= 1 \(got True\)"),
        ({"max_connections": "5"}, r"max_connections must be an integer >= 1 \(got '5'\)"),
        ({"timeout": -1}, r"timeout must be a number of seconds >= 0 or None \(got -1\)"),
        ({"timeout": float("nan")}, r"timeout must be a number of seconds >= 0 or None \(got nan\)"),
        ({"timeout": float("inf")}, r"timeout must be a number of seconds >= 0 or None \(got inf\)"),
        ({"timeout": "soon"}, r"timeout must be a number of seconds >= 0 or None \(got 'soon'\)"),
        ({"min_idle": 6, "max_connections": 5}, r"min_idle must be <= max_connections"),
    ],
)
def test_bad_settings_are_rejected_at_construction(kwargs, message):
    """Each bad value names the parameter, the expected form and the value received."""
    with pytest.raises(ConfigError, match=message):
        BlockingConnectionPool(**kwargs)


def test_bad_environment_is_rejected_at_construction(monkeypatch):
    """A GREENPOOL_* variable applies to a pool built in code, and a bad one names itself."""
    monkeypatch.setenv("GREENPOOL_MAX_CONNECTIONS", "7")
    with BlockingConnectionPool() as pool:
        assert pool.max_connections == 7 and pool.sources["max_connections"] == "environment"
    with BlockingConnectionPool(max_connections=3) as pool:
        assert pool.max_connections == 3 and pool.sources["max_connections"] == "argument"
    monkeypatch.setenv("GREENPOOL_IDLE_TIMEOUT", "5 minutes")
    with pytest.raises(
        ConfigError, match=r"GREENPOOL_IDLE_TIMEOUT must be a duration such as 30, 30s or 500ms \(got '5 minutes'\)"
    ):
        BlockingConnectionPool()


def test_pool_errors_keep_their_message_in_repr():
    """repr() of a pool error shows its message (redis-py 8's repr drops it)."""
    error = PoolClosed("pool 'x' is closed")
    assert repr(error) == "PoolClosed(\"pool 'x' is closed\")"
    assert isinstance(error, redis.exceptions.ConnectionError)


def test_close_closes_idle_sockets(make_pool, redis_server, server_clients):
    """close() closes the idle connections' sockets, and the server sees them go."""
    pool = make_pool(max_connections=2, timeout=1)
    conns = [pool.get_connection() for _ in range(2)]
    for conn in conns:
        pool.release(conn)
    assert server_clients(redis_server) == 2
    pool.close()
    assert all(conn._sock is None for conn in conns)
    assert pool.stats().closed["pool_closed"] == 2
    for _ in range(40):
        if server_clients(redis_server) == 0:
            break
        gevent.sleep(0.05)
    assert server_clients(redis_server) == 0


def test_closed_pool_never_lends_a_connection_passed_on_by_a_killed_waiter(make_pool):
    """Hand-off, close(), then the waiter dies: the connection is closed, not idle in a closed pool."""
    pool = make_pool(max_connections=1, timeout=5)
    held = pool.get_connection()
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    waiter.kill(block=False)
    pool.release(held)  # handed to the waiter, which has not run
    pool.close()
    gevent.sleep(0)  # the kill lands; the waiter passes the connection on
    assert waiter.dead and pool.stats().idle == 0 and held._sock is None
    with pytest.raises(PoolClosed):
        pool.get_connection()


def test_disconnect_marks_a_handed_connection_too(make_pool):
    """A connection disconnect() marked for closing is not lent again after its waiter dies."""
    pool = make_pool(max_connections=1, timeout=5)
    held = pool.get_connection()
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    waiter.kill(block=False)
    pool.release(held)  # handed to the waiter
    pool.disconnect()
    gevent.sleep(0)
    conn = pool.get_connection()
    assert conn is not held and held._sock is None
    pool.release(conn)


def test_reset_replaces_connections_and_keeps_waiters(make_pool):
    """reset() closes idle connections, retires those in use, and a waiter is still served."""
    pool = make_pool(max_connections=1, timeout=5)
    held = pool.get_connection()
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    pool.reset()
    pool.release(held)  # retired, not handed over
    conn = waiter.get(timeout=2)
    assert conn is not held and held._sock is None
    pool.release(conn)
    check_invariants(pool)


def test_pool_logs_to_the_greenpool_logger(make_pool, caplog):
    """The pool's warnings go to the logger named 'greenpool'."""
    pool = make_pool(max_connections=1)
    conn = pool.get_connection()
    pool.release(conn)
    with caplog.at_level(logging.WARNING):
        pool.release(conn)
    assert [record.name for record in caplog.records] == ["greenpool"]


def run_in_os_thread(function):
    """Run *function* in a real OS thread (another hub) and wait for it cooperatively."""
    lock = get_original("_thread", "allocate_lock")()
    lock.acquire()
    outcome = []

    def run():
        try:
            outcome.append(function())
        except BaseException as exc:  # reported to the test, in the hub's thread
            outcome.append(exc)
        finally:
            lock.release()

    get_original("_thread", "start_new_thread")(run, ())
    while not lock.acquire(False):
        gevent.sleep(0.01)
    return outcome[0]


@pytest.mark.parametrize("method", ["release", "close", "disconnect"])
def test_other_calls_from_another_os_thread_are_refused(make_pool, method):
    """release(), close() and disconnect() from a real OS thread raise and change nothing."""
    pool = make_pool(max_connections=1, timeout=1)
    conn = pool.get_connection()
    call = getattr(pool, method)
    result = run_in_os_thread(lambda: call(conn) if method == "release" else call())
    assert isinstance(result, RuntimeError) and "used from OS thread" in str(result)
    assert pool.stats().in_use == 1 and not pool.closed and conn._sock is not None
    pool.release(conn)
