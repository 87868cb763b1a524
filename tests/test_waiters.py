"""The wait queue: departed waiters cost nothing, and ``max_waiters`` counts
only callers waiting for a busy connection."""

from __future__ import annotations

import gc
import tracemalloc

import gevent
import pytest
from pools import check_invariants

from greenpool import PoolTimeout, TooManyWaiters


@pytest.mark.slow
def test_timed_out_waiters_are_not_retained(make_pool):
    """50,000 timed-out waits with every connection held retain under 1 MB,
    and the queue holds no entry of theirs for the next hand-off to walk."""
    pool = make_pool(max_connections=1, timeout=0.001)
    for _ in range(200):  # the first dial outlasts 1 ms; it lands idle
        try:
            held = pool.get_connection()
            break
        except PoolTimeout:
            gevent.sleep(0.01)
    timed_out_before = pool.stats().timeouts
    timeouts = [0]

    def caller() -> None:
        for _ in range(100):
            try:
                pool.get_connection()
            except PoolTimeout:
                timeouts[0] += 1

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        gevent.joinall([gevent.spawn(caller) for _ in range(500)], raise_error=True)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    retained = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert timeouts[0] == 50_000
    assert pool._core.waiting == 0 and len(pool._core.queue) == 0
    print(f"retained after 50,000 timed-out waits: {retained} bytes")
    assert retained < 1_000_000, f"{retained} bytes retained"
    assert pool.stats().timeouts - timed_out_before == 50_000
    check_invariants(pool)
    # The next hand-off goes straight to the one live waiter.
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    pool.release(held)
    assert waiter.get(timeout=2) is held
    pool.release(held)
    check_invariants(pool)


def test_max_waiters_zero_still_lends_free_and_openable_connections(make_pool):
    """max_waiters=0: nobody waits for a busy connection, but a caller the pool
    can open a connection for is served."""
    pool = make_pool(max_connections=2, timeout=5, max_waiters=0, name="z")
    first = pool.get_connection()  # cold pool: opened for this caller
    second = pool.get_connection()
    with pytest.raises(TooManyWaiters, match=r"pool 'z' already has 0 callers waiting"):
        pool.get_connection()  # both busy, none openable
    assert pool.stats().rejected == 1 and pool.stats().waits == 2
    pool.release(first)
    assert pool.get_connection() is first  # idle: lent, no wait
    pool.release(first)
    pool.release(second)
    check_invariants(pool)


def test_callers_the_pool_can_open_for_are_never_shed(make_pool):
    """max_connections=10, max_waiters=2: six simultaneous callers on a cold
    pool are all served (each can have a new connection)."""
    pool = make_pool(max_connections=10, timeout=5, max_waiters=2)
    callers = [gevent.spawn(pool.get_connection) for _ in range(6)]
    gevent.joinall(callers, timeout=5)
    assert [c.exception for c in callers] == [None] * 6
    assert pool.stats().rejected == 0 and pool.stats().in_use == 6
    for c in callers:
        pool.release(c.value)
    check_invariants(pool)


def test_max_waiters_counts_waiters_beyond_what_the_pool_can_open(make_pool):
    """With the pool full, max_waiters callers queue and the next is refused."""
    pool = make_pool(max_connections=1, timeout=5, max_waiters=2)
    held = pool.get_connection()
    waiters = [gevent.spawn(pool.get_connection) for _ in range(2)]
    gevent.sleep(0)
    assert pool.stats().waiting == 2
    with pytest.raises(TooManyWaiters):
        pool.get_connection()
    pool.release(held)
    assert waiters[0].get(timeout=2) is held
    pool.release(held)
    assert waiters[1].get(timeout=2) is held
    pool.release(held)
    check_invariants(pool)
