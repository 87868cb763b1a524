"""The pool's bookkeeping records: a connection it owns, a caller it queues,
a dial in flight."""

from __future__ import annotations

import traceback
from typing import Any, Optional

from gevent.hub import Waiter

__all__ = ["Slot", "Queued", "DialTicket", "LENT"]

#: Slot.holder of a connection that is not waiting for its waiter to run,
#: when leak detection is off (with it on, the holder greenlet).
LENT = "lent"


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
        # None only while handed to a waiter that has not run yet (a second
        # release then is a misuse); else LENT, or with leak detection on
        # the greenlet that last took it.
        self.holder: Any = LENT
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


class DialTicket:
    """One dial's claim on a slot, settled exactly once (see _settle)."""

    __slots__ = ("generation", "settled")

    def __init__(self, generation: object) -> None:
        self.generation = generation
        self.settled = False
