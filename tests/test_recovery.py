"""Contract 9 and the recovery cases: TCP keepalive read back from live
sockets, a server killed and restarted under load, a server that closes idle
connections, and a network path that silently stops forwarding."""

from __future__ import annotations

import json
import sys
import time

import gevent
import pytest
import redis
from pools import check_invariants
from redis.backoff import NoBackoff
from redis.retry import Retry
from test_killsafe import checkout_all

from greenpool import BlockingConnectionPool
from greenpool.keepalive import read_options, supported_options

NO_RETRY = Retry(NoBackoff(), 0)


def live_options(pool: BlockingConnectionPool) -> dict:
    conn = pool.get_connection()
    try:
        return read_options(conn._sock)
    finally:
        pool.release(conn)


def test_keepalive_defaults_are_applied_on_the_live_socket(make_pool):
    """Keepalive is on by default with idle 30 s, interval 5 s and 3 probes, on any redis-py."""
    options = live_options(make_pool(max_connections=1))
    assert options["socket_keepalive"] is True
    if {"idle", "interval", "count"} <= supported_options():
        assert (options["keepalive_idle"], options["keepalive_interval"], options["keepalive_count"]) == (
            30,
            5,
            3,
        )


def test_keepalive_options_and_user_timeout_are_applied(make_pool):
    """Portable option names reach TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT and TCP_USER_TIMEOUT."""
    if not {"idle", "interval", "count", "user_timeout"} <= supported_options():
        pytest.skip("this platform lacks one of the TCP keepalive options")
    pool = make_pool(
        max_connections=1, keepalive_idle=7, keepalive_interval=2, keepalive_count=4, tcp_user_timeout=1.5
    )
    options = live_options(pool)
    assert options == {
        "socket_keepalive": True,
        "keepalive_idle": 7,
        "keepalive_interval": 2,
        "keepalive_count": 4,
        "tcp_user_timeout": 1.5,
    }


def test_keepalive_can_be_turned_off(make_pool):
    """socket_keepalive=False leaves SO_KEEPALIVE off."""
    assert live_options(make_pool(max_connections=1, socket_keepalive=False))["socket_keepalive"] is False


PLAIN_SOCKETS = """
import json, redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from greenpool import BlockingConnectionPool
from greenpool.keepalive import read_options
pool = BlockingConnectionPool(max_connections=1, host="127.0.0.1", port={port}, keepalive_idle=9)
conn = pool.get_connection()
print(json.dumps([type(conn._sock).__module__, read_options(conn._sock)]))
pool.release(conn)
"""


def test_keepalive_on_plain_unpatched_sockets(subprocess_python, redis_server):
    """Without monkey-patching the same options land on the stdlib socket."""
    result = subprocess_python(PLAIN_SOCKETS.format(port=redis_server.port))
    assert result.returncode == 0, result.stderr
    module, options = json.loads(result.stdout)
    assert module == "socket" and options["socket_keepalive"] is True
    if sys.platform.startswith("linux"):
        assert options["keepalive_idle"] == 9


@pytest.mark.slow
@pytest.mark.timing
def test_server_killed_and_restarted_under_load(fresh_redis_server):
    """Callers get errors during the outage, never hang, and all succeed within a second of the restart."""
    server = fresh_redis_server
    pool = BlockingConnectionPool(
        max_connections=4, timeout=1, host=server.host, port=server.port, socket_connect_timeout=0.3, socket_timeout=1
    )
    client = redis.Redis(connection_pool=pool)
    outcomes: list = []  # (finished_at, ok, duration)
    stop = []

    def worker() -> None:
        for _ in range(400):
            if stop:
                return
            start = time.monotonic()
            try:
                client.incr("n")
                outcomes.append((time.monotonic(), True, time.monotonic() - start))
            except redis.RedisError:
                outcomes.append((time.monotonic(), False, time.monotonic() - start))
                gevent.sleep(0.02)
            gevent.sleep(0.005)

    workers = [gevent.spawn(worker) for _ in range(20)]
    gevent.sleep(0.3)
    server.kill()
    gevent.sleep(0.5)
    server.restart()
    restarted = time.monotonic()
    gevent.sleep(1.5)
    stop.append(True)
    gevent.joinall(workers, timeout=5)
    assert all(w.dead for w in workers)
    failures = [o for o in outcomes if not o[1]]
    assert failures, "the outage was not noticed"
    # No call hangs: each ends within the pool timeout plus connect/read timeouts and retries.
    assert max(o[2] for o in outcomes) < 5
    after = [o for o in outcomes if o[0] > restarted + 1.0]
    assert after and all(ok for _, ok, _ in after), "still failing a second after the restart"
    assert pool.stats().in_use == 0 and pool.stats().waiting == 0
    checkout_all(pool)
    pool.close()


@pytest.mark.slow
def test_server_closing_idle_connections_is_invisible_to_callers(make_pool, redis_server):
    """With the server's `timeout 1`, connections idle past it are replaced before use."""
    admin = redis.Redis(host=redis_server.host, port=redis_server.port)
    admin.config_set("timeout", 1)
    try:
        # No redis-py retries: they would hide a dead connection handed out.
        pool = make_pool(max_connections=3, timeout=1, retry=NO_RETRY)
        client = redis.Redis(connection_pool=pool)
        held = [pool.get_connection() for _ in range(3)]
        for conn in held:
            pool.release(conn)
        gevent.sleep(2.5)  # the server's idle sweep closes them
        results = [gevent.spawn(client.incr, "n") for _ in range(3)]
        gevent.joinall(results, raise_error=True, timeout=5)
        assert client.get("n") == b"3"
        # The hub's idle watch saw each close as it happened.
        assert pool.stats().closed["server_closed"] == 3
    finally:
        admin.config_set("timeout", 0)


def test_blackholed_path_is_detected_and_recovered(tcp_proxy):
    """A path that silently stops forwarding times out within socket_timeout; restore recovers."""
    pool = BlockingConnectionPool(
        max_connections=2, timeout=1, host="127.0.0.1", port=tcp_proxy.port, socket_timeout=0.3, retry=NO_RETRY
    )
    client = redis.Redis(connection_pool=pool)
    client.set("k", "v")
    tcp_proxy.blackhole()
    start = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError):
        client.get("k")
    assert time.monotonic() - start < 3
    assert pool.stats().closed["broken"] == 1  # the timed-out connection is not reused
    tcp_proxy.restore()
    assert client.get("k") == b"v"
    assert pool.stats().in_use == 0
    check_invariants(pool)
    pool.close()


def test_health_check_interval_pings_before_using_an_older_connection(make_pool, redis_server):
    """With health_check_interval set, redis-py PINGs a connection idle longer than it."""
    admin = redis.Redis(host=redis_server.host, port=redis_server.port)
    pool = make_pool(max_connections=1, health_check_interval=0.05)
    client = redis.Redis(connection_pool=pool)
    client.get("k")
    admin.config_resetstat()
    client.get("k")  # used a moment ago: no PING
    gevent.sleep(0.2)
    client.get("k")  # idle past the interval: PING first
    assert admin.info("commandstats").get("cmdstat_ping", {}).get("calls") == 1


def test_keepalive_options_are_applied_again_on_reconnect(make_pool, redis_server):
    """A connection redis-py re-opens (after the server dropped it) gets the options again."""
    if "idle" not in supported_options():
        pytest.skip("this platform cannot set the keepalive idle time")
    pool = make_pool(max_connections=1, keepalive_idle=11)
    conn = pool.get_connection()
    first = conn._sock
    conn.disconnect()  # as redis-py does after an error; the next command reconnects
    conn.send_command("PING")
    assert conn.read_response() in (b"PONG", "PONG")
    assert conn._sock is not first and read_options(conn._sock)["keepalive_idle"] == 11
    pool.release(conn)
