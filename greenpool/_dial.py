"""Opening connections: dials run in greenlets the pool owns.

A caller never connects in its own greenlet. The core decides when a dial
starts (a ``DIAL`` action with a ticket); the pool's :class:`Dialer` runs it
in a greenlet and reports the outcome to the core, which hands the new
connection to the oldest waiter or the idle set. So a caller that is killed
or gives up leaves no half-opened socket, and a connection released
meanwhile serves a waiter while the dial proceeds. The core runs dials one
at a time while callers wait, which damps a spike: the pool grows only as
far as the load lasts.

``socket_connect_timeout`` bounds the whole dial twice over: a
``gevent.Timeout`` around it, which can fire only while the dial waits on
gevent's cooperative sockets, and :class:`DialDeadline`, which gives each
step of the dial at most what remains of that budget as its socket timeout,
so that a dial on a plain blocking socket (a program gevent has not
patched, such as ``python -m greenpool check``) is bounded too.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from types import FrameType
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import gevent
import gevent.socket
import redis
from gevent.hub import get_hub
from gevent.monkey import get_original

from . import _redispy
from .core import DialTicket

if TYPE_CHECKING:  # pragma: no cover
    from .pool import BlockingConnectionPool

__all__ = ["Dialer", "DialDeadline", "DIAL_CONCURRENCY", "close_sockets_in"]

logger = logging.getLogger("greenpool")

#: Dials in flight at once while callers wait. One at a time damps a spike:
#: connections released meanwhile serve the waiters, and the pool grows only
#: as far as the load lasts (HikariCP's single "connection adder" thread).
DIAL_CONCURRENCY = 1

#: Seconds after which a dial still in flight counts as slow: while callers
#: wait beyond what the dials in flight will serve, another dial starts then,
#: and every SLOW_DIAL after, within the pool's room. So one hung handshake
#: (a stalled proxy, a dead node) cannot stop the pool from growing for the
#: whole socket_connect_timeout, and dials quicker than this still damp a
#: spike one at a time.
SLOW_DIAL = 0.1

# The socket classes a connect can leave behind: gevent's (which its
# SSLSocket extends; socket.socket once patched) and the standard library's.
_SOCKET_TYPES = (gevent.socket.socket, get_original("socket", "socket"))


def _sockets_in(frame: Optional[FrameType]) -> List[Any]:
    """The sockets held by the local variables of *frame* and its callers."""
    found: List[Any] = []
    while frame is not None:
        found.extend(v for v in list(frame.f_locals.values()) if isinstance(v, _SOCKET_TYPES))
        frame = frame.f_back
    return found


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


class DialDeadline:
    """Mixin for the pool's connection class: a dial's budget bounds each of its steps.

    On a plain blocking socket a dial holds the thread, the hub included,
    until each socket call returns, so the pool's ``gevent.Timeout`` cannot
    fire: only socket timeouts bound it, and redis-py gives the TLS
    handshake and each reply of the Redis handshake ``socket_timeout``,
    none by default (a server that accepts and never answers then hangs the
    dial for ever). While the pool dials, :attr:`_greenpool_deadline` holds
    the ``time.monotonic()`` by which the dial must be done, and each step
    waits at most for what remains when it starts: the TCP connect and the
    TLS handshake (``_connect``), each reply of the Redis handshake
    (``read_response``, through :meth:`_greenpool_read_step`). The dial gives
    the socket its ``socket_timeout`` back when it is done.
    """

    #: The dial's deadline, on ``time.monotonic()``; None outside a dial.
    _greenpool_deadline: Optional[float] = None
    #: Whether the last step's timeout was the dial's budget rather than
    #: socket_timeout: its timeout is then the dial's, reported as such.
    _greenpool_budget_bound = False

    # socket_timeout and socket_connect_timeout are redis-py's attributes
    # (properties from redis-py 7 on); the class declares nothing more.
    socket_timeout: Optional[float]
    socket_connect_timeout: Optional[float]

    def _greenpool_remaining(self) -> float:
        """The seconds left of the dial's budget; a TimeoutError once none is."""
        remaining = (self._greenpool_deadline or 0.0) - time.monotonic()
        if remaining <= 0:
            self._greenpool_budget_bound = True
            raise redis.exceptions.TimeoutError("the dial's socket_connect_timeout is spent")
        return remaining

    def _greenpool_step(self, timeout: Optional[float]) -> float:
        """The timeout for the next step of the dial: *timeout*, or less if less remains."""
        remaining = self._greenpool_remaining()
        self._greenpool_budget_bound = timeout is None or remaining < timeout
        return remaining if timeout is None else min(timeout, remaining)

    def _connect(self) -> Any:
        if self._greenpool_deadline is None:
            return super()._connect()  # type: ignore[misc]
        # redis-py puts socket_connect_timeout on the socket for the TCP
        # connect and socket_timeout after it, which the TLS handshake then
        # waits under. Both have their own values back before on_connect,
        # where the parser records socket_timeout as the one to restore.
        connect, read = self.socket_connect_timeout, self.socket_timeout
        remaining = self._greenpool_remaining()
        self.socket_connect_timeout = remaining if connect is None else min(connect, remaining)
        self.socket_timeout = self._greenpool_step(read)
        try:
            return super()._connect()  # type: ignore[misc]
        finally:
            self.socket_connect_timeout, self.socket_timeout = connect, read

    def _greenpool_read_step(self) -> None:
        """Before each reply of the Redis handshake: wait at most what remains.

        Called by ``ReplyTracking.read_response`` while a deadline is set,
        so that outside a dial reading a reply costs one attribute test.
        """
        _redispy.set_socket_timeout(self, self._greenpool_step(self.socket_timeout))


class _InFlight:
    """The shell's side of one dial: its greenlet and connection object."""

    __slots__ = ("greenlet", "conn", "timer")

    def __init__(self) -> None:
        self.greenlet: Any = None
        self.conn: Any = None
        self.timer: Any = None  #: fires every SLOW_DIAL while the dial runs


def _out_of_time(pool: "BlockingConnectionPool", timeout: Optional[float], during: Optional[BaseException]) -> Exception:
    """The error for a dial that outlived socket_connect_timeout.

    Cut short after a failed attempt (*during* is what it raised, as
    redis-py's connect retries report it; see ``ReplyTracking.disconnect``),
    while redis-py backs off before the next one, the dial failed for that
    reason, and the caller gets redis-py's ``ConnectionError`` saying so, as
    redis-py's own pools give after their retries; cut short mid-attempt,
    redis-py's ``TimeoutError``, as a connect timeout gives in redis-py.
    """
    where = f"pool {pool.name!r} could not open a connection to {pool._target()} within {timeout or 0:.2f} s"
    # A timed-out attempt (socket.timeout is an OSError) failed of the bound itself.
    if isinstance(during, (redis.exceptions.ConnectionError, OSError)) and not isinstance(during, TimeoutError):
        error: Exception = redis.exceptions.ConnectionError(f"{where}; the last attempt failed: {during}")
        error.__cause__ = during
        return error
    return redis.exceptions.TimeoutError(f"{where} (socket_connect_timeout)")


class Dialer:
    """Runs the dials the core asks for, each in a greenlet of the pool's."""

    def __init__(self, pool: "BlockingConnectionPool") -> None:
        self._pool = pool
        self._in_flight: Dict[DialTicket, _InFlight] = {}

    def start(self, ticket: DialTicket) -> None:
        """Run the dial of *ticket* (a ``DIAL`` action of the core)."""
        record = self._in_flight[ticket] = _InFlight()
        dial = record.greenlet = gevent.spawn(self._run, ticket, record)
        dial.name = f"{self._pool.name}-dial"
        # A dial killed before it ever ran (gevent.killall at shutdown) skips
        # _run's own bookkeeping: this link gives its slot back.
        dial.rawlink(functools.partial(self._ended, ticket))
        timer = record.timer = get_hub().loop.timer(SLOW_DIAL, SLOW_DIAL)
        timer.start(self._slow, ticket)

    def _slow(self, ticket: DialTicket) -> None:
        # In the hub, every SLOW_DIAL while *ticket*'s dial runs: if callers
        # wait beyond what the dials in flight will serve, start one more.
        pool = self._pool
        core = pool._core
        if ticket.settled or ticket.generation != core.generation:
            return
        if len(core.queue) > core.dialling and core.fill(1):
            logger.debug("pool %r: a dial is slow; opening another one beside it", pool.name)
            pool._act()

    def _ended(self, ticket: DialTicket, _dial: Any) -> None:
        record = self._in_flight.pop(ticket, None)
        if record is not None and record.timer is not None:
            record.timer.close()
        pool = self._pool
        pool._core.dial_failed(ticket, None)  # a no-op once the dial settled
        pool._act()

    def _run(self, ticket: DialTicket, record: _InFlight) -> None:
        pool = self._pool
        core = pool._core
        timeout = pool._dial_timeout
        conn = raw = None
        try:
            conn = record.conn = pool.make_connection()
            raw = _redispy.raw_connection(conn)
            # Bound the whole dial, TCP connect, TLS and Redis handshakes,
            # redis-py's own retries included: a server that accepts but
            # never answers would otherwise hold the pool's only dial, and
            # with it all growth, for ever. The Timeout is a BaseException
            # until it leaves redis-py, so that no retry loop there takes it
            # for a failed attempt and starts another, unbounded one. It
            # cannot fire while a blocking socket holds the hub: there the
            # deadline (DialDeadline) bounds each step instead.
            if timeout is not None:
                raw._greenpool_deadline = time.monotonic() + timeout
            with gevent.Timeout(timeout) as timer:
                try:
                    conn.connect()
                except gevent.Timeout as exc:
                    if exc is not timer:
                        raise
                    # (Its sockets are closed below: __context__ keeps it.)
                    late = _out_of_time(pool, timeout, raw._greenpool_failure)
                    raise late from late.__cause__  # the failed attempt, or None
                except redis.exceptions.TimeoutError:
                    if not raw._greenpool_budget_bound:
                        raise  # socket_timeout's own, shorter than the budget
                    late = _out_of_time(pool, timeout, raw._greenpool_failure)
                    raise late from late.__cause__
                finally:
                    raw._greenpool_deadline = None
            _redispy.restore_socket_timeout(raw)
        except BaseException as exc:
            if conn is not None:
                conn.disconnect()  # a handshake cut short leaves its socket open
            close_sockets_in(exc)
            # A kill of the dial is no caller's error.
            error = exc if isinstance(exc, Exception) else None
            if error is not None and ticket.generation == core.generation:
                logger.debug("pool %r failed to open a connection: %s", pool.name, exc)
            core.dial_failed(ticket, error)
            pool._act()
            if error is None:
                raise
            return
        if core.dial_done(ticket, conn, _redispy.raw_connection(conn)) is None:
            conn.disconnect()  # of a past generation, or settled by a kill
            return
        pool._act()

    def after_fork_in_child(self) -> List[Any]:
        """In a forked child: make the parent's dials harmless here.

        Every socket a dial in flight holds (its connection's, and those in
        the locals of its suspended greenlet, for a connect or TLS handshake
        not yet finished) is pointed at ``/dev/null`` in this process, so the
        greenlet's copy fails here without touching the parent's socket, and
        the core, in a new generation, ignores what it reports. Returns the
        dials' connection objects, for their fds to be closed later.
        """
        conns = []
        for record in self._in_flight.values():
            if record.timer is not None:
                record.timer.stop()  # the parent's dial: nothing to escalate here
            sockets = _sockets_in(getattr(record.greenlet, "gr_frame", None))
            if record.conn is not None:
                conns.append(record.conn)
                sockets += _redispy.sockets_of(_redispy.raw_connection(record.conn))
            _redispy.neutralize(sockets)
        self._in_flight.clear()
        return conns
