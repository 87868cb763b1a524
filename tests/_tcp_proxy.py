"""A loopback TCP proxy that can misbehave like a broken network.

Used through the ``tcp_proxy`` fixtures in ``conftest.py``; it lives in its own
module so that conftest stays readable.
"""

from __future__ import annotations

import socket
import ssl
from typing import Optional

import gevent
import gevent.pool
from gevent.server import StreamServer

__all__ = ["TcpProxy"]

# Bounds on teardown: a proxy must never be what hangs a test run.
JOIN_TIMEOUT = 2.0


class TcpProxy:
    """Forward connections from a free ``127.0.0.1`` port to *target*.

    Each accepted connection gets its own upstream connection (a "pair") and
    two greenlets pumping bytes, one per direction. Closing either end of a
    pair closes the other, even while blackholed, so tests can watch
    :attr:`connections` to see a client give up a connection.

    :param target: the ``(host, port)`` to forward to.
    :param ssl_context: a server-side TLS context: the proxy then terminates
        TLS, like a TLS-offloading load balancer in front of a plain Redis
        (this machine's redis-server is built without TLS). A client whose
        handshake fails is disconnected and counted in :attr:`tls_failures`.
    """

    host = "127.0.0.1"

    def __init__(self, target: tuple[str, int], ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.target = target
        self.ssl_context = ssl_context
        self.tls_failures = 0
        self._blackholed = False
        self._silent_pairs: set[tuple[socket.socket, socket.socket]] = set()
        #: Seconds to hold the first reply of each new connection (the
        #: server's answer to the handshake): a slow network or server.
        self.first_reply_delay = 0.0
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        # One group holds the accept handlers and the pumps, so close() can
        # kill everything the proxy ever started.
        self._greenlets = gevent.pool.Pool()
        self._server = StreamServer((self.host, 0), self._handle, spawn=self._greenlets)
        self._server.start()
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        """A ``redis://`` (``rediss://`` with TLS) URL that goes through the proxy."""
        scheme = "redis" if self.ssl_context is None else "rediss"
        return f"{scheme}://{self.host}:{self.port}/0"

    @property
    def connections(self) -> int:
        """The number of live proxied connection pairs."""
        return len(self._pairs)

    def blackhole(self) -> None:
        """Silently discard all traffic, both ways, keeping sockets open.

        Like a dead load balancer: writes succeed, nothing ever arrives, and
        only a timeout notices. New connections are accepted and discarded too.
        """
        self._blackholed = True

    def blackhole_existing(self) -> None:
        """Silently discard the traffic of the connections open now, both ways,
        keeping them open; connections made later are forwarded.

        A half-open peer: the far end of those connections went away (a
        crashed host, a NAT that forgot the flow) without a FIN or RST.
        """
        self._silent_pairs.update(self._pairs)

    def restore(self) -> None:
        """Forward traffic again (bytes discarded meanwhile stay lost)."""
        self._blackholed = False
        self._silent_pairs.clear()

    def drop_all(self) -> None:
        """Close every proxied connection, client and server side."""
        for pair in list(self._pairs):
            self._close_pair(pair)

    def close(self) -> None:
        """Stop listening, drop every connection and stop all greenlets."""
        self._server.close()
        self.drop_all()
        self._greenlets.join(timeout=JOIN_TIMEOUT)
        self._greenlets.kill(timeout=JOIN_TIMEOUT)

    def __repr__(self) -> str:
        state = "blackholed" if self._blackholed else "forwarding"
        return (
            f"<TcpProxy {self.host}:{self.port} -> {self.target[0]}:{self.target[1]}"
            f" {state}, {self.connections} connections>"
        )

    def _handle(self, client: socket.socket, _address: object) -> None:
        if self.ssl_context is not None:
            try:
                client = self.ssl_context.wrap_socket(client, server_side=True)
            except (ssl.SSLError, OSError):
                self.tls_failures += 1
                client.close()
                return
        try:
            upstream = socket.create_connection(self.target, timeout=JOIN_TIMEOUT)
        except OSError:
            # The target is down: refuse by closing, as a proxy would.
            client.close()
            return
        upstream.settimeout(None)
        pair = (client, upstream)
        self._pairs.add(pair)
        back = self._greenlets.spawn(self._pump, upstream, client, pair, self.first_reply_delay)
        self._pump(client, upstream, pair)
        back.join(timeout=JOIN_TIMEOUT)

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        pair: tuple[socket.socket, socket.socket],
        first_delay: float = 0.0,
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if first_delay:
                    gevent.sleep(first_delay)
                    first_delay = 0.0
                if not (self._blackholed or pair in self._silent_pairs):
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            # Either side closing ends the pair, like a proxy in front of Redis.
            self._close_pair(pair)

    def _close_pair(self, pair: tuple[socket.socket, socket.socket]) -> None:
        self._pairs.discard(pair)
        self._silent_pairs.discard(pair)
        for sock in pair:
            # shutdown() first: it wakes the pump blocked in recv() on this
            # socket with a clean EOF, where close() alone would make gevent
            # raise "file descriptor closed in another greenlet" there.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
