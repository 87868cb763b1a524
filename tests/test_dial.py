"""The dialer's own duties (greenpool._dial), each pinned: sockets a cut-short
connect leaves behind are found and closed; a failed dial is logged, not
raised in its greenlet; a killed one re-raises its kill."""

from __future__ import annotations

import logging
import socket

import gevent
import pytest
import redis

from greenpool import _dial


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
