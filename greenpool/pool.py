"""The pool: checkout, release, waiting, closing and the pool's state.

Everything that decides who gets which connection happens here, in short
sections that never yield to the hub: under gevent only one greenlet runs at
a time, so a section without a yield is atomic and needs no lock. Network
I/O (opening a connection) happens outside them, in a dial greenlet the pool
owns, so a caller that is killed or times out never leaves a half-opened
socket behind: the dial finishes and serves the next caller.

The life of a connection::

    dial greenlet --> idle (LIFO stack) --> in use --> released
                  \\                   /                 |
                   `-> oldest waiter <-------------------'   (FIFO hand-off)

A released connection goes straight to the oldest live waiter, so a greenlet
that releases and asks again queues behind those already waiting (redis-py's
pools let it barge in and starve them).

Where the rest lives: dials in :mod:`greenpool._dial`, the records in
:mod:`greenpool._records`, reply accounting in :mod:`greenpool._tracking`,
what redis-py calls beyond checkout in :mod:`greenpool._redispy`, fork
safety in :mod:`greenpool._fork`, background upkeep in
:mod:`greenpool.maintenance`, settings in :mod:`greenpool.config`.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import traceback
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional

import redis
from gevent import getcurrent
from gevent.monkey import get_original
from redis.connection import parse_url

from . import _fork, config, maintenance
from ._dial import DIAL_CONCURRENCY, DialMixin
from ._records import LENT, Queued, Slot
from ._redispy import RedisPyPoolMixin
from ._tracking import tracked_class
from .errors import PoolClosed, PoolTimeout, TooManyWaiters
from .stats import Counters, PoolStats

__all__ = ["BlockingConnectionPool"]

logger = logging.getLogger("greenpool")

# The real OS thread id, even under monkey-patching (where threads are greenlets).
_thread_ident: Callable[[], int] = get_original("_thread", "get_ident")
_poll = get_original("select", "poll")
_POLLIN = 0x001 | 0x008 | 0x010  # POLLIN | POLLERR | POLLHUP

_names = itertools.count(1)
_UNSET: Any = object()  # "not given": None is a meaningful timeout

class BlockingConnectionPool(DialMixin, RedisPyPoolMixin, redis.ConnectionPool):
    """A fair, bounded, kill-safe blocking connection pool for gevent.

    A drop-in ``connection_pool=`` for :class:`redis.Redis`. When every
    connection is busy, a caller waits cooperatively, in arrival order, up to
    *timeout* seconds, then gets :class:`~greenpool.PoolTimeout`.

    :param max_connections: the most connections that exist at once, counting
        idle ones, those in use and those being opened.
    :param timeout: seconds a caller waits for a connection; ``None`` waits
        for ever; ``0`` never waits for a busy connection (it still waits,
        up to ``socket_connect_timeout``, for a connection being opened for
        it when the pool can grow).
    :param name: the pool's name in logs, errors and ``repr``.
    :param connection_class: the redis-py connection class.
    :param connection_kwargs: passed to *connection_class* (``host``,
        ``port``, ``db``, ``password``, ``socket_timeout``, ``protocol`` ...).

    The lifecycle options (``idle_timeout``, ``min_idle``, ``max_lifetime``,
    ``validation_window``, keepalive, ``leak_detection_threshold``,
    ``max_waiters``) are keyword-only; :mod:`greenpool.config` documents each.
    Every value is validated here, once.
    """

    def __init__(
        self,
        max_connections: Any = _UNSET,
        timeout: Any = _UNSET,
        *,
        connection_class: type = redis.Connection,
        clock: Callable[[], float] = time.monotonic,
        _resolved: Optional[config.Resolved] = None,
        **kwargs: Any,
    ) -> None:
        given = dict(kwargs, max_connections=max_connections, timeout=timeout)
        settings = {k: v for k, v in given.items() if k in config.SETTINGS_BY_NAME and v is not _UNSET}
        connection_kwargs = {k: v for k, v in given.items() if k not in config.SETTINGS_BY_NAME}
        if "url" in settings:
            raise TypeError("BlockingConnectionPool() takes no url: use BlockingConnectionPool.from_url(url)")
        if _resolved is None:
            _resolved = config.resolve(overrides=settings)
        options = dict(_resolved.options)
        del options["url"]
        self.options = options
        #: Where each setting's value came from: argument, url, environment or default.
        self.sources = _resolved.sources
        self.max_connections: int = options["max_connections"]
        self.timeout: Optional[float] = options["timeout"]
        self.name: str = options["name"] or f"greenpool-{next(_names)}"
        self._clock = clock
        self._max_waiters: Optional[int] = options["max_waiters"]
        self._validation_window: float = options["validation_window"]
        lifetime = options["max_lifetime"]
        self._max_lifetime: float = float("inf") if lifetime is None else lifetime
        self._leak_threshold: Optional[float] = options["leak_detection_threshold"]
        self._dial_timeout: Optional[float] = options["socket_connect_timeout"]
        # timeout=0 callers never wait for a busy connection, so nothing
        # damps their dials: each gets its own.
        self._dial_limit = DIAL_CONCURRENCY if self.timeout != 0 else self.max_connections
        self._tracked_class = tracked_class(connection_class)
        self._maintenance: Optional[maintenance.Maintenance] = None
        for key, value in config.connection_kwargs(options, connection_class).items():
            connection_kwargs.setdefault(key, value)  # the user's own mapping wins
        # redis-py's constructor sets up what its client expects of a pool
        # (encoder, protocol, cache, maintenance notifications) and ends by
        # calling our reset().
        super().__init__(connection_class=connection_class, **connection_kwargs)
        self.max_connections = options["max_connections"]
        _fork.register(self)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "BlockingConnectionPool":
        """Build a pool from a ``redis://``, ``rediss://`` or ``unix://`` URL.

        Query options (``?max_connections=10&timeout=2``, and every greenpool
        setting) are parsed strictly and apply unless the same keyword is
        given: explicit argument > URL query > ``GREENPOOL_*`` variable >
        default. redis-py's own query options (``db``, ``socket_timeout`` ...)
        work as in redis-py.
        """
        return cls._build(url=url, **kwargs)

    @classmethod
    def _build(
        cls,
        *,
        url: Optional[str] = None,
        environ: Optional[Mapping[str, str]] = None,
        prefix: str = "GREENPOOL_",
        use_env_url: bool = False,
        **kwargs: Any,
    ) -> "BlockingConnectionPool":
        settings = {k: v for k, v in kwargs.items() if k in config.SETTINGS_BY_NAME}
        resolved = config.resolve(environ, prefix=prefix, url=url, overrides=settings)
        connection_kwargs: Dict[str, Any] = {}
        if resolved.url is not None and (url is not None or use_env_url):
            connection_kwargs = parse_url(resolved.url)
        connection_kwargs.update((k, v) for k, v in kwargs.items() if k not in settings)
        return cls(_resolved=resolved, **connection_kwargs)

    # -- state -------------------------------------------------------------

    def reset(self) -> None:
        """Replace every connection: idle ones close now, those in use when
        released; waiters keep waiting and get new connections.

        (redis-py's constructor calls this first, to build the state.)
        """
        if not hasattr(self, "_idle"):
            self._init_state()
        else:
            self.disconnect(inuse_connections=True)

    def _init_state(self) -> None:
        self._idle: List[Slot] = []  # LIFO: the most recently used at the end
        self._in_use: Dict[Any, Slot] = {}
        self._waiters: Deque[Queued] = deque()
        self._nwaiting = 0  # live (not cancelled) entries of _waiters
        self._dialling = 0
        self._closed = False
        self._thread: Optional[int] = None
        self._generation = object()  # dials of an older generation are dropped
        self._orphans: List[Any] = []
        self._last_dial_error: Optional[BaseException] = None
        self._counters = Counters()
        self.pid = os.getpid()

    def _after_fork_in_child(self) -> None:
        # Called by greenpool._fork inside os.fork(): the parent's sockets
        # must never be used, written to or shut down from here. Keep them
        # aside; maintenance closes our copies of their fds later.
        orphans = [slot.conn for slot in self._idle] + list(self._in_use)
        closed = self._closed
        self._init_state()
        self._closed = closed
        self._orphans = orphans
        if self._maintenance is not None:
            # The parent's maintenance greenlet was copied too: if it ever
            # wakes here it must exit. (No hub calls inside a fork handler.)
            self._maintenance._stopped = True
            self._maintenance = None

    def _size(self) -> int:
        return len(self._idle) + len(self._in_use) + self._dialling

    def _adopt_thread(self) -> None:
        ident = _thread_ident()
        if self._thread is None:
            self._thread = ident
        elif self._thread != ident:
            raise RuntimeError(
                f"pool {self.name!r} belongs to the gevent hub of OS thread "
                f"{self._thread:#x}; it was used from OS thread {ident:#x}. Use one "
                "pool per thread (under monkey-patching, threads are greenlets and "
                "share one pool safely)"
            )

    # -- checkout ----------------------------------------------------------

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        """Lend a connection, waiting for one if all are busy.

        The arguments are accepted for compatibility with every redis-py
        version's client and ignored.
        """
        if _thread_ident() != self._thread:
            self._adopt_thread()
        idle = self._idle
        # The hot path, inlined: a connection used within the validation
        # window is lent with no syscall and no switch to the hub.
        while idle and not self._nwaiting:
            slot = idle.pop()
            now = self._clock()
            if now - slot.idle_since > self._validation_window and not self._still_good(slot, now):
                continue
            self._in_use[slot.conn] = slot
            self._counters.checkouts += 1
            if self._leak_threshold is not None:
                self._track(slot, now)
            return slot.conn
        return self._wait()

    def _track(self, slot: Slot, now: float) -> None:
        # Leak detection only: who holds the connection, since when, and the
        # stack that took it (extract_stack costs some microseconds).
        slot.holder = getcurrent()
        slot.lent_at = now
        slot.leak_reported = False
        slot.stack = traceback.extract_stack()

    def _still_good(self, slot: Slot, now: float) -> bool:
        """Check an idle connection without blocking; close it if it is not."""
        if now >= slot.expires_at:
            self._close_slot(slot, "expired")
            return False
        sock = slot.raw._sock
        if sock is not None:
            # A zero-timeout poll of the real fd: a syscall, but never a hub
            # round trip. Readable means EOF (the server closed it) or data
            # nobody asked for; either way the connection is not clean.
            poller = _poll()
            try:
                poller.register(sock.fileno(), _POLLIN)
                if not poller.poll(0):
                    return True
            except (OSError, ValueError):
                pass
        self._close_slot(slot, "failed_check")
        return False

    def _wait(self) -> Any:
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        if self._max_waiters is not None and self._nwaiting >= self._max_waiters:
            raise TooManyWaiters(
                f"pool {self.name!r} already has {self._nwaiting} callers waiting "
                f"(max_waiters={self._max_waiters}, max_connections={self.max_connections})"
            )
        timeout = self.timeout
        if timeout == 0 and self._size() >= self.max_connections:
            self._counters.timeouts += 1
            raise PoolTimeout(self._timeout_message())
        entry = Queued()
        self._waiters.append(entry)
        self._nwaiting += 1
        self._counters.waits += 1
        # Nothing is idle while callers wait, so the pool can grow only if
        # in-use and dialling connections leave room: under contention it
        # cannot, and this test spares the call.
        if self._dialling < self._dial_limit and len(self._in_use) + self._dialling < self.max_connections:
            self._grow()
        timer = None
        if timeout:
            timer = entry.waiter.hub.loop.timer(timeout)
            timer.start(entry.waiter.switch, None)
        start = self._clock()
        try:
            entry.waiter.get()
        except BaseException:
            self._abandon(entry)
            raise
        finally:
            if timer is not None:
                timer.close()
            self._counters.wait_time += self._clock() - start
        # Woken by a hand-off, an error, or our timer; a hand-off that raced
        # the timer still wins.
        slot = entry.slot
        if slot is not None:
            self._counters.checkouts += 1
            if self._leak_threshold is None:
                slot.holder = LENT
            else:
                self._track(slot, self._clock())
            return slot.conn
        if entry.error is not None:
            raise entry.error
        entry.cancelled = True
        self._nwaiting -= 1
        self._counters.timeouts += 1
        raise PoolTimeout(self._timeout_message())

    def _abandon(self, entry: Queued) -> None:
        # The waiter was killed or interrupted (GreenletExit, gevent.Timeout,
        # KeyboardInterrupt). If a connection was handed to it at that very
        # instant, pass it on rather than lose the slot.
        if entry.slot is not None:
            slot, entry.slot = entry.slot, None
            # Give it back as its holder would: release() also decides
            # whether it must close (the pool was closed meanwhile, say).
            slot.holder = LENT
            self.release(slot.conn)
        elif entry.error is None and not entry.cancelled:
            entry.cancelled = True
            self._nwaiting -= 1

    def _timeout_message(self) -> str:
        message = (
            f"no connection from pool {self.name!r} within {self.timeout:.2f} s "
            f"(max_connections={self.max_connections}, {len(self._in_use)} in use, "
            f"{self._dialling} dialling, {self._nwaiting} waiting)"
        )
        if self._last_dial_error is not None and self._size() < self.max_connections:
            message += f"; last connection error: {self._last_dial_error}"
        return message

    # -- release -----------------------------------------------------------

    def release(self, connection: Any) -> None:
        """Take a connection back; it goes to the oldest waiter, else idle.

        A connection that owes replies, lost its socket, outlived
        ``max_lifetime`` or was marked by :meth:`disconnect` is closed instead.
        """
        if _thread_ident() != self._thread:
            self._adopt_thread()
        slot = self._in_use.pop(connection, None)
        if slot is None or slot.holder is None:
            self._release_unknown(connection, slot)
            return
        now = self._clock()
        raw = slot.raw
        # close() and disconnect() mark connections in use as expired, so
        # this one comparison also covers them.
        if (
            raw._greenpool_owed
            or raw._sock is None
            or now >= slot.expires_at
            or raw._greenpool_reconnect
            or (self._custom_retire and self.retire_on_release(connection))
        ):
            self._retire(slot, now)
        elif self._nwaiting:
            self._put(slot, now)
        else:  # the hot path, inlined
            slot.idle_since = now
            self._idle.append(slot)

    def _put(self, slot: Slot, now: float) -> None:
        """Give a connection nobody holds to the oldest live waiter, or idle."""
        waiters = self._waiters
        while waiters:
            entry = waiters.popleft()
            if entry.cancelled:
                continue
            self._nwaiting -= 1
            slot.holder = None
            entry.slot = slot
            self._in_use[slot.conn] = slot
            entry.wake()
            return
        slot.idle_since = now
        self._idle.append(slot)

    def _retire(self, slot: Slot, now: float) -> None:
        raw = slot.raw
        if self._closed or slot.discard:
            reason = "pool_closed"
        elif raw._greenpool_owed:
            reason = "dirty"
        elif raw._sock is None:
            reason = "broken"
        elif now >= slot.expires_at:
            reason = "expired"
        elif self._custom_retire and self.retire_on_release(slot.conn):
            reason = "stale"
        else:
            reason = "reconnect"
        self._close_slot(slot, reason)
        self._grow()

    #: Subclasses that close connections on release for reasons of their own
    #: set this and override :meth:`retire_on_release`; others pay one
    #: attribute test on the hot path.
    _custom_retire = False

    def retire_on_release(self, connection: Any) -> bool:
        """Whether to close *connection* as it comes back (reason ``stale``).

        Called on release only when ``_custom_retire`` is true; it must not
        do I/O or yield. :mod:`greenpool.sentinel` closes connections to a
        former master this way.
        """
        return False

    def _release_unknown(self, connection: Any, slot: Optional[Slot]) -> None:
        if slot is not None:
            # Handed to a waiter that has not run yet: nobody holds it, so this
            # is a second release. Put the entry back untouched.
            self._in_use[connection] = slot
            what = "released twice (it was already handed to another caller)"
        elif any(s.conn is connection for s in self._idle):
            what = "released twice (it is already idle)"
        elif connection in self._orphans or getattr(connection, "pid", None) != os.getpid():
            # Checked out before a fork: close our copy of the fd, never the
            # parent's connection (redis-py skips shutdown() across a fork).
            connection.disconnect()
            return
        else:
            what = "not lent out by this pool"
        self._counters.misuses += 1
        logger.warning("pool %r ignored a release: %r was %s", self.name, connection, what)

    # -- closing -----------------------------------------------------------

    def _close_slot(self, slot: Slot, reason: str) -> None:
        self._counters.closed[reason] += 1
        try:
            slot.conn.disconnect()
        except Exception:  # a close that fails still frees the slot
            logger.debug("pool %r: error closing %r", self.name, slot.conn, exc_info=True)

    def disconnect(self, inuse_connections: bool = True) -> None:
        """Close idle connections now; those in use close when released.

        The pool stays usable. (redis-py's pools also close sockets in use by
        other callers; under gevent that would pull a socket from under a
        greenlet mid-command, so greenpool defers them to their release.)
        """
        if _thread_ident() != self._thread:
            self._adopt_thread()
        idle, self._idle = self._idle, []
        for slot in idle:
            self._close_slot(slot, "pool_closed")
        if inuse_connections:
            self._discard_in_use()
        self._grow()

    def _discard_in_use(self) -> None:
        for slot in self._in_use.values():
            slot.discard = True
            slot.expires_at = float("-inf")

    def close(self) -> None:
        """Close the pool: idempotent, and every waiter gets PoolClosed.

        Idle connections close now, connections in use when released, and
        the maintenance greenlet stops.
        """
        if self._closed:
            return
        if _thread_ident() != self._thread:
            self._adopt_thread()
        self._closed = True
        waiters, self._waiters = self._waiters, deque()
        self._nwaiting = 0
        for entry in waiters:
            if not entry.cancelled:
                entry.error = PoolClosed(f"pool {self.name!r} was closed while waiting")
                entry.wake()
        idle, self._idle = self._idle, []
        for slot in idle:
            self._close_slot(slot, "pool_closed")
        self._discard_in_use()
        if self._maintenance is not None:
            self._maintenance.stop()
            self._maintenance = None

    def __enter__(self) -> "BlockingConnectionPool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- observing ---------------------------------------------------------

    def stats(self) -> PoolStats:
        """A frozen snapshot of the pool's state and counters."""
        return self._counters.snapshot(
            name=self.name,
            max_connections=self.max_connections,
            size=self._size(),
            idle=len(self._idle),
            in_use=len(self._in_use),
            dialling=self._dialling,
            waiting=self._nwaiting,
        )

    def _target(self) -> str:
        kw = self.connection_kwargs
        if "path" in kw:
            return f"unix://{kw['path']}?db={kw.get('db', 0)}"
        return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"<greenpool.BlockingConnectionPool {self.name!r} {self._target()}{state} "
            f"size={self._size()}/{self.max_connections} idle={len(self._idle)} "
            f"in_use={len(self._in_use)} dialling={self._dialling} waiting={self._nwaiting}>"
        )
