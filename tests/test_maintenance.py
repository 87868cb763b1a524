"""Contract 8 and the leak part of 12: idle reaping, min_idle, lifetimes,
keepalive pings and leak reports, driven by a fake clock; and the
maintenance greenlet itself."""

from __future__ import annotations

import gc
import logging
import weakref

import gevent
import pytest
import redis
from pools import check_invariants

from greenpool import BlockingConnectionPool, maintenance


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def jump(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def quiet(pool: BlockingConnectionPool) -> BlockingConnectionPool:
    """Stop the pool's own maintenance greenlet: the test runs maintenance by hand."""
    pool.release(pool.get_connection())  # the first dial starts it
    pool._maintenance.stop()
    return pool


def settle(pool: BlockingConnectionPool) -> None:
    """Wait (boundedly) for the pool's dials to finish."""
    for _ in range(200):
        if not pool.stats().dialling:
            return
        gevent.sleep(0.005)
    raise AssertionError(f"dials did not finish: {pool!r}")


def test_idle_connections_beyond_min_idle_are_reaped(make_pool, clock):
    """After idle_timeout, idle connections close down to min_idle, stalest first."""
    pool = quiet(make_pool(max_connections=5, min_idle=1, idle_timeout=10, clock=clock))
    conns = [pool.get_connection() for _ in range(3)]
    for conn in conns:
        pool.release(conn)
        clock.jump(1)
    clock.jump(5)
    assert maintenance.run_once(pool).close_idle == []
    clock.jump(5)  # the first two released are now idle for >= 10 s
    decided = maintenance.run_once(pool)
    assert [s.conn for s in decided.close_idle] == conns[:2]
    stats = pool.stats()
    assert (stats.idle, stats.closed["idle"]) == (1, 2)
    clock.jump(100)
    maintenance.run_once(pool)
    assert pool.stats().idle == 1  # min_idle is kept however long it idles
    check_invariants(pool)


def test_min_idle_is_filled_in_the_background(make_pool, clock):
    """min_idle connections are dialled by maintenance, never above max_connections."""
    pool = quiet(make_pool(max_connections=4, min_idle=3, clock=clock))
    settle(pool)  # the greenlet's first run, at the first use, dialled two
    assert pool.stats().idle == 3 and pool.stats().created == 3
    held = [pool.get_connection() for _ in range(3)]
    assert maintenance.run_once(pool).dials == 1  # 3 idle wanted, room for 1
    settle(pool)
    held.append(pool.get_connection())
    assert maintenance.run_once(pool).dials == 0  # full: nothing to add
    for conn in held:
        pool.release(conn)
    check_invariants(pool)


def test_lifetime_has_negative_jitter_and_never_closes_in_use(make_pool, clock):
    """Connections expire within [0.9, 1.0] x max_lifetime, on release if in use."""
    pool = quiet(make_pool(max_connections=4, max_lifetime=100, clock=clock))
    held = [pool.get_connection() for _ in range(4)]
    slots = [pool._core.out[c] for c in held]
    lifetimes = [slot.expires_at - slot.created_at for slot in slots]
    assert all(90 <= life <= 100 for life in lifetimes)
    assert len(set(lifetimes)) > 1
    clock.jump(101)
    maintenance.run_once(pool)
    assert pool.stats().in_use == 4 and pool.stats().closed["expired"] == 0
    for conn in held:
        pool.release(conn)
    assert pool.stats().closed["expired"] == 4 and pool.stats().size == 0


def test_idle_expired_connections_are_closed_by_maintenance(make_pool, clock):
    """An idle connection past its lifetime is closed and replaced up to min_idle."""
    pool = quiet(make_pool(max_connections=2, min_idle=1, max_lifetime=50, clock=clock))
    clock.jump(51)
    decided = maintenance.run_once(pool)
    assert len(decided.close_expired) == 1 and decided.dials == 1
    settle(pool)
    assert pool.stats().idle == 1 and pool.stats().closed["expired"] == 1


def test_keepalive_ping_does_not_reset_the_idle_clock(make_pool, clock, redis_server):
    """Idle connections are PINGed each keepalive_ping_interval, and still reaped on time."""
    pool = quiet(
        make_pool(max_connections=2, idle_timeout=30, keepalive_ping_interval=10, clock=clock)
    )
    clock.jump(11)
    assert len(maintenance.run_once(pool).ping) == 1
    assert pool.stats().pings == 1 and pool.stats().idle == 1
    clock.jump(5)
    assert maintenance.run_once(pool).ping == []  # pinged 5 s ago
    clock.jump(15)  # idle 31 s in all
    assert len(maintenance.run_once(pool).close_idle) == 1


def test_leak_is_reported_once_with_both_stacks(make_pool, clock, caplog):
    """A connection held past the threshold is logged once with where it was taken."""
    pool = quiet(make_pool(max_connections=2, leak_detection_threshold=5, clock=clock))

    def holder():
        return pool.get_connection()

    conn = holder()
    clock.jump(6)
    with caplog.at_level(logging.WARNING, logger="greenpool"):
        maintenance.run_once(pool)
        maintenance.run_once(pool)
    reports = [r for r in caplog.records if "held for" in r.getMessage()]
    assert len(reports) == 1
    text = reports[0].getMessage()
    assert "held for 6.0 s" in text and "in holder" in text and "holder is now at" in text
    assert pool.stats().leaks == 1
    pool.release(conn)


def test_maintenance_greenlet_starts_on_first_use_and_is_named(redis_server):
    """Not at construction: at the first dial, named after the pool."""
    pool = BlockingConnectionPool(host=redis_server.host, port=redis_server.port, name="m")
    assert pool._maintenance is None
    redis.Redis(connection_pool=pool).ping()
    assert pool._maintenance.greenlet.name == "m-maintenance"
    pool.close()


def test_maintenance_holds_the_pool_by_weakref(redis_server):
    """A forgotten pool is collected and its maintenance greenlet ends."""
    pool = BlockingConnectionPool(host=redis_server.host, port=redis_server.port, idle_timeout=0.2)
    redis.Redis(connection_pool=pool).ping()
    greenlet = pool._maintenance.greenlet
    ref = weakref.ref(pool)
    gevent.sleep(0)  # let the finished dial's link callback run: it holds the pool
    del pool
    gc.collect()
    assert ref() is None
    greenlet.join(timeout=2)  # wakes within one period (0.05 s) and sees no pool
    assert greenlet.dead


def test_maintenance_survives_errors_but_not_kill(make_pool, monkeypatch, caplog):
    """An Exception in a run is logged and the loop goes on; kill() stops it."""
    pool = make_pool(max_connections=1, idle_timeout=0.2)
    calls = []

    def failing(pool, now=None):
        calls.append(now)
        raise RuntimeError("boom")

    monkeypatch.setattr(maintenance, "run_once", failing)
    with caplog.at_level(logging.ERROR, logger="greenpool"):
        pool.release(pool.get_connection())
        greenlet = pool._maintenance.greenlet
        gevent.sleep(0.2)
    assert len(calls) >= 2 and "maintenance run failed" in caplog.text
    greenlet.kill()
    assert greenlet.dead


def test_close_stops_maintenance_at_once(make_pool):
    """close() wakes the sleeping greenlet, which exits without waiting out its period."""
    pool = make_pool(max_connections=1)  # default period: 30 s
    pool.release(pool.get_connection())
    greenlet = pool._maintenance.greenlet
    gevent.sleep(0)
    pool.close()
    greenlet.join(timeout=1)
    assert greenlet.dead


@pytest.mark.slow
def test_real_maintenance_greenlet_reaps_and_refills(make_pool, redis_server, server_clients):
    """End to end, real time: idle connections are reaped down to min_idle."""
    pool = make_pool(max_connections=4, min_idle=1, idle_timeout=0.3)
    held = [pool.get_connection() for _ in range(4)]
    for conn in held:
        pool.release(conn)
    for _ in range(60):
        if pool.stats().idle == 1:
            break
        gevent.sleep(0.05)
    stats = pool.stats()
    assert stats.idle == 1 and stats.closed["idle"] == 3
    for _ in range(40):
        if server_clients(redis_server) == 1:
            break
        gevent.sleep(0.05)
    assert server_clients(redis_server) == 1


def test_idle_clock_starts_at_last_use(make_pool, clock):
    """A connection opened long ago but used recently is not reaped."""
    pool = quiet(make_pool(max_connections=2, idle_timeout=10, clock=clock))
    clock.jump(8)
    pool.release(pool.get_connection())  # used at t+8
    clock.jump(5)  # idle 5 s, 13 s old
    assert maintenance.run_once(pool).close_idle == []


def test_expired_idle_connection_is_replaced_at_checkout(make_pool, clock):
    """Past max_lifetime an idle connection is replaced at checkout, even before maintenance runs."""
    pool = quiet(make_pool(max_connections=1, max_lifetime=100, clock=clock))
    first = pool.get_connection()
    pool.release(first)
    clock.jump(101)
    second = pool.get_connection()
    assert second is not first and pool.stats().closed["expired"] == 1
    pool.release(second)


def test_maintenance_killed_mid_ping_gives_the_slot_back(make_pool, clock, tcp_proxy):
    """Killing the greenlet while its keepalive PING waits for a reply loses no slot."""
    pool = quiet(
        make_pool(
            max_connections=1, timeout=0.3, keepalive_ping_interval=10, clock=clock, port=tcp_proxy.port
        )
    )
    clock.jump(11)
    tcp_proxy.blackhole()  # the PING's reply never comes
    pinger = gevent.spawn(maintenance.run_once, pool)
    gevent.sleep(0.05)
    assert pool.stats().in_use == 1  # lent to the pinger
    pinger.kill()
    tcp_proxy.restore()
    assert pool.stats().in_use == 0 and pool.stats().size == 0, repr(pool)
    check_invariants(pool)


def test_keepalive_ping_to_a_silent_peer_is_bounded(make_pool, clock, tcp_proxy, monkeypatch):
    """A PING that gets no reply gives up after its own bound and closes the connection."""
    monkeypatch.setattr(maintenance, "_PING_TIMEOUT", 0.1)
    pool = quiet(make_pool(max_connections=1, keepalive_ping_interval=10, clock=clock, port=tcp_proxy.port))
    clock.jump(11)
    tcp_proxy.blackhole()
    with gevent.Timeout(2):
        maintenance.run_once(pool)
    stats = pool.stats()
    assert (stats.in_use, stats.size, stats.closed["broken"], stats.pings) == (0, 0, 1, 1)
