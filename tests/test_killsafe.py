"""Contract 5: kills, timeouts and errors at any point never lose a slot
and never return a connection with an unread reply."""

from __future__ import annotations

import gc
import random
import time

import gevent
import pytest
import redis
from gevent.event import Event
from pools import check_invariants, stop_watching, watch_invariants

from greenpool import BlockingConnectionPool


def checkout_all(pool: BlockingConnectionPool) -> None:
    """Check out every slot, prove each connection clean with PING, give them back."""
    conns = [pool.get_connection() for _ in range(pool.max_connections)]
    try:
        for conn in conns:
            conn.send_command("ECHO", "clean")
            assert conn.read_response() == b"clean"
        assert pool.stats().in_use == pool.max_connections
    finally:
        for conn in conns:
            pool.release(conn)
    check_invariants(pool)


def test_kill_while_waiting_frees_nothing_and_loses_nothing(make_pool):
    """A waiter killed in the queue leaves it; the slot count is intact."""
    pool = make_pool(max_connections=1, timeout=5)
    held = pool.get_connection()
    waiter = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    assert pool.stats().waiting == 1
    waiter.kill()
    assert pool.stats().waiting == 0
    pool.release(held)
    checkout_all(pool)


def test_kill_at_the_instant_of_hand_off_passes_the_connection_on(make_pool):
    """A connection handed to a waiter that is killed before it runs goes to the next waiter."""
    pool = make_pool(max_connections=1, timeout=5)
    held = pool.get_connection()
    first = gevent.spawn(pool.get_connection)
    second = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    assert pool.stats().waiting == 2
    first.kill(block=False)  # scheduled: lands before the hand-off below wakes it
    pool.release(held)  # handed to `first`, which has not run yet
    assert pool.stats().in_use == 1 and pool.stats().waiting == 1
    conn = second.get(timeout=2)
    assert first.dead and isinstance(first.value, gevent.GreenletExit)
    assert pool.stats().in_use == 1
    pool.release(conn)
    checkout_all(pool)


def test_gevent_timeout_while_waiting_is_not_swallowed(make_pool):
    """A caller's own gevent.Timeout propagates and the queue forgets the caller."""
    pool = make_pool(max_connections=1, timeout=5)
    held = pool.get_connection()
    with pytest.raises(gevent.Timeout):
        with gevent.Timeout(0.05):
            pool.get_connection()
    assert pool.stats().waiting == 0
    pool.release(held)
    checkout_all(pool)


def test_kill_mid_command_closes_the_connection(make_pool, redis_server):
    """A greenlet killed while its reply is outstanding never returns a dirty connection."""
    pool = make_pool(max_connections=1, timeout=5)
    client = redis.Redis(connection_pool=pool)
    started = Event()

    def blocked() -> None:
        started.set()
        client.blpop("never-pushed", timeout=5)

    glet = gevent.spawn(blocked)
    started.wait()
    gevent.sleep(0.05)
    glet.kill()
    client.rpush("never-pushed", "late")  # the killed BLPOP must not take it
    assert client.lrange("never-pushed", 0, -1) == [b"late"]
    assert client.echo("mine") == b"mine"
    checkout_all(pool)


def test_failed_dial_gives_the_slot_back_and_tells_the_caller():
    """Connection refused, an unknown host and a bad password each free their slot."""
    from greenpool._server import free_port

    pool = BlockingConnectionPool(max_connections=2, timeout=2, host="127.0.0.1", port=free_port())
    for _ in range(3):  # more attempts than slots: each failure freed its slot
        with pytest.raises(redis.ConnectionError, match="refused|Connection"):
            pool.get_connection()
    assert pool.stats().size == 0 and pool.stats().dial_errors == 3
    pool.close()
    pool = BlockingConnectionPool(max_connections=1, timeout=2, host="no-such-host.invalid")
    for _ in range(2):
        with pytest.raises(redis.ConnectionError):
            pool.get_connection()
    assert pool.stats().size == 0
    pool.close()


def test_bad_option_frees_the_slot(make_pool):
    """A handshake that fails while dialling (SELECT of a missing db) frees the slot."""
    pool = make_pool(max_connections=1, timeout=2, db=999)
    for _ in range(2):
        with pytest.raises(redis.exceptions.RedisError, match="Invalid Database|DB index"):
            pool.get_connection()
    assert pool.stats().size == 0


def test_caller_killed_during_dial_leaves_no_orphan_socket(make_pool, redis_server, server_clients):
    """The dial outlives a caller killed during connect and lands in the idle set."""
    pool = make_pool(max_connections=3, timeout=5)
    callers = [gevent.spawn(pool.get_connection) for _ in range(3)]
    gevent.sleep(0)  # all three wait; one dial is in flight
    assert pool.stats().dialling == 1
    gevent.killall(callers)
    deadline = 50
    while pool.stats().dialling and deadline:
        gevent.sleep(0.01)
        deadline -= 1
    stats = pool.stats()
    assert stats.dialling == 0 and stats.in_use == 0
    assert stats.idle == stats.created == server_clients(redis_server)
    checkout_all(pool)


@pytest.mark.slow
def test_chaos_kills_and_timeouts_never_cross_replies(make_pool):
    """Hundreds of ECHOs under random kills and tiny timeouts: every reply is the caller's own."""
    pool = make_pool(max_connections=5, timeout=10)
    client = redis.Redis(connection_pool=pool)
    rng = random.Random(1234)
    wrong = []
    ok = []
    watcher = watch_invariants(pool)

    def echo(i: int) -> None:
        for j in range(20):
            token = f"{i}-{j}-{rng.random()}"
            try:
                if rng.random() < 0.3:
                    with gevent.Timeout(rng.choice([0.0001, 0.0005, 0.002]), False):
                        reply = client.echo(token)
                        (ok if reply == token.encode() else wrong).append(reply)
                else:
                    reply = client.echo(token)
                    (ok if reply == token.encode() else wrong).append(reply)
            except redis.ConnectionError:
                pass

    workers = [gevent.spawn(echo, i) for i in range(300)]
    for _ in range(200):
        gevent.sleep(rng.random() * 0.002)
        victim = rng.choice(workers)
        victim.kill(block=False)
    gevent.joinall(workers, timeout=20)
    assert all(w.dead for w in workers)
    stop_watching(watcher)
    assert not wrong, f"{len(wrong)} replies went to the wrong caller"
    assert len(ok) > 1000
    assert pool.stats().in_use == 0 and pool.stats().waiting == 0
    checkout_all(pool)


def dial_greenlets(pool: BlockingConnectionPool) -> list:
    """The pool's dial greenlets still alive (they are named after the pool)."""
    name = f"{pool.name}-dial"
    return [g for g in gc.get_objects() if isinstance(g, gevent.Greenlet) and g.name == name and not g.dead]


def test_dial_killed_before_it_ran_frees_its_slot(make_pool):
    """A dial greenlet killed before it ever ran (gevent.killall at shutdown) frees its slot."""
    pool = make_pool(max_connections=1, timeout=1)
    pool._core.fill(1)  # what min_idle maintenance asks for; no yield since
    pool._act()
    dials = dial_greenlets(pool)
    assert len(dials) == 1 and dials[0].gr_frame is None  # scheduled, never ran
    gevent.killall(dials)
    gevent.sleep(0)  # the greenlet's links run in the next turn of the loop
    assert pool.stats().dialling == 0 and pool.stats().size == 0, repr(pool)
    checkout_all(pool)


def test_dial_killed_inside_connect_frees_its_slot(make_pool):
    """A dial killed while it connects frees its slot and leaves no socket behind."""
    pool = make_pool(max_connections=1, timeout=1)
    caller = gevent.spawn(pool.get_connection)
    dials = []
    for _ in range(10):  # the caller waits; its dial starts and blocks in connect()
        gevent.sleep(0)
        dials = dial_greenlets(pool)
        if dials and dials[0].gr_frame is not None:
            break
    assert len(dials) == 1 and dials[0].gr_frame is not None and pool.stats().dialling == 1
    gevent.killall(dials)
    caller.kill()
    # The waiting caller made the pool start another dial before it left:
    # that one lands in the idle set.
    for _ in range(100):
        if not pool.stats().dialling:
            break
        gevent.sleep(0.01)
    stats = pool.stats()
    assert stats.dialling == 0 and stats.in_use == 0 and stats.size == stats.idle <= 1, repr(pool)
    checkout_all(pool)


def test_hung_dial_is_bounded_by_socket_connect_timeout(tcp_proxy):
    """A server that accepts but never answers holds the dial only socket_connect_timeout long."""
    # client_name makes every redis-py version wait for a reply in the
    # handshake (CLIENT SETNAME), which the silent server never sends.
    pool = BlockingConnectionPool(
        max_connections=2, timeout=2, host="127.0.0.1", port=tcp_proxy.port, socket_connect_timeout=0.3,
        client_name="gp",
    )
    tcp_proxy.blackhole()
    start = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.30 s \(socket_connect_timeout\)"):
        pool.get_connection()
    assert time.monotonic() - start < 1.5
    assert pool.stats().dialling == 0 and pool.stats().size == 0
    tcp_proxy.restore()
    conn = pool.get_connection()  # the path is back: the next dial succeeds
    pool.release(conn)
    checkout_all(pool)
    pool.close()


def test_timeout_zero_waits_no_longer_than_a_dial(tcp_proxy):
    """timeout=0 waits only for the dial it started, which socket_connect_timeout bounds."""
    pool = BlockingConnectionPool(
        max_connections=1, timeout=0, host="127.0.0.1", port=tcp_proxy.port, socket_connect_timeout=0.2,
        client_name="gp",
    )
    tcp_proxy.blackhole()
    caller = gevent.spawn(pool.get_connection)
    caller.join(timeout=2)
    assert caller.ready() and isinstance(caller.exception, redis.exceptions.TimeoutError)
    pool.close()


def test_waiter_outlives_a_killed_dial(make_pool):
    """When the dial a caller waits for is killed, another dial serves it (no GreenletExit)."""
    pool = make_pool(max_connections=1, timeout=5)
    caller = gevent.spawn(pool.get_connection)
    gevent.sleep(0)
    gevent.killall(dial_greenlets(pool))
    conn = caller.get(timeout=3)
    assert conn is not None and pool.stats().in_use == 1 and pool.stats().dial_errors == 0
    pool.release(conn)
    checkout_all(pool)
