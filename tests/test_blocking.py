"""Contracts 2, 3 and 4: bounded, blocking with a timeout, and fair."""

from __future__ import annotations

import re
import time

import gevent
import greenlet
import pytest
import redis
from gevent.monkey import get_original
from pools import check_invariants, stop_watching, watch_invariants

from greenpool import PoolTimeout, TooManyWaiters

real_sleep = get_original("time", "sleep")


def test_timeout_raises_pool_timeout_naming_the_state(make_pool):
    """A caller waits `timeout` seconds, then gets PoolTimeout saying why."""
    pool = make_pool(max_connections=2, timeout=0.2, name="cache")
    held = [pool.get_connection() for _ in range(2)]
    # A second caller queues just after this one, so it is still waiting
    # when this one times out.
    other = gevent.spawn_later(0.05, pool.get_connection)
    start = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        pool.get_connection()
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 2
    assert isinstance(info.value, redis.exceptions.ConnectionError)
    assert re.fullmatch(
        r"no connection from pool 'cache' within 0\.20 s \(max_connections=2, 2 in use, 0 dialling, 1 waiting\)",
        str(info.value),
    )
    stats = pool.stats()
    # Four waits: the first two callers waited for their dials.
    assert stats.timeouts == 1 and stats.waits == 4
    other.kill()
    assert pool.stats().waiting == 0
    for conn in held:
        pool.release(conn)


def test_timeout_zero_never_waits_for_a_busy_connection(make_pool):
    """With timeout=0 a full pool answers at once."""
    pool = make_pool(max_connections=1, timeout=0)
    conn = pool.get_connection()  # an empty pool still dials for the caller
    with pytest.raises(PoolTimeout, match="within 0.00 s"):
        pool.get_connection()
    pool.release(conn)
    assert pool.get_connection() is conn


def test_timeout_none_waits_until_a_release(make_pool):
    """With timeout=None a caller waits for as long as it takes."""
    pool = make_pool(max_connections=1, timeout=None)
    conn = pool.get_connection()
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0.3)
    assert not waiter.ready()
    pool.release(conn)
    assert waiter.get(timeout=2) is conn


def test_waiting_never_blocks_the_hub(make_pool):
    """Other greenlets keep running while a caller waits (ticks counted when it gives up)."""
    pool = make_pool(max_connections=1, timeout=0.3)
    held = pool.get_connection()
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(100)])
    gevent.sleep(0)
    with pytest.raises(PoolTimeout):
        pool.get_connection()
    during = len(ticks)
    ticker.kill()
    assert during >= 10, during
    pool.release(held)


def test_timeout_zero_answers_without_yielding(make_pool):
    """timeout=0 on a full pool raises at once: no switch to the hub, no wait counted."""
    pool = make_pool(max_connections=1, timeout=0)
    held = pool.get_connection()
    waits = pool.stats().waits
    switches = []
    old = greenlet.settrace(lambda event, args: switches.append(event))
    try:
        with pytest.raises(PoolTimeout):
            pool.get_connection()
    finally:
        greenlet.settrace(old)
    assert switches == [] and pool.stats().waits == waits
    pool.release(held)


def test_max_waiters_bounds_the_queue(make_pool):
    """One caller more than max_waiters gets TooManyWaiters at once, naming the limits."""
    pool = make_pool(max_connections=1, timeout=5, max_waiters=1, name="q")
    held = pool.get_connection()
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    with pytest.raises(
        TooManyWaiters,
        match=r"pool 'q' already has 1 callers waiting \(max_waiters=1, max_connections=1\)",
    ):
        pool.get_connection()
    pool.release(held)
    assert waiter.get(timeout=2) is held
    pool.release(held)
    check_invariants(pool)


def test_hand_off_that_races_the_timer_loses_no_slot(make_pool):
    """A release in the same turn of the loop as the waiter's timer: the waiter gets it."""
    pool = make_pool(max_connections=1, timeout=0.05)
    held = pool.get_connection()
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    real_sleep(0.1)  # the timer is due, but the loop has not run it yet
    pool.release(held)  # the hand-off, in the same turn
    assert waiter.get(timeout=2) is held
    pool.release(held)
    assert pool.stats().in_use == 0 and pool.stats().timeouts == 0
    check_invariants(pool)


def test_released_connection_goes_to_the_oldest_waiter(make_pool):
    """Waiters are served in arrival order, and a re-asking releaser queues last."""
    pool = make_pool(max_connections=1, timeout=5)
    conn = pool.get_connection()
    order = []

    def want(tag: str) -> None:
        c = pool.get_connection()
        order.append(tag)
        gevent.sleep(0.001)
        pool.release(c)

    waiters = [gevent.spawn(want, f"w{i}") for i in range(5)]
    gevent.sleep(0)
    pool.release(conn)
    want("releaser")  # this greenlet asks again right after releasing
    gevent.joinall(waiters, timeout=5)
    assert order == ["w0", "w1", "w2", "w3", "w4", "releaser"]


def _busy_loop_scenario(pool, client) -> dict:
    """One greenlet loops commands; three others each want one command."""
    stop = []
    results = {"busy": 0, "served": 0, "timeouts": 0}

    def busy() -> None:
        while not stop:
            client.incr("busy")
            results["busy"] += 1

    def once() -> None:
        try:
            client.get("x")
            results["served"] += 1
        except PoolTimeout:
            results["timeouts"] += 1
        except redis.ConnectionError as exc:  # redis-py's pool raises its own
            if "No connection available" not in str(exc):
                raise
            results["timeouts"] += 1

    looper = gevent.spawn(busy)
    gevent.sleep(0.01)
    waiters = [gevent.spawn(once) for _ in range(3)]
    gevent.joinall(waiters, timeout=5)
    stop.append(True)
    looper.join(timeout=5)
    return results


@pytest.mark.timing
def test_busy_loop_does_not_starve_waiters(make_pool, redis_server):
    """max_connections=1 and a greenlet looping commands: no waiter times out.

    The same scenario on redis.BlockingConnectionPool starves the waiters
    (the comparison documents the claim; it is the reason greenpool exists).
    """
    pool = make_pool(max_connections=1, timeout=0.5)
    ours = _busy_loop_scenario(pool, redis.Redis(connection_pool=pool))
    assert ours["timeouts"] == 0 and ours["served"] == 3

    theirs_pool = redis.BlockingConnectionPool(
        host=redis_server.host, port=redis_server.port, max_connections=1, timeout=0.5
    )
    try:
        theirs = _busy_loop_scenario(theirs_pool, redis.Redis(connection_pool=theirs_pool))
    finally:
        theirs_pool.disconnect()
    assert theirs["timeouts"] >= 1, theirs


def test_never_more_than_max_connections(make_pool, redis_server, server_clients):
    """Under many interleavings the pool and the server never see more than max_connections."""
    pool = make_pool(max_connections=4, timeout=5)
    client = redis.Redis(connection_pool=pool)
    watcher = watch_invariants(pool)
    peak = [0]

    def work(i: int) -> None:
        for j in range(10):
            client.set(f"k{i}", j)
            peak[0] = max(peak[0], pool.stats().size)
            gevent.sleep(0.0005 * (i % 3))

    gevent.joinall([gevent.spawn(work, i) for i in range(60)], timeout=20)
    stop_watching(watcher)
    assert peak[0] <= 4
    assert server_clients(redis_server) <= 4


def test_spike_opens_far_fewer_connections_than_callers(make_pool, redis_server):
    """50 simultaneous short commands on 5 warm connections do not open 45 more."""
    pool = make_pool(max_connections=50, timeout=5)
    client = redis.Redis(connection_pool=pool)
    warm = [pool.get_connection() for _ in range(5)]
    for conn in warm:
        pool.release(conn)
    assert pool.stats().size == 5
    start = time.monotonic()
    gevent.joinall([gevent.spawn(client.incr, "spike") for _ in range(50)], timeout=10)
    elapsed = time.monotonic() - start
    assert client.get("spike") == b"50"
    stats = pool.stats()
    assert stats.size <= 15, stats
    assert elapsed < 2
    check_invariants(pool)
