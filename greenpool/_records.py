"""The pool's bookkeeping records: a connection it owns, a caller it queues."""

from __future__ import annotations

import traceback
from typing import Any, Optional

from gevent.hub import Waiter

__all__ = ["Slot", "Queued"]


class Slot:
    """One connection the pool owns, with its bookkeeping."""

    __slots__ = (
        "conn",
        "raw",
        "created_at",
        "expires_at",
        "idle_since",
        "holder",
        "lent_at",
        "stack",
        "leak_reported",
        "discard",
    )

    def __init__(self, conn: Any, now: float, expires_at: float) -> None:
        self.conn = conn
        # The connection that talks to the socket (redis-py's client-side
        # cache wraps it in a proxy).
        self.raw = getattr(conn, "_conn", conn)
        self.created_at = now
        self.expires_at = expires_at
        self.idle_since = now
        # None while idle or handed to a waiter that has not run yet; once
        # lent, the pool's LENT marker, or the holder greenlet when leak
        # detection is on.
        self.holder: Any = None
        self.lent_at = now
        self.stack: Optional[traceback.StackSummary] = None
        self.leak_reported = False
        self.discard = False  # close on release (after disconnect())


class Queued:
    """A caller queued for a connection."""

    __slots__ = ("waiter", "slot", "error", "cancelled")

    def __init__(self) -> None:
        self.waiter = Waiter()
        self.slot: Optional[Slot] = None
        self.error: Optional[BaseException] = None
        self.cancelled = False

    def wake(self) -> None:
        # Waiter.switch may only run in the hub: schedule it. If the caller
        # has already woken (its timer fired) the late switch is a no-op.
        self.waiter.hub.loop.run_callback(self.waiter.switch, None)
