"""The pool's background greenlet: reaping, lifetimes, min_idle, pings, leaks.

Split three ways so tests can drive it with a fake clock and never sleep:

- *decide* (:func:`plan`): pick the idle connections to close or ping, the
  dials needed for ``min_idle`` and the leaks to report: a pure function of
  a frozen :class:`Snapshot` of the core, ``now`` and the settings.
- *act* (:func:`run_once`): apply the plan through the core (which moves
  each chosen slot out of the idle set first, so no caller is lent one
  being closed or pinged), then close, dial and ping.
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
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Tuple

import gevent
import redis
from gevent.hub import Waiter, get_hub

from . import _redispy, _watch
from .core import LENT

if TYPE_CHECKING:  # pragma: no cover
    from .core import PoolCore, Slot
    from .pool import BlockingConnectionPool

__all__ = ["SlotView", "Snapshot", "snapshot", "Plan", "plan", "run_once", "period", "Maintenance", "start"]

logger = logging.getLogger("greenpool")

#: Seconds a keepalive PING may wait for its reply.
_PING_TIMEOUT = 5.0

#: Bounds on the time between two maintenance runs, in seconds.
_MIN_PERIOD = 0.05
_MAX_PERIOD = 30.0


@dataclass(frozen=True)
class SlotView:
    """What maintenance needs to know of one connection, frozen."""

    slot: "Slot"
    idle_since: float
    expires_at: float
    lent_at: float
    leak_reported: bool


@dataclass(frozen=True)
class Snapshot:
    """The pool's state as maintenance sees it, at one instant."""

    idle: Tuple[SlotView, ...]  # oldest-idle first
    lent: Tuple[SlotView, ...]  # LENT slots only
    size: int
    dialling: int
    max_connections: int
    closed: bool


def snapshot(core: "PoolCore") -> Snapshot:
    """Freeze what :func:`plan` reads of *core*."""

    def view(slot: "Slot") -> SlotView:
        return SlotView(slot, slot.idle_since, slot.expires_at, slot.lent_at, slot.leak_reported)

    return Snapshot(
        idle=tuple(view(s) for s in sorted(core.idle, key=lambda s: s.idle_since)),
        lent=tuple(view(s) for s in core.out.values() if s.state is LENT),
        size=core.size,
        dialling=core.dialling,
        max_connections=core.max_connections,
        closed=core.closed_flag,
    )


@dataclass
class Plan:
    """What one maintenance run will do."""

    close_idle: List["Slot"] = field(default_factory=list)  # beyond min_idle, idle too long
    close_expired: List["Slot"] = field(default_factory=list)  # past max_lifetime
    ping: List["Slot"] = field(default_factory=list)  # idle past keepalive_ping_interval
    leaks: List["Slot"] = field(default_factory=list)  # held past the leak threshold
    dials: int = 0  # to bring the pool up to min_idle, within max_connections


def plan(snap: Snapshot, now: float, options: Mapping[str, Any]) -> Plan:
    """Decide what maintenance is due at *now*: a pure function of its arguments.

    *options* are the pool's settings (``idle_timeout``, ``min_idle``,
    ``keepalive_ping_interval``, ``leak_detection_threshold``).
    """
    result = Plan()
    if snap.closed:
        return result
    idle_timeout = options["idle_timeout"]
    ping_interval = options["keepalive_ping_interval"]
    min_idle = options["min_idle"]
    # Oldest-idle first, so the connections kept for min_idle are the
    # freshest and those reaped are the stalest.
    for view in snap.idle:
        closing = len(result.close_idle) + len(result.close_expired)
        removable = len(snap.idle) - closing > min_idle
        if now >= view.expires_at:
            result.close_expired.append(view.slot)
        elif removable and idle_timeout is not None and now - view.idle_since >= idle_timeout:
            result.close_idle.append(view.slot)
        elif ping_interval is not None and now - max(view.idle_since, view.lent_at) >= ping_interval:
            result.ping.append(view.slot)
    threshold = options["leak_detection_threshold"]
    if threshold is not None:
        result.leaks = [
            v.slot for v in snap.lent if not v.leak_reported and now - v.lent_at >= threshold
        ]
    # After the closes: the idle connections left (pinged ones come back)
    # plus dials in flight should reach min_idle, and the pool must stay
    # within its bound. Every closed connection leaves the size once.
    closes = len(result.close_idle) + len(result.close_expired)
    kept = len(snap.idle) - closes
    room = snap.max_connections - (snap.size - closes)
    wanted = min(min_idle, snap.max_connections) - kept - snap.dialling
    result.dials = max(0, min(wanted, room))
    return result


def run_once(pool: "BlockingConnectionPool", now: Optional[float] = None) -> Plan:
    """Decide and act: one maintenance run. Returns what it decided."""
    if now is None:
        now = pool._clock()
    if pool._orphans:
        orphans, pool._orphans = pool._orphans, []
        for conn in orphans:
            # A connection inherited over fork, its fd already pointed at
            # /dev/null here: this closes the child's copy only.
            conn.disconnect()
    pool._reclaim_abandoned()
    core = pool._core
    decided = plan(snapshot(core), now, pool.options)
    for slot in decided.close_expired:
        core.reap(slot, "expired")
    for slot in decided.close_idle:
        core.reap(slot, "idle")
    for slot in decided.leaks:
        if core.report_leak(slot):
            _report_leak(pool, slot, now)
    pool._act()  # the closes, before the dials that replace them
    core.fill(decided.dials)
    pool._act()
    for slot in decided.ping:
        if core.begin_ping(slot):
            _watch.stop(slot)  # its PING's reply is no stranger's data
            _ping(pool, slot)
    return decided


def _ping(pool: "BlockingConnectionPool", slot: "Slot") -> None:
    # Our own bound, so a silent peer cannot stall maintenance for ever (the
    # connection may have no socket_timeout); redis-py closes the connection
    # when the Timeout interrupts the read.
    timeout = gevent.Timeout(_PING_TIMEOUT, redis.exceptions.TimeoutError(
        f"keepalive PING got no reply within {_PING_TIMEOUT:g} s"))
    timeout.start()
    try:
        slot.conn.send_command("PING", check_health=False)
        slot.conn.read_response()
    except Exception as exc:  # redis-py disconnected it; ping_done closes it
        logger.info("pool %r: keepalive PING failed, closing the connection: %s", pool.name, exc)
    finally:
        # Even if this greenlet is killed mid-PING: the slot goes back.
        timeout.close()
        pool._core.ping_done(slot, _redispy.retire_reason(slot.raw))
        pool._act()


def _report_leak(pool: "BlockingConnectionPool", slot: "Slot", now: float) -> None:
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
            if pool is None or pool.closed:
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

    def abandon(self) -> None:
        """In a forked child: the greenlet's copy exits whenever it wakes.

        (No hub calls: this runs inside ``os.fork()``.)
        """
        self._stopped = True


def start(pool: "BlockingConnectionPool") -> Maintenance:
    """Start the maintenance greenlet of *pool*."""
    return Maintenance(pool)
