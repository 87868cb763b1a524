"""Pool statistics: live counters, and the frozen snapshot ``stats()`` returns.

The pool bumps plain integer attributes of :class:`Counters` on its hot
path (no locks, no metrics calls: under gevent only one greenlet runs at a
time); :meth:`Counters.snapshot` freezes them, with the pool's gauges, into
a :class:`PoolStats`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping

__all__ = ["PoolStats", "Counters", "CLOSE_REASONS"]

#: Why the pool closed a connection, the keys of :attr:`PoolStats.closed`.
CLOSE_REASONS = (
    "broken",  # released with its socket already closed (a failed command)
    "dirty",  # released owing replies, or after a misuse
    "idle",  # idle beyond min_idle for longer than idle_timeout
    "expired",  # older than max_lifetime
    "failed_check",  # dead or unexpected data at the checkout readiness check
    "server_closed",  # an idle connection turned readable: EOF or unasked-for data
    "abandoned",  # lent to a greenlet that died without releasing it
    "pool_closed",  # the pool was closed, or disconnect() was called
    "reconnect",  # redis-py asked for a reconnect (maintenance notifications)
    "stale",  # a subclass's reason: Sentinel closes connections to a former master
)


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's state and counters, from :meth:`stats`.

    Gauges (the state at the time of the call):

    :ivar name: the pool's name.
    :ivar max_connections: the pool's bound.
    :ivar size: connections that exist: idle + in use + being dialled.
    :ivar idle: connections ready in the pool.
    :ivar in_use: connections checked out by callers.
    :ivar dialling: connections being opened.
    :ivar waiting: callers waiting for a connection.

    Counters (since the pool was created, or since a fork):

    :ivar checkouts: connections handed out.
    :ivar waits: checkouts that had to wait.
    :ivar wait_time: total seconds callers spent waiting (including those
        that timed out).
    :ivar timeouts: callers that got :class:`~greenpool.PoolTimeout`.
    :ivar created: connections opened successfully.
    :ivar dial_errors: attempts to open a connection that failed.
    :ivar closed: connections closed by the pool, by reason (see
        :data:`CLOSE_REASONS`).
    :ivar leaks: connections reported as held longer than
        ``leak_detection_threshold``.
    :ivar pings: keepalive PINGs sent to idle connections.
    :ivar misuses: releases of a connection the pool did not lend out.
    :ivar rejected: callers refused at once because ``max_waiters`` callers
        already waited for a busy connection.
    """

    name: str
    max_connections: int
    size: int
    idle: int
    in_use: int
    dialling: int
    waiting: int
    checkouts: int
    waits: int
    wait_time: float
    timeouts: int
    created: int
    dial_errors: int
    closed: Mapping[str, int] = field(default_factory=dict)
    leaks: int = 0
    pings: int = 0
    misuses: int = 0
    rejected: int = 0

    def as_dict(self) -> Dict[str, Any]:
        """The snapshot as a plain dict (``closed`` as a nested dict)."""
        return asdict(self)


class Counters:
    """The mutable counters behind :class:`PoolStats`."""

    __slots__ = (
        "checkouts",
        "waits",
        "wait_time",
        "timeouts",
        "created",
        "dial_errors",
        "closed",
        "leaks",
        "pings",
        "misuses",
        "rejected",
    )

    def __init__(self) -> None:
        self.checkouts = 0
        self.waits = 0
        self.wait_time = 0.0
        self.timeouts = 0
        self.created = 0
        self.dial_errors = 0
        self.closed: Dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self.leaks = 0
        self.pings = 0
        self.misuses = 0
        self.rejected = 0

    def snapshot(self, **gauges: Any) -> PoolStats:
        """Freeze the counters together with the pool's *gauges*."""
        return PoolStats(
            checkouts=self.checkouts,
            waits=self.waits,
            wait_time=self.wait_time,
            timeouts=self.timeouts,
            created=self.created,
            dial_errors=self.dial_errors,
            closed=dict(self.closed),
            leaks=self.leaks,
            pings=self.pings,
            misuses=self.misuses,
            rejected=self.rejected,
            **gauges,
        )
