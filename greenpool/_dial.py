"""Opening connections: dials run in greenlets the pool owns.

A caller never connects in its own greenlet. When callers wait and the
pool may grow, the pool starts a dial; its connection goes to the oldest
waiter (or the idle set), so a caller that is killed or gives up leaves no
half-opened socket, and a connection released meanwhile serves a waiter
while the dial proceeds. Dials run one at a time while callers wait, which
damps a spike: the pool grows only as far as the load lasts.

:class:`DialMixin` is part of :class:`greenpool.BlockingConnectionPool`;
it works on the pool's state (see :mod:`greenpool.pool`).
"""

from __future__ import annotations

import functools
import logging
import random
import traceback
from typing import TYPE_CHECKING, Any, Callable, Deque, Optional, cast

import gevent
import gevent.socket
import redis
from gevent.monkey import get_original

from . import maintenance
from ._records import DialTicket, Queued, Slot
from .stats import Counters

__all__ = ["DialMixin", "DIAL_CONCURRENCY"]

logger = logging.getLogger("greenpool")

#: Dials in flight at once while callers wait. One at a time damps a spike:
#: connections released meanwhile serve the waiters, and the pool grows only
#: as far as the load lasts (HikariCP's single "connection adder" thread).
DIAL_CONCURRENCY = 1

# The socket classes a connect can leave behind: gevent's (which its
# SSLSocket extends; socket.socket once patched) and the standard library's.
_SOCKET_TYPES = (gevent.socket.socket, get_original("socket", "socket"))

#: Negative jitter on max_lifetime, as a fraction, so connections opened
#: together are not all replaced together.
_LIFETIME_JITTER = 0.1


def close_sockets_in(exc: BaseException) -> None:
    """Close the sockets a connect interrupted by *exc* left behind.

    redis-py closes its socket when the connect fails with ``OSError`` or a
    Redis error, and gevent's ``SSLSocket`` closes itself when its handshake
    fails with ``OSError``; a kill, a ``gevent.Timeout`` or any other
    exception in between skips both, and the socket (for TLS, the half-made
    ``SSLSocket``, which took over the file descriptor) is left to the
    garbage collector, kept open meanwhile by the exception's traceback.
    Only the frames on the stack when the connect was cut short are
    searched, so every socket found there was being opened by this dial or
    was in the middle of I/O for it (a Sentinel master lookup), and is
    unusable either way: cut off mid-reply. Closing twice is harmless.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            for value in list(frame.f_locals.values()):
                if isinstance(value, _SOCKET_TYPES):
                    try:
                        value.close()
                    except OSError:
                        pass
        exc = exc.__context__  # type: ignore[assignment]


class DialMixin:
    """Starting, finishing and accounting for the pool's dials."""

    # The pool's state this mixin works on (greenpool.pool sets it).
    name: str
    max_connections: int
    _closed: bool
    _dialling: int
    _dial_limit: int
    _dial_timeout: Optional[float]
    _max_lifetime: float
    _nwaiting: int
    _waiters: Deque[Queued]
    _generation: object
    _counters: Counters
    _last_dial_error: Optional[BaseException]
    _maintenance: Optional[maintenance.Maintenance]
    _clock: Callable[[], float]

    if TYPE_CHECKING:  # the pool's methods this mixin calls

        def _size(self) -> int: ...
        def _target(self) -> str: ...
        def make_connection(self) -> Any: ...
        def _put(self, slot: Slot, now: float) -> None: ...
        def _close_slot(self, slot: Slot, reason: str) -> None: ...

    def _grow(self) -> None:
        """Start a dial if callers wait that dials in flight will not serve."""
        while (
            self._nwaiting > self._dialling
            and self._dialling < self._dial_limit
            and self._size() < self.max_connections
            and not self._closed
        ):
            self._start_dial()

    def _start_dial(self) -> None:
        self._dialling += 1
        if self._maintenance is None:
            self._maintenance = maintenance.start(cast(Any, self))
        ticket = DialTicket(self._generation)
        dial = gevent.spawn(self._dial, ticket)
        dial.name = f"{self.name}-dial"
        # A dial killed before it ever ran (gevent.killall at shutdown) skips
        # _dial's own bookkeeping: this link gives its slot back.
        dial.rawlink(functools.partial(self._dial_ended, ticket))

    def _settle(self, ticket: DialTicket) -> bool:
        """Count a dial as finished, once; False if it belongs to a past generation."""
        if ticket.settled or ticket.generation is not self._generation:
            ticket.settled = True
            return False
        ticket.settled = True
        self._dialling -= 1
        return True

    def _dial_ended(self, ticket: DialTicket, _dial: Any) -> None:
        if self._settle(ticket):
            self._grow()

    def _dial(self, ticket: DialTicket) -> None:
        conn = None
        try:
            conn = self.make_connection()
            # Bound the whole dial, TCP connect, TLS and Redis handshakes,
            # redis-py's own retries included: a server that accepts but
            # never answers would otherwise hold the pool's only dial, and
            # with it all growth, for ever. The Timeout is a BaseException
            # until it leaves redis-py, so that no retry loop there takes it
            # for a failed attempt and starts another, unbounded one.
            with gevent.Timeout(self._dial_timeout) as timer:
                try:
                    conn.connect()
                except gevent.Timeout as exc:
                    if exc is not timer:
                        raise
                    # (Its sockets are closed below: __context__ keeps it.)
                    raise self._dial_timeout_error() from None
        except BaseException as exc:
            if conn is not None:
                conn.disconnect()  # a handshake cut short leaves its socket open
            close_sockets_in(exc)
            if self._settle(ticket):
                if isinstance(exc, Exception):  # a kill of the dial is no caller's error
                    self._counters.dial_errors += 1
                    self._last_dial_error = exc
                    logger.debug("pool %r failed to open a connection: %s", self.name, exc)
                    self._deliver_error(exc)
                self._grow()
            if not isinstance(exc, Exception):
                raise
            return
        if not self._settle(ticket):
            conn.disconnect()
            return
        self._counters.created += 1
        self._last_dial_error = None
        now = self._clock()
        expires_at = now + self._max_lifetime * (1 - _LIFETIME_JITTER * random.random())
        slot = Slot(conn, now, expires_at)
        if self._closed:
            self._close_slot(slot, "pool_closed")
            return
        self._put(slot, now)
        self._grow()

    def _dial_timeout_error(self) -> BaseException:
        return redis.exceptions.TimeoutError(
            f"pool {self.name!r} could not open a connection to {self._target()} within "
            f"{self._dial_timeout:.2f} s (socket_connect_timeout)"
        )

    def _deliver_error(self, exc: BaseException) -> None:
        # The oldest waiter learns why the pool could not grow, at once,
        # rather than waiting out its timeout.
        while self._waiters:
            entry = self._waiters.popleft()
            if not entry.cancelled:
                self._nwaiting -= 1
                entry.error = exc
                entry.wake()
                return
