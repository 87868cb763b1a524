"""The pool's shell: redis-py's pool interface, carried out with gevent.

:class:`BlockingConnectionPool` decides nothing itself: every change of
pool state is a method of its :class:`~greenpool.core.PoolCore`, which
returns the actions to carry out (wake a waiter, open a connection, close
one) in its outbox. The shell carries them out: it wakes greenlets, has its
:class:`~greenpool._dial.Dialer` open connections in greenlets the pool
owns, closes connections, runs the readiness check, and times waits. Each
core call is atomic (no yield), and no I/O happens inside one.

Checkout takes the most recently used idle connection; with none idle, the
caller queues in arrival order and a released connection goes straight to
the oldest live waiter, so a greenlet that releases and asks again queues
behind those already waiting (redis-py's pools let it barge and starve them).

Where the rest lives: the state machine in :mod:`greenpool.core`, dials in
:mod:`greenpool._dial`, reply accounting in :mod:`greenpool._tracking`,
every read of redis-py's private attributes in :mod:`greenpool._redispy`,
fork safety in :mod:`greenpool._fork`, background upkeep in
:mod:`greenpool.maintenance`, settings in :mod:`greenpool.config`.
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from typing import Any, Callable, List, Optional

import redis
from gevent import getcurrent
from gevent.hub import Waiter, get_hub
from gevent.monkey import get_original

from . import _fork, _redispy, _watch, config, maintenance
from ._dial import DIAL_CONCURRENCY, Dialer
from ._tracking import tracked_class
from .config import DEFAULT
from .core import (
    CHECKING,
    CLOSE,
    DIAL,
    FAILED,
    IDLE,
    LENT,
    REFUSED_CLOSED,
    REFUSED_WAITERS,
    SERVED,
    WAITING,
    WAKE,
    PoolCore,
    Request,
    Slot,
)
from .errors import PoolClosed, PoolTimeout, TooManyWaiters
from .stats import PoolStats

__all__ = ["BlockingConnectionPool"]

logger = logging.getLogger("greenpool")

# The real OS thread id, even under monkey-patching (where threads are greenlets).
_thread_ident: Callable[[], int] = get_original("_thread", "get_ident")

_names = itertools.count(1)
class BlockingConnectionPool(_redispy.RedisPyInterface, redis.ConnectionPool):
    """A fair, bounded, kill-safe blocking connection pool for gevent.

    A drop-in ``connection_pool=`` for :class:`redis.Redis`. When every
    connection is busy, a caller waits cooperatively, in arrival order, up to
    *timeout* seconds, then gets :class:`~greenpool.PoolTimeout`.

    Arguments, all validated here, once (a bad one is a
    :class:`~greenpool.ConfigError` naming it):

    - ``max_connections`` and ``timeout`` may be given by position, as to
      redis-py's ``BlockingConnectionPool``; ``max_connections=None`` means
      "not set" (redis-py's and Celery's value for it): the pool stays
      bounded, at ``GREENPOOL_MAX_CONNECTIONS`` or 50.
    - Every other greenpool setting is keyword-only. A setting left at
      ``DEFAULT`` takes its ``GREENPOOL_*`` variable, else the default listed
      below; ``GREENPOOL_URL`` and ``REDIS_URL`` are never read here (use
      :meth:`from_url` or :func:`greenpool.from_env`).
    - ``connection_class``: a redis-py connection class (default
      :class:`redis.Connection`).
    - Any other keyword goes to *connection_class* (``host``, ``port``,
      ``db``, ``password``, ``protocol`` ...) and must be one of its
      parameters.

    The settings:

    """

    #: The monotonic clock every deadline and age is read from. A class
    #: attribute, not a parameter: tests substitute it on a subclass.
    _clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(
        self,
        max_connections: Optional[int] = None,
        timeout: Optional[float] = DEFAULT,
        *,
        connection_class: type = DEFAULT,
        max_waiters: Optional[int] = DEFAULT,
        name: Optional[str] = DEFAULT,
        idle_timeout: Optional[float] = DEFAULT,
        min_idle: int = DEFAULT,
        max_lifetime: Optional[float] = DEFAULT,
        validation_window: float = DEFAULT,
        health_check_interval: float = DEFAULT,
        socket_keepalive: bool = DEFAULT,
        keepalive_idle: Optional[float] = DEFAULT,
        keepalive_interval: Optional[float] = DEFAULT,
        keepalive_count: Optional[int] = DEFAULT,
        tcp_user_timeout: Optional[float] = DEFAULT,
        keepalive_ping_interval: Optional[float] = DEFAULT,
        leak_detection_threshold: Optional[float] = DEFAULT,
        socket_timeout: Optional[float] = DEFAULT,
        socket_connect_timeout: Optional[float] = DEFAULT,
        client_name: Optional[str] = DEFAULT,
        **connection_kwargs: Any,
    ) -> None:
        given = {k: v for k, v in locals().items() if k not in ("self", "connection_kwargs", "__class__")}
        self._setup(config.split({**given, **connection_kwargs}))

    def _setup(self, split: config.Split) -> None:
        # Everything __init__ does once the arguments are split; from_url()
        # and from_env() come here with theirs.
        options = dict(split.resolved.options)
        del options["url"]
        self.options = options
        #: Where each setting's value came from: argument, url, environment or default.
        self.sources = split.resolved.sources
        self.max_connections: int = options["max_connections"]
        self.timeout: Optional[float] = options["timeout"]
        self.name: str = options["name"] or f"greenpool-{next(_names)}"
        self._track_leaks: bool = options["leak_detection_threshold"] is not None
        self._dial_timeout: Optional[float] = options["socket_connect_timeout"]
        lifetime = options["max_lifetime"]
        self._core = PoolCore(
            self.max_connections,
            clock=self._clock,
            max_waiters=options["max_waiters"],
            # timeout=0 callers never wait for a busy connection, so nothing
            # damps their dials: each gets its own.
            dial_limit=DIAL_CONCURRENCY if self.timeout != 0 else self.max_connections,
            validation_window=options["validation_window"],
            max_lifetime=float("inf") if lifetime is None else lifetime,
        )
        self._tracked_class = tracked_class(split.connection_class)
        self._dialer = Dialer(self)
        self._idle_watch = _watch.IdleWatch(self)
        self._maintenance: Optional[maintenance.Maintenance] = None
        self._thread: Optional[int] = None
        self._orphans: List[Any] = []
        _redispy.init_base(self, split.connection_class, dict(split.connection_kwargs))
        self.max_connections = options["max_connections"]
        _fork.register(self)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "BlockingConnectionPool":
        """Build a pool from a ``redis://``, ``rediss://`` or ``unix://`` URL.

        The URL and the keywords mean what they mean to redis-py's
        ``ConnectionPool.from_url``: redis-py's options (``db`` in the path or
        the query, ``socket_timeout``, ``max_connections`` ...) are parsed by
        redis-py and win over keywords. greenpool's own settings in the query
        (``?idle_timeout=30s&min_idle=2``) are parsed strictly, and a keyword
        wins over them. Settings given neither way come from ``GREENPOOL_*``
        variables (never ``GREENPOOL_URL``), then defaults.
        """
        return cls._from_split(config.split(kwargs, url=config.validate("url", url)))

    @classmethod
    def _from_split(cls, split: config.Split) -> "BlockingConnectionPool":
        # A pool from arguments already split (from_url, from_env, cluster nodes).
        pool = cls.__new__(cls)
        pool._setup(split)
        return pool

    # -- state -------------------------------------------------------------

    def reset(self) -> None:
        """Replace every connection: idle ones close now, those in use when
        released; waiters keep waiting and get new connections.

        (redis-py's constructor calls this last; the pool is empty then.)
        """
        self._core.disconnect(in_use=True)
        self._act()
        _redispy.stamp_process(self)

    def _after_fork_in_child(self) -> None:
        # Called by greenpool._fork inside os.fork(), before any greenlet
        # runs: no I/O but on the child's own fd table. The child starts a
        # new generation with full capacity. Every socket of the parent's
        # generation (idle, lent, being dialled or pinged) is pointed at
        # /dev/null in this process, so whatever a copied greenlet does with
        # it here never reaches the parent's connection; maintenance closes
        # those fds later. Copied waiters are woken (a hub callback, queued
        # in memory) to start again in the child's generation: the dial or
        # release they were waiting for belongs to the parent.
        _redispy.stamp_process(self)
        inherited, requests = self._core.fork_reset()
        orphans = [slot.conn for slot in inherited]
        for slot in inherited:
            _redispy.neutralize(_redispy.sockets_of(slot.raw))
        orphans.extend(self._dialer.after_fork_in_child())
        self._orphans.extend(orphans)
        for request in requests:
            waiter = request.waiter
            waiter.hub.loop.run_callback(waiter.switch, None)
        if self._maintenance is not None:
            # The parent's maintenance greenlet was copied too: if it ever
            # wakes here it must exit.
            self._maintenance.abandon()
            self._maintenance = None

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

    def _act(self) -> None:
        """Carry out the core's actions, in order, until none is left."""
        outbox = self._core.outbox
        while outbox:
            kind, item = outbox.pop(0)
            if kind is WAKE:
                # Waiter.switch may only run in the hub: schedule it. If the
                # caller has already woken (its timer fired) the late switch
                # is a no-op.
                waiter = item.waiter
                waiter.hub.loop.run_callback(waiter.switch, None)
            elif kind is CLOSE:
                self._close_connection(item)
                self._core.closed(item)
            elif kind is DIAL:
                if self._maintenance is None:
                    self._maintenance = maintenance.start(self)
                self._dialer.start(item)
        if self._core.idle:
            self._idle_watch.schedule()  # connections that went idle: a dial, a ping, a hand-back

    def _close_connection(self, slot: Slot) -> None:
        self._idle_watch.close(slot)
        try:
            slot.conn.disconnect()
        except Exception:  # a close that fails still frees the slot
            logger.debug("pool %r: error closing %r", self.name, slot.conn, exc_info=True)

    # -- checkout ----------------------------------------------------------

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        """Lend a connection, waiting for one if all are busy.

        The arguments are accepted for compatibility with every redis-py
        version's client and ignored.
        """
        if _thread_ident() != self._thread:
            self._adopt_thread()
        # The hot path: a connection used within validation_window is lent
        # with no system call and no switch to the hub.
        slot = self._core.lend()
        if slot is None or self._track_leaks:
            return self._checkout(slot)
        if slot.watched and not _watch.take(slot):
            self._unfit(slot)
            return self._checkout(None)
        slot.raw._greenpool_user = getcurrent()
        return slot.conn

    def _checkout(self, slot: Optional[Slot]) -> Any:
        core = self._core
        if slot is not None and slot.watched and not _watch.take(slot):
            self._unfit(slot)
            slot = None
        while slot is None:
            slot = core.lend_any()
            self._act()  # closes of expired connections, at once
            if slot is not None and slot.watched and not _watch.take(slot):
                self._unfit(slot)
                slot = None
                continue
            if slot is None:
                if self._reclaim_abandoned():
                    continue
                slot = self._wait()
            elif slot.state is CHECKING:
                # Idle longer than validation_window: a non-blocking
                # readiness check of the real socket (a system call, never a
                # hub round trip) before lending it.
                if not core.checked(slot, _redispy.is_ready(slot.raw)):
                    self._act()
                    slot = None
        slot.raw._greenpool_user = getcurrent()
        if self._track_leaks:
            # Leak detection only: who holds the connection, and the stack
            # that took it (extract_stack costs some microseconds).
            slot.holder = getcurrent()
            slot.stack = traceback.extract_stack()
            slot.leak_reported = False
        return slot.conn

    def _unfit(self, slot: Slot) -> None:
        # A connection just taken from idle whose watch had an event pending
        # (the server closed it, or sent on it, in this hub iteration) is
        # closed instead of lent; the caller looks again.
        if slot.state is CHECKING:
            self._core.checked(slot, False)
        else:
            self._core.release(slot, "server_closed")
        self._act()

    def _reclaim_abandoned(self) -> int:
        """Close connections lent to greenlets that died without releasing
        them (killed twice, say: the second kill skipped the release), and
        free their slots. Runs when a caller would wait, and in maintenance.
        """
        core = self._core
        # Only a connection a dead user left mid-protocol (owing replies, or
        # disconnected by redis-py as the kill cut a read short): one handed
        # on cleanly (checked out in a greenlet that then ended, its holder
        # another) is in use, not abandoned.
        dead = [slot for slot in core.out.values()
                if slot.state is LENT and _is_dead(slot.raw._greenpool_user)
                and (slot.raw._greenpool_owed or not _redispy.sockets_of(slot.raw))]
        for slot in dead:
            where = ("checked out at:\n" + "".join(traceback.format_list(slot.stack))
                     if slot.stack else "set leak_detection_threshold to record where it was checked out")
            logger.warning("pool %r: %r was lent to %r, which died without releasing it; closing it "
                           "(%s)", self.name, slot.conn, slot.raw._greenpool_user, where)
            core.release(slot, "abandoned")
        if dead:
            self._act()
        return len(dead)

    def _wait(self) -> Slot:
        core = self._core
        timeout = self.timeout
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            request = core.admit(zero_timeout=timeout == 0)
            if not isinstance(request, Request):
                self._act()
                raise self._refusal(request)
            request.waiter = waiter = Waiter()
            self._act()  # the dial admit() may have asked for
            timer = None
            if timeout:
                assert deadline is not None
                timer = get_hub().loop.timer(max(0.0, deadline - self._clock()))
                timer.start(waiter.switch, None)
            try:
                waiter.get()
            except BaseException:
                # Killed or interrupted (GreenletExit, gevent.Timeout,
                # KeyboardInterrupt): leave the queue, and pass on a
                # connection handed over at that very instant.
                core.cancel(request, timed_out=False)
                self._act()
                raise
            finally:
                if timer is not None:
                    timer.close()
            if request.generation != core.generation:
                # Queued before a fork, woken in the child: the parent's
                # hand-off or timer means nothing here. Start again in the
                # child's generation with the time that is left.
                if deadline is not None and self._clock() >= deadline:
                    raise PoolTimeout(self._timeout_message())
                continue
            # Woken by a hand-off, an error, or our timer; a hand-off that
            # raced the timer still wins.
            state = request.state
            if state is SERVED:
                return core.claim(request)
            if state is FAILED:
                error = request.error
                core.cancel(request, timed_out=False)
                assert error is not None
                raise error
            assert state is WAITING, state
            core.cancel(request, timed_out=True)
            self._act()
            raise PoolTimeout(self._timeout_message())

    def _refusal(self, reason: str) -> BaseException:
        if reason is REFUSED_CLOSED:
            return PoolClosed(f"pool {self.name!r} is closed")
        if reason is REFUSED_WAITERS:
            core = self._core
            return TooManyWaiters(
                f"pool {self.name!r} already has {core.waiting} callers waiting "
                f"(max_waiters={core.max_waiters}, max_connections={self.max_connections})"
            )
        return PoolTimeout(self._timeout_message())

    def _timeout_message(self) -> str:
        core = self._core
        message = (
            f"no connection from pool {self.name!r} within {self.timeout:.2f} s "
            f"(max_connections={self.max_connections}, {len(core.out)} in use, "
            f"{core.dialling} dialling, {core.waiting} waiting)"
        )
        if core.last_dial_error is not None and core.size < self.max_connections:
            message += f"; last connection error: {core.last_dial_error}"
        return message

    # -- release -----------------------------------------------------------

    def release(self, connection: Any) -> None:
        """Take a connection back; it goes to the oldest waiter, else idle.

        A connection that owes replies, lost its socket, outlived
        ``max_lifetime`` or was marked by :meth:`disconnect` is closed instead.
        """
        if _thread_ident() != self._thread:
            self._adopt_thread()
        core = self._core
        slot = core.out.get(connection)
        if slot is None:
            self._release_unknown(connection)
            return
        raw = slot.raw
        # greenpool's own flags (greenpool._tracking), read inline: the
        # hot path makes no call for a healthy connection.
        if raw._greenpool_owed or raw._greenpool_broken or raw._greenpool_reconnect:
            reason = _redispy.retire_reason(raw)
        elif self._custom_retire and self.retire_on_release(connection):
            reason = "stale"
        else:
            reason = None
        misuse = core.release(slot, reason)
        if misuse is not None:
            logger.warning("pool %r ignored a release: %r was %s", self.name, connection, misuse)
        if core.outbox:
            self._act()
        elif slot.state is IDLE:
            self._idle_watch.schedule()

    def _release_unknown(self, connection: Any) -> None:
        if _redispy.from_before_fork(connection, self._orphans):
            # Checked out before a fork: close our copy of the fd (already
            # pointed at /dev/null), never the parent's connection.
            connection.disconnect()
            return
        misuse = self._core.release_unknown(connection)
        logger.warning("pool %r ignored a release: %r was %s", self.name, connection, misuse)

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

    # -- closing -----------------------------------------------------------

    def disconnect(self, inuse_connections: bool = True) -> None:
        """Close idle connections now; those in use close when released.

        The pool stays usable. (redis-py's pools also close sockets in use by
        other callers; under gevent that would pull a socket from under a
        greenlet mid-command, so greenpool defers them to their release.)
        """
        if _thread_ident() != self._thread:
            self._adopt_thread()
        self._core.disconnect(in_use=inuse_connections)
        self._act()

    def close(self) -> None:
        """Close the pool: idempotent, and every waiter gets PoolClosed.

        Idle connections close now, connections in use when released, and
        the maintenance greenlet stops.
        """
        core = self._core
        if core.closed_flag:
            return
        if _thread_ident() != self._thread:
            self._adopt_thread()
        core.close(lambda: PoolClosed(f"pool {self.name!r} was closed while waiting"))
        self._act()
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
        return self._core.closed_flag

    # -- observing ---------------------------------------------------------

    def check(self) -> None:
        """Assert the pool's invariants (see :meth:`PoolCore.check`); for tests."""
        self._core.check()

    def stats(self) -> PoolStats:
        """A frozen snapshot of the pool's state and counters."""
        core = self._core
        return core.counters.snapshot(
            name=self.name,
            max_connections=self.max_connections,
            size=core.size,
            idle=len(core.idle),
            in_use=len(core.out),
            dialling=core.dialling,
            waiting=core.waiting,
        )

    def _target(self) -> str:
        kw = self.connection_kwargs
        if "path" in kw:
            return f"unix://{kw['path']}?db={kw.get('db', 0)}"
        return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"

    def _description(self) -> str:
        # redis-py's description of a pool's connections, as its repr spells
        # it: the connection class and those of host, port, path, db and
        # client_name that were given (no defaults filled in), credentials
        # shown only as <REDACTED>.
        kw, klass = self.connection_kwargs, self.connection_class
        described = ",".join(
            f"{key}={'<REDACTED>' if key in ('username', 'password') else kw[key]}"
            for key in ("host", "port", "path", "db", "client_name", "username", "password")
            if kw.get(key) is not None
        )
        return f"<{klass.__module__}.{klass.__qualname__}({described})>"

    def __repr__(self) -> str:
        core = self._core
        state = " closed" if core.closed_flag else ""
        return (
            f"<greenpool.BlockingConnectionPool {self.name!r} {self._target()}{state} "
            f"size={core.size}/{self.max_connections} idle={len(core.idle)} "
            f"in_use={len(core.out)} dialling={core.dialling} waiting={core.waiting} "
            f"({self._description()})>"
        )


BlockingConnectionPool.__doc__ = (BlockingConnectionPool.__doc__ or "").rstrip() + "\n\n" + config.parameter_docs()


def _is_dead(user: Any) -> bool:
    # A greenlet (gevent's or a raw one) that finished or was killed.
    return user is not None and getattr(user, "dead", False)
