"""The hub watches idle connections: one the server closes is dropped unlent.

A connection resting in the pool should have nothing to read. When its
socket turns readable (EOF after a server restart, ``CLIENT KILL``, the
server's ``timeout``, a failover; or data nobody asked for), it is no longer
fit to lend. :class:`IdleWatch` keeps one libev read watcher per idle
connection, started from the hub and stopped at checkout, and closes a
connection the moment its watcher fires (closed reason ``server_closed``).

Cost: the hot path never makes a system call for it. Watchers are started in
a hub callback, once per hub iteration for all connections that went idle
since (so a loop that never yields pays nothing); stopping one at checkout
is an attribute test, a watcher stop and a test of the watcher's ``pending``
flag (an event received in this very hub iteration). A connection whose watcher could
not have run (it went idle in this hub iteration, or idle for longer than
``validation_window`` without a watch) keeps the readiness check
(:func:`greenpool._redispy.is_ready`, a zero-timeout poll) at checkout.

After a fork the child's copies of the parent's watchers fire on sockets
pointed at ``/dev/null``; they belong to a past generation and stop
themselves.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any, Set

from gevent.hub import get_hub

from . import _redispy
from .core import Slot

if TYPE_CHECKING:
    from .pool import BlockingConnectionPool

__all__ = ["IdleWatch"]

logger = logging.getLogger("greenpool")

_READ = 1  # libev's EV_READ


class IdleWatch:
    """Read watchers on a pool's idle connections (the shell's, like the dials)."""

    def __init__(self, pool: "BlockingConnectionPool") -> None:
        # The loop holds running watchers and their callbacks, so this
        # object and what it holds must not lead back to the pool (a
        # connection does, through redis-py 8's maintenance handler): the
        # pool is held weakly, watchers fire with their fd, and a forgotten
        # pool is still collected, its watchers stopped then.
        self._pool = weakref.ref(pool, self._pool_gone)
        self._watchers: Set[Any] = set()  # every watcher not yet closed
        self._scheduled = False
        self._loop: Any = None

    def _pool_gone(self, _ref: Any) -> None:
        watchers, self._watchers = self._watchers, set()
        for watcher in watchers:
            watcher.close()

    def schedule(self) -> None:
        """Arm watchers on every unwatched idle connection, from the hub, soon.

        Called when connections may have gone idle (a release, a dial, a
        ping). One callback per hub iteration, however many calls.
        """
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = get_hub().loop
            loop.run_callback(self._arm)

    def _arm(self) -> None:
        # In the hub: start a watcher on each idle connection without one.
        self._scheduled = False
        pool = self._pool()
        if pool is None:
            return
        for slot in pool._core.idle:
            if not slot.watched:
                self._start(slot)

    def _start(self, slot: Slot) -> None:
        fd = _redispy.socket_fd(slot.raw)
        if fd is None:
            return  # disconnected: the readiness check at checkout catches it
        watcher = slot.watch
        if watcher is None or watcher.fd != fd:
            if watcher is not None:
                self.close(slot)
            watcher = slot.watch = self._loop.io(fd, _READ)
            self._watchers.add(watcher)
        watcher.start(self._readable, watcher)
        slot.watched = True

    def _readable(self, watcher: Any) -> None:
        # In the hub: EOF or unasked-for data on a connection nobody holds.
        watcher.stop()
        pool = self._pool()
        if pool is None:
            return
        core = pool._core
        for slot in core.idle:
            if slot.watch is watcher:
                slot.watched = False
                if core.reap(slot, "server_closed"):
                    logger.info("pool %r: the server closed an idle connection (or sent on it "
                                "unasked); closing it", pool.name)
                    pool._act()
                return
        # Not idle any more (a copy inherited over fork, say): nothing to do.

    def close(self, slot: Slot) -> None:
        """Stop and free *slot*'s watcher: its connection is closing."""
        stop(slot)
        watcher, slot.watch = slot.watch, None
        if watcher is not None:
            self._watchers.discard(watcher)
            watcher.close()


def stop(slot: Slot) -> None:
    """Stop *slot*'s watcher if it runs (a PING, a close). No system call:
    libev applies the change at its next iteration."""
    if slot.watched:
        slot.watched = False
        slot.watch.stop()


def take(slot: Slot) -> bool:
    """Stop *slot*'s watcher at checkout; False if it has an event pending.

    An event the hub has received but whose callback has not run yet (the
    server's FIN came in the same loop iteration as the reply that resumed
    this greenlet, as after ``CLIENT KILL``) means the connection is unfit,
    though the watch has not dropped it yet. Reading ``pending`` is no
    system call.
    """
    watcher = slot.watch
    pending = watcher.pending  # (stopping a watcher clears it)
    slot.watched = False
    watcher.stop()
    return not pending
