"""The dialer's own duties (greenpool._dial), each pinned: sockets a cut-short
connect leaves behind are found and closed; a failed dial is logged, not
raised in its greenlet; a killed one re-raises its kill."""

from __future__ import annotations

import logging
import re
import socket

import gevent
import pytest
import redis

from greenpool import _dial, _redispy


def test_sockets_in_finds_the_locals_of_a_suspended_greenlet() -> None:
    opened = []

    def connecting() -> None:
        sock = socket.socket()
        opened.append(sock)
        gevent.sleep(5)

    greenlet = gevent.spawn(connecting)
    gevent.sleep(0)
    try:
        assert opened[0] in _dial._sockets_in(greenlet.gr_frame)
    finally:
        greenlet.kill()
        opened[0].close()


def test_close_sockets_in_follows_the_context_chain_and_stops_on_a_cycle() -> None:
    def fail_holding(sock: socket.socket) -> None:
        raise RuntimeError("cut short")

    first, second = socket.socket(), socket.socket()
    errors = []
    for sock in (first, second):
        try:
            fail_holding(sock)
        except RuntimeError as exc:
            errors.append(exc)
    errors[0].__context__ = errors[1]
    errors[1].__context__ = errors[0]  # a cycle: the walk must end
    with gevent.Timeout(5):
        _dial.close_sockets_in(errors[0])
    assert first.fileno() == -1 and second.fileno() == -1


def test_a_failed_dial_is_logged_and_not_raised_in_its_greenlet(make_pool, monkeypatch, caplog):
    crashed = []
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "handle_error", lambda *args: crashed.append(args))
    pool = make_pool(max_connections=1, timeout=1, port=1, socket_connect_timeout=1)
    with caplog.at_level(logging.DEBUG, logger="greenpool"):
        with pytest.raises(redis.exceptions.ConnectionError):
            pool.get_connection()
        gevent.sleep(0.05)
    assert "failed to open a connection" in caplog.text
    assert not crashed, crashed


def test_a_killed_dial_reraises_its_kill_and_logs_no_failure(make_pool, tcp_proxy, caplog):
    tcp_proxy.first_reply_delay = 2
    pool = make_pool(max_connections=1, timeout=5, port=tcp_proxy.port, client_name="slow")
    caller = gevent.spawn(pool.get_connection)
    gevent.sleep(0.2)
    (record,) = pool._dialer._in_flight.values()
    with caplog.at_level(logging.DEBUG, logger="greenpool"):
        record.greenlet.kill()
    assert isinstance(record.greenlet.value, gevent.GreenletExit)
    assert "failed to open a connection" not in caplog.text
    conn = caller.get(timeout=5)  # a new dial serves the caller
    pool.release(conn)


def test_a_finished_dial_leaves_no_record(make_pool):
    pool = make_pool(max_connections=3, timeout=2)
    held = [pool.get_connection() for _ in range(3)]
    gevent.sleep(0.01)  # the dial greenlets' links run
    assert pool._dialer._in_flight == {}
    for conn in held:
        pool.release(conn)


def test_one_hung_handshake_does_not_stop_the_pool_growing(make_pool, tcp_proxy):
    """max_connections=8, 6 callers at once, the first dial's handshake hangs
    (its reply held 3 s): more dials start beside it, every caller is served
    within its 1 s timeout, and the bound holds."""
    tcp_proxy.first_reply_delay = 3.0
    pool = make_pool(max_connections=8, timeout=1, port=tcp_proxy.port, client_name="hung",
                     socket_connect_timeout=5)
    r = redis.Redis(connection_pool=pool)
    first = gevent.spawn(r.ping)
    gevent.sleep(0.05)  # the first dial is in its handshake; later connections are quick
    tcp_proxy.first_reply_delay = 0.0
    callers = [gevent.spawn(r.incr, "dial:n") for _ in range(5)]
    gevent.joinall(callers, raise_error=True, timeout=5)
    assert int(r.get("dial:n")) == 5
    assert pool.stats().size <= 8
    first.join(timeout=5)
    assert first.successful(), first.exception


def test_quick_dials_still_damp_a_spike(make_pool):
    """50 simultaneous commands on 5 warm connections open only a few more."""
    pool = make_pool(max_connections=50, timeout=5)
    r = redis.Redis(connection_pool=pool)
    held = [pool.get_connection() for _ in range(5)]
    for conn in held:
        pool.release(conn)
    gevent.joinall([gevent.spawn(r.incr, "dial:spike") for _ in range(50)], raise_error=True, timeout=10)
    assert pool.stats().size <= 10, pool.stats()


@pytest.mark.parametrize("socket_timeout", [None, 3.0], ids=["none", "3s"])
def test_a_dial_gives_the_socket_its_socket_timeout_back(make_pool, socket_timeout):
    """After the dial, whose steps wait at most for what remains of its budget,
    the live socket waits socket_timeout again, not the budget's leftover."""
    pool = make_pool(max_connections=1, timeout=2, socket_connect_timeout=1.5,
                     socket_timeout=socket_timeout)
    conn = pool.get_connection()
    try:
        (sock,) = _redispy.sockets_of(_redispy.raw_connection(conn))
        assert sock.gettimeout() == socket_timeout
        assert _redispy.raw_connection(conn)._greenpool_deadline is None
    finally:
        pool.release(conn)


UNPATCHED = """
    import socket, sys
    import gevent, redis
    from gevent import monkey
    from greenpool import BlockingConnectionPool, PoolTimeout, _redispy

    assert not monkey.is_module_patched("socket")
    listener = socket.socket()  # accepts into its backlog; never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    with BlockingConnectionPool(host="127.0.0.1", port=listener.getsockname()[1],
                                socket_connect_timeout=0.5, socket_timeout=None) as pool:
        try:
            pool.get_connection()
        except redis.exceptions.TimeoutError as exc:
            print("silent:", exc)

    with BlockingConnectionPool(host="127.0.0.1", port={port}, max_connections=1, timeout=0.2,
                                socket_connect_timeout=0.5, socket_timeout=None) as pool:
        conn = pool.get_connection()
        (sock,) = _redispy.sockets_of(_redispy.raw_connection(conn))
        print("socket:", type(sock).__module__, sock.gettimeout())
        try:
            pool.get_connection()
        except PoolTimeout as exc:
            print("busy:", type(exc).__name__)
        pool.release(conn)
        with gevent.Timeout(0.05):
            print("blpop:", redis.Redis(connection_pool=pool).blpop(["unpatched:none"], 0.5))
"""


def test_an_unpatched_pool_bounds_its_dial_and_nothing_else(redis_server, subprocess_python):
    """In a program gevent has not patched (blocking sockets): socket_connect_timeout
    still bounds a dial to a server that never answers, with socket_timeout none
    (the pool's gevent.Timeout cannot fire there); the live socket then has
    socket_timeout; the pool's own wait still ends in PoolTimeout; a
    gevent.Timeout around a command cannot cut a blocking read short."""
    if redis.__version__.startswith("4."):
        pytest.skip("redis-py 4.6 sends no handshake command on a plain connection: "
                    "the silent server is seen at the first command")
    result = subprocess_python(UNPATCHED.replace("{port}", str(redis_server.port)), timeout=20)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"silent: pool 'greenpool-\d+' could not open a connection to "
                        r"127\.0\.0\.1:\d+/0 within 0\.50 s \(socket_connect_timeout\)", lines[0])
    assert lines[1:] == ["socket: socket None", "busy: PoolTimeout", "blpop: None"]


def test_a_dial_out_of_time_between_retries_reports_the_failed_attempt(make_pool):
    """Cut short while redis-py backs off after a refused connect, the dial
    raises redis-py's ConnectionError with that refusal, as redis-py's pools
    do after their retries (not a TimeoutError: nothing timed out)."""
    if redis.__version__.startswith("4."):
        pytest.skip("redis-py 4.6 does not retry a refused connect")
    from redis.backoff import ConstantBackoff
    from redis.retry import Retry

    from greenpool._server import free_port

    pool = make_pool(max_connections=1, timeout=2, port=free_port(), socket_connect_timeout=0.2,
                     retry=Retry(ConstantBackoff(30), 3))
    with pytest.raises(redis.exceptions.ConnectionError, match=r"within 0\.20 s; the last attempt failed: .*refused") as info:
        pool.get_connection()
    assert not isinstance(info.value, redis.exceptions.TimeoutError)
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)


def test_a_dial_out_of_time_mid_attempt_is_a_timeout(make_pool, tcp_proxy):
    """Cut short in a handshake that never ends, the dial raises redis-py's
    TimeoutError naming socket_connect_timeout."""
    tcp_proxy.first_reply_delay = 5
    pool = make_pool(max_connections=1, timeout=2, port=tcp_proxy.port, socket_connect_timeout=0.2,
                     client_name="hung")
    with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.20 s \(socket_connect_timeout\)"):
        pool.get_connection()
