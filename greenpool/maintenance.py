"""The pool's background greenlet: reaping, lifetimes, min_idle, pings, leaks.

Split three ways so tests can drive it with a fake clock and never sleep:

- *decide* (:func:`plan`): under the pool's bookkeeping (no yield), pick the
  idle connections to close or ping, the dials needed for ``min_idle`` and
  the leaks to report. A pure function of the pool's state and ``now``.
- *act* (:func:`run_once`): close, ping and dial outside the decision.
- *schedule* (:class:`Maintenance`): a greenlet that only loops and waits.

The greenlet is started on the pool's first dial (never at import or
construction), named after the pool, holds the pool by weakref so a
forgotten pool is collected, waits on an unreferenced timer so it never keeps
a hub alive, stops at once when the pool closes, and catches ``Exception``
but never ``BaseException`` so ``kill()`` works. After a fork the child's
pool starts a new one on its first dial.
"""

from __future__ import annotations

import logging
import traceback
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional

import gevent
import redis
from gevent.hub import Waiter, get_hub

if TYPE_CHECKING:  # pragma: no cover
    from ._records import Slot as _Slot
    from .pool import BlockingConnectionPool

__all__ = ["Plan", "plan", "run_once", "period", "Maintenance", "start"]

logger = logging.getLogger("greenpool")

#: Seconds a keepalive PING may wait for its reply.
_PING_TIMEOUT = 5.0

#: Bounds on the time between two maintenance runs, in seconds.
_MIN_PERIOD = 0.05
_MAX_PERIOD = 30.0


@dataclass
class Plan:
    """What one maintenance run will do."""

    close_idle: List["_Slot"] = field(default_factory=list)  # beyond min_idle, idle too long
    close_expired: List["_Slot"] = field(default_factory=list)  # past max_lifetime
    ping: List["_Slot"] = field(default_factory=list)  # idle past keepalive_ping_interval
    leaks: List["_Slot"] = field(default_factory=list)  # held past the leak threshold
    dials: int = 0  # to bring the pool up to min_idle


def plan(pool: "BlockingConnectionPool", now: float) -> Plan:
    """Decide, without I/O or yielding, what maintenance is due at *now*.

    The chosen idle connections are removed from the idle set, so no caller
    can be lent one while it is being closed or pinged.
    """
    opts = pool.options
    result = Plan()
    if pool._closed:
        return result
    idle_timeout = opts["idle_timeout"]
    ping_interval = opts["keepalive_ping_interval"]
    min_idle = opts["min_idle"]
    keep: List["_Slot"] = []
    # Oldest-idle first, so the connections kept for min_idle are the
    # freshest and those reaped are the stalest.
    for slot in sorted(pool._idle, key=lambda s: s.idle_since):
        removable = len(pool._idle) - len(result.close_idle) - len(result.close_expired) > min_idle
        if now >= slot.expires_at:
            result.close_expired.append(slot)
        elif removable and idle_timeout is not None and now - slot.idle_since >= idle_timeout:
            result.close_idle.append(slot)
        elif ping_interval is not None and now - max(slot.idle_since, slot.lent_at) >= ping_interval:
            result.ping.append(slot)
        else:
            keep.append(slot)
    keep.sort(key=lambda s: s.idle_since)  # LIFO order: most recently used last
    pool._idle[:] = keep
    threshold = opts["leak_detection_threshold"]
    if threshold is not None:
        for slot in pool._in_use.values():
            if not slot.leak_reported and slot.holder is not None and now - slot.lent_at >= threshold:
                slot.leak_reported = True
                result.leaks.append(slot)
    # Expired connections are replaced: count them as gone.
    remaining = pool._size() - len(result.close_expired)
    wanted = min(min_idle, pool.max_connections) - (len(keep) + len(result.ping) + pool._dialling)
    result.dials = max(0, min(wanted, pool.max_connections - remaining))
    return result


def run_once(pool: "BlockingConnectionPool", now: Optional[float] = None) -> Plan:
    """Decide and act: one maintenance run. Returns what it decided."""
    if now is None:
        now = pool._clock()
    if pool._orphans:
        orphans, pool._orphans = pool._orphans, []
        for conn in orphans:
            # A connection inherited over fork: redis-py skips shutdown() when
            # the pid differs, so this only closes the child's copy of the fd.
            conn.disconnect()
    decided = plan(pool, now)
    for slot in decided.close_expired:
        pool._close_slot(slot, "expired")
    for slot in decided.close_idle:
        pool._close_slot(slot, "idle")
    for slot in decided.leaks:
        _report_leak(pool, slot, now)
    for _ in range(decided.dials):
        pool._start_dial()
    for slot in decided.ping:
        _ping(pool, slot)
    if decided.close_expired or decided.close_idle:
        pool._grow()
    return decided


def _ping(pool: "BlockingConnectionPool", slot: "_Slot") -> None:
    idle_since = slot.idle_since
    pool._in_use[slot.conn] = slot
    slot.holder = gevent.getcurrent()
    # Our own bound, so a silent peer cannot stall maintenance for ever (the
    # connection may have no socket_timeout); redis-py closes the connection
    # when the Timeout interrupts the read.
    timeout = gevent.Timeout(_PING_TIMEOUT, redis.exceptions.TimeoutError(
        f"keepalive PING got no reply within {_PING_TIMEOUT:g} s"))
    timeout.start()
    try:
        slot.conn.send_command("PING", check_health=False)
        slot.conn.read_response()
    except Exception as exc:  # redis-py disconnected it; release retires it
        logger.info("pool %r: keepalive PING failed, closing the connection: %s", pool.name, exc)
    finally:
        # Even if this greenlet is killed mid-PING: the slot goes back.
        timeout.close()
        slot.lent_at = pool._clock()
        pool.release(slot.conn)
        pool._counters.pings += 1
    if slot in pool._idle:
        # A keepalive ping is not a use: it must not defer idle reaping.
        slot.idle_since = idle_since


def _report_leak(pool: "BlockingConnectionPool", slot: "_Slot", now: float) -> None:
    pool._counters.leaks += 1
    checkout = "".join(traceback.format_list(slot.stack or []))
    holder = slot.holder
    frame = getattr(holder, "gr_frame", None)
    current = "".join(traceback.format_stack(frame)) if frame is not None else "(not running)\n"
    logger.warning(
        "pool %r: connection %r held for %.1f s (leak_detection_threshold=%s) by %r\n"
        "checked out at:\n%sholder is now at:\n%s",
        pool.name,
        slot.conn,
        now - slot.lent_at,
        pool.options["leak_detection_threshold"],
        holder,
        checkout,
        current,
    )


def period(options: dict) -> float:
    """Seconds between maintenance runs for a pool's *options*."""
    candidates = [
        options.get(key)
        for key in ("idle_timeout", "keepalive_ping_interval", "leak_detection_threshold", "max_lifetime")
    ]
    shortest = min([c for c in candidates if c], default=_MAX_PERIOD * 4)
    return min(_MAX_PERIOD, max(_MIN_PERIOD, shortest / 4))


class Maintenance:
    """Owns the greenlet that runs :func:`run_once` every :func:`period`."""

    def __init__(self, pool: "BlockingConnectionPool") -> None:
        self._pool_ref = weakref.ref(pool)
        self._period = period(pool.options)
        self._stopped = False
        self._waiter: Optional[Waiter] = None
        self.greenlet = gevent.spawn(self._run)
        self.greenlet.name = f"{pool.name}-maintenance"

    def _run(self) -> None:
        while not self._stopped:
            pool = self._pool_ref()
            if pool is None or pool._closed:
                return
            try:
                run_once(pool)
            except Exception:
                logger.exception("pool %r: maintenance run failed", pool.name)
            del pool  # hold the pool only while working on it
            self._sleep(self._period)

    def _sleep(self, seconds: float) -> None:
        waiter = self._waiter = Waiter()
        # ref=False: the maintenance timer alone never keeps the hub alive.
        timer = get_hub().loop.timer(seconds, ref=False)
        timer.start(waiter.switch, None)
        try:
            waiter.get()
        finally:
            timer.close()
            self._waiter = None

    def wake(self) -> None:
        """Run maintenance now (used after settings change and by close)."""
        waiter = self._waiter
        if waiter is not None:
            waiter.hub.loop.run_callback(waiter.switch, None)

    def stop(self) -> None:
        """Stop the greenlet at its next wait, which is now if it is waiting."""
        self._stopped = True
        self.wake()


def start(pool: "BlockingConnectionPool") -> Maintenance:
    """Start the maintenance greenlet of *pool*."""
    return Maintenance(pool)
