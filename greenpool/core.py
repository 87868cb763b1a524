"""The pool's core: every change of pool state, and no I/O.

The core knows nothing of gevent, sockets or redis-py. It owns the slots
(one per connection), the wait queue, the dials in flight and the counters,
and every transition between them happens in one of its methods. What a
transition requires of the outside world (close a connection, open one,
wake a waiting caller, report a leak) it appends to :attr:`PoolCore.outbox`
as an action; the shell (:mod:`greenpool.pool`) carries the actions out and
reports back (:meth:`~PoolCore.closed`, :meth:`~PoolCore.dial_done` ...).
No method yields, so under gevent each one is atomic.

A slot's life; every transition is one method, and :meth:`~PoolCore.check`
asserts the invariants between them::

    from      method                            to
    --------  --------------------------------  -------------------------------
    (dial)    dial_done                         HANDED if a caller waits, else IDLE
    IDLE      lend, lend_any                    LENT (used within validation_window)
    IDLE      lend_any                          CHECKING (older: the shell checks it)
    IDLE      begin_ping                        CHECKING (the shell PINGs it)
    IDLE      lend_any (expired), reap,         CLOSING
              disconnect, close
    CHECKING  checked                           LENT, or CLOSING if the check failed
    CHECKING  ping_done                         HANDED, IDLE, or CLOSING
    LENT      release                           HANDED, IDLE, or CLOSING (a reason)
    HANDED    claim (the waiter runs)           LENT
    HANDED    cancel (the waiter died first)    HANDED to the next waiter, or IDLE
    CLOSING   closed (the shell closed it)      CLOSED

HANDED is a connection given to a waiter whose greenlet has not run yet:
nobody may use it, and if the waiter dies before it runs the connection
passes to the next waiter. CLOSING slots still count toward
``max_connections`` until the shell has closed them.

Generations: :meth:`~PoolCore.fork_reset` starts a new generation in a
forked child. Every request, dial ticket and slot records the generation it
began in, and the core ignores anything of an older one: a parent's waiter,
dial or connection copied into the child can neither change the child's
counters nor receive one of its connections, nor give it one of the parent's.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

from .stats import Counters

__all__ = [
    "PoolCore", "Slot", "Request", "DialTicket",
    "IDLE", "LENT", "HANDED", "CHECKING", "CLOSING", "CLOSED",
    "WAITING", "SERVED", "FAILED", "GONE",
    "CLOSE", "DIAL", "WAKE",
    "REFUSED_CLOSED", "REFUSED_WAITERS", "REFUSED_TIMEOUT",
]

# Slot states.
IDLE = "idle"
LENT = "lent"
HANDED = "handed"  # to a waiter whose greenlet has not run yet
CHECKING = "checking"  # out of the idle set for a readiness check or a PING
CLOSING = "closing"  # chosen to close; the shell has not closed it yet
CLOSED = "closed"

# Request (waiter) states.
WAITING = "waiting"
SERVED = "served"  # a slot was handed to it
FAILED = "failed"  # an error was handed to it
GONE = "gone"  # timed out, killed, or served and passed on

# Actions, appended to PoolCore.outbox as (kind, record) pairs.
CLOSE = "close"  # close slot.conn, then call closed(slot)
DIAL = "dial"  # open a connection, then call dial_done/dial_failed(ticket, ...)
WAKE = "wake"  # resume the request's waiting greenlet

# Why admit() refused a caller.
REFUSED_CLOSED = "closed"
REFUSED_WAITERS = "too_many_waiters"
REFUSED_TIMEOUT = "timeout"

#: Negative jitter on max_lifetime, as a fraction, so connections opened
#: together are not all replaced together.
LIFETIME_JITTER = 0.1


class Slot:
    """One connection the pool owns, and its bookkeeping."""

    __slots__ = (
        "conn", "raw", "generation", "state", "created_at", "expires_at",
        "idle_since", "lent_at", "retire", "reason", "holder", "stack", "leak_reported",
        "watch", "watched",
    )

    def __init__(self, conn: Any, raw: Any, generation: int, now: float, expires_at: float) -> None:
        self.conn = conn  #: what callers get
        self.raw = raw  #: what talks to the socket (the shell's business)
        self.generation = generation
        self.state = IDLE
        self.created_at = now
        self.expires_at = expires_at
        self.idle_since = now
        self.lent_at = now
        #: A reason to close it when it comes back (set by close/disconnect).
        self.retire: Optional[str] = None
        #: Why it is CLOSING or CLOSED (a key of PoolStats.closed).
        self.reason: Optional[str] = None
        # Leak detection, written by the shell: who took it, and where.
        self.holder: Any = None
        self.stack: Any = None
        self.leak_reported = False
        # The hub's read watcher while it is idle (greenpool._watch), the shell's.
        self.watch: Any = None
        self.watched = False

    def __repr__(self) -> str:
        return f"<Slot {self.state} {self.conn!r}>"


class Request:
    """A caller queued for a connection."""

    __slots__ = ("generation", "state", "since", "slot", "error", "waiter")

    def __init__(self, generation: int, since: float) -> None:
        self.generation = generation
        self.state = WAITING
        self.since = since
        self.slot: Optional[Slot] = None
        self.error: Optional[BaseException] = None
        #: The shell's means of waking the caller (a gevent Waiter).
        self.waiter: Any = None


class DialTicket:
    """One dial's claim on a slot, settled exactly once."""

    __slots__ = ("generation", "settled")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.settled = False


class PoolCore:
    """The state of one pool and every transition of it.

    :param max_connections: the bound on idle + out + closing + dialling.
    :param clock: a monotonic clock (seconds).
    :param max_waiters: how many callers may wait for a *busy* connection
        (callers the pool can open a connection for do not count);
        ``None`` for no limit.
    :param dial_limit: dials in flight at once for waiting callers.
    :param validation_window: an idle connection used more recently than
        this is lent without a readiness check.
    :param max_lifetime: seconds a connection may live (``inf``: no limit).
    :param rand: a ``random()`` for the lifetime jitter (tests fix it).
    """

    def __init__(
        self,
        max_connections: int,
        *,
        clock: Callable[[], float],
        max_waiters: Optional[int] = None,
        dial_limit: int = 1,
        validation_window: float = 0.5,
        max_lifetime: float = math.inf,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.max_connections = max_connections
        self.clock = clock
        self.max_waiters = max_waiters
        self.dial_limit = dial_limit
        self.validation_window = validation_window
        self.max_lifetime = max_lifetime
        self.rand = rand
        self.generation = 0
        self.closed_flag = False
        self._reset_state()

    def _reset_state(self) -> None:
        self.idle: List[Slot] = []  # IDLE, LIFO: the most recently used last
        self.out: Dict[Any, Slot] = {}  # LENT, HANDED and CHECKING, by connection
        # Live waiters only, oldest first: a departing waiter is removed in
        # O(1), so timed-out waiters cost nothing while connections stay held.
        self.queue: "OrderedDict[Request, None]" = OrderedDict()
        self.dialling = 0
        self.closing = 0
        self.last_dial_error: Optional[BaseException] = None
        self.counters = Counters()
        #: Actions for the shell, in order; it empties the list as it acts.
        self.outbox: List[Tuple[str, Any]] = []

    # -- gauges ------------------------------------------------------------

    @property
    def size(self) -> int:
        """Connections that exist or are being opened."""
        return len(self.idle) + len(self.out) + self.closing + self.dialling

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def openable(self) -> int:
        """Connections the pool could still open, counting dials in flight."""
        return self.max_connections - len(self.idle) - len(self.out) - self.closing

    # -- checkout ------------------------------------------------------------

    def lend(self) -> Optional[Slot]:
        """The hot path: the most recently used idle connection, LENT, if it
        was used within ``validation_window``; else None (then call
        :meth:`lend_any`). Nobody waits while a connection is idle (an
        invariant :meth:`check` asserts), so no caller is passed over."""
        idle = self.idle
        if idle:
            slot = idle[-1]
            now = self.clock()
            if now - slot.idle_since <= self.validation_window:
                idle.pop()
                self.out[slot.conn] = slot
                slot.state = LENT
                slot.lent_at = now
                self.counters.checkouts += 1
                return slot
        return None

    def lend_any(self) -> Optional[Slot]:
        """An idle connection for a caller nobody waits ahead of, or None.

        Expired ones close on the way. The slot returned is LENT, or
        CHECKING when it was idle longer than ``validation_window``: the
        shell checks it and calls :meth:`checked`.
        """
        idle = self.idle
        while idle:
            slot = idle.pop()
            now = self.clock()
            if now >= slot.expires_at:
                self._close(slot, "expired")
                continue
            self.out[slot.conn] = slot
            if now - slot.idle_since <= self.validation_window:
                slot.state = LENT
                slot.lent_at = now
                self.counters.checkouts += 1
            else:
                slot.state = CHECKING
            return slot
        return None

    def checked(self, slot: Slot, ok: bool) -> bool:
        """The readiness check of a slot :meth:`lend_any` returned: lend it if *ok*."""
        self._expect(slot, CHECKING)
        if ok:
            slot.state = LENT
            slot.lent_at = self.clock()
            self.counters.checkouts += 1
            return True
        del self.out[slot.conn]
        self._close(slot, "failed_check")
        return False

    def admit(self, zero_timeout: bool = False) -> Any:
        """Queue a caller that :meth:`lend` could not serve.

        Returns a :class:`Request`, or one of the ``REFUSED_*`` reasons.
        A caller the pool can open a connection for is never refused for
        ``max_waiters``; with *zero_timeout* a caller is queued only if a
        connection can be opened for it.
        """
        if self.closed_flag:
            return REFUSED_CLOSED
        ahead = len(self.queue)
        if self.max_waiters is not None and ahead - self.openable() >= self.max_waiters:
            self.counters.rejected += 1
            return REFUSED_WAITERS
        if zero_timeout and ahead >= self.openable():
            self.counters.timeouts += 1
            return REFUSED_TIMEOUT
        request = Request(self.generation, self.clock())
        self.queue[request] = None
        self.counters.waits += 1
        self._grow()
        return request

    def claim(self, request: Request) -> Slot:
        """The waiter of a SERVED request runs: its slot becomes LENT."""
        slot = request.slot
        assert request.state is SERVED and slot is not None, request.state
        self._expect(slot, HANDED)
        request.state = GONE
        request.slot = None
        now = self.clock()
        slot.state = LENT
        slot.lent_at = now
        self.counters.checkouts += 1
        self.counters.wait_time += now - request.since
        return slot

    def cancel(self, request: Request, *, timed_out: bool) -> None:
        """The caller of *request* stops waiting: its timer fired, or it was killed.

        A connection handed to it that it never took passes to the next
        waiter. Requests of an older generation change nothing.
        """
        if request.generation != self.generation:
            return
        state = request.state
        if state is WAITING:
            del self.queue[request]
            request.state = GONE
            self.counters.wait_time += self.clock() - request.since
            if timed_out:
                self.counters.timeouts += 1
        elif state is SERVED:
            slot = request.slot
            assert slot is not None
            request.state = GONE
            request.slot = None
            self._expect(slot, HANDED)
            del self.out[slot.conn]
            self._give_back(slot, None)
        elif state is FAILED:
            request.state = GONE

    # -- release -------------------------------------------------------------

    def release(self, slot: Slot, reason: Optional[str] = None) -> Optional[str]:
        """Take back a slot of :attr:`out`; *reason*, if any, closes it.

        Returns None, or what was wrong with the release (it then changes
        nothing but the ``misuses`` counter).
        """
        if slot.state is not LENT:
            return self._misuse(slot.conn, slot)
        del self.out[slot.conn]
        now = self.clock()
        if reason is None and slot.retire is None and now < slot.expires_at and not self.queue:
            # The hot path, inlined.
            slot.state = IDLE
            slot.idle_since = now
            self.idle.append(slot)
            return None
        self._give_back(slot, reason)
        return None

    def release_unknown(self, connection: Any) -> str:
        """A release of a connection not in :attr:`out`: a misuse, described."""
        return self._misuse(connection, None)

    def _give_back(self, slot: Slot, reason: Optional[str]) -> None:
        now = self.clock()
        if reason is None:
            if slot.retire is not None:
                reason = slot.retire
            elif now >= slot.expires_at:
                reason = "expired"
        if reason is not None:
            self._close(slot, reason)
        else:
            self._give(slot, now)

    def _give(self, slot: Slot, idle_since: float) -> None:
        """A connection nobody holds goes to the oldest waiter, else idle."""
        if self.queue:
            request = self.queue.popitem(last=False)[0]
            request.state = SERVED
            request.slot = slot
            slot.state = HANDED
            self.out[slot.conn] = slot
            self.outbox.append((WAKE, request))
        else:
            slot.state = IDLE
            slot.idle_since = idle_since
            self.idle.append(slot)

    def _misuse(self, connection: Any, slot: Optional[Slot]) -> str:
        self.counters.misuses += 1
        if slot is not None:
            if slot.state is HANDED:
                return "released twice (it was already handed to another caller)"
            return "released while the pool checks it"
        if any(s.conn is connection for s in self.idle):
            return "released twice (it is already idle)"
        return "not lent out by this pool"

    # -- closing -------------------------------------------------------------

    def _close(self, slot: Slot, reason: str) -> None:
        slot.state = CLOSING
        slot.reason = reason
        self.closing += 1
        self.outbox.append((CLOSE, slot))

    def closed(self, slot: Slot) -> None:
        """The shell closed a CLOSING slot's connection."""
        if slot.generation != self.generation:
            return
        self._expect(slot, CLOSING)
        slot.state = CLOSED
        self.closing -= 1
        assert slot.reason is not None
        self.counters.closed[slot.reason] += 1
        self._grow()

    def disconnect(self, in_use: bool = True) -> None:
        """Close idle connections now; with *in_use*, those out when they return."""
        idle, self.idle = self.idle, []
        for slot in idle:
            self._close(slot, "pool_closed")
        if in_use:
            for slot in self.out.values():
                slot.retire = "pool_closed"
        self._grow()

    def close(self, error: Callable[[], BaseException]) -> None:
        """Close the pool: every waiter gets ``error()``, idle slots close,
        those out close when they come back; no dial starts from now on."""
        if self.closed_flag:
            return
        self.closed_flag = True
        while self.queue:
            self._fail_oldest(error())
        self.disconnect(in_use=True)

    def _fail_oldest(self, error: BaseException) -> None:
        request = self.queue.popitem(last=False)[0]
        request.state = FAILED
        request.error = error
        self.outbox.append((WAKE, request))

    # -- dials ---------------------------------------------------------------

    def _grow(self) -> None:
        """Start dials for waiters that dials in flight will not serve."""
        while (
            len(self.queue) > self.dialling
            and self.dialling < self.dial_limit
            and self.size < self.max_connections
            and not self.closed_flag
        ):
            self._start_dial()

    def _start_dial(self) -> None:
        # The one place a dial starts: the caller has checked the bound.
        self.dialling += 1
        self.outbox.append((DIAL, DialTicket(self.generation)))

    def fill(self, dials: int) -> int:
        """Start up to *dials* dials (for ``min_idle``) within the bound."""
        started = 0
        while started < dials and self.size < self.max_connections and not self.closed_flag:
            self._start_dial()
            started += 1
        return started

    def _settle(self, ticket: DialTicket) -> bool:
        if ticket.settled or ticket.generation != self.generation:
            ticket.settled = True
            return False
        ticket.settled = True
        self.dialling -= 1
        return True

    def dial_done(self, ticket: DialTicket, conn: Any, raw: Any) -> Optional[Slot]:
        """A dial opened *conn*; None means the shell must close it unused."""
        if not self._settle(ticket):
            return None
        now = self.clock()
        self.counters.created += 1
        self.last_dial_error = None
        lifetime = self.max_lifetime * (1 - LIFETIME_JITTER * self.rand())
        slot = Slot(conn, raw, self.generation, now, now + lifetime)
        if self.closed_flag:
            self._close(slot, "pool_closed")
        else:
            self._give(slot, now)
            self._grow()
        return slot

    def dial_failed(self, ticket: DialTicket, error: Optional[BaseException]) -> None:
        """A dial failed with *error* (None: it was killed, nobody's error).

        The oldest waiter gets the error at once rather than waiting out
        its timeout.
        """
        if not self._settle(ticket):
            return
        if error is not None:
            self.counters.dial_errors += 1
            self.last_dial_error = error
            if self.queue:
                self._fail_oldest(error)
        self._grow()

    # -- maintenance ---------------------------------------------------------

    def begin_ping(self, slot: Slot) -> bool:
        """Take an IDLE slot out for a keepalive PING; False if it is not idle."""
        if slot.state is not IDLE or slot.generation != self.generation:
            return False
        self.idle.remove(slot)
        slot.state = CHECKING
        self.out[slot.conn] = slot
        return True

    def ping_done(self, slot: Slot, reason: Optional[str]) -> None:
        """The PING of a slot ended; *reason*, if any, closes it.

        A PING is not a use: the connection keeps its idle time, and
        ``lent_at`` records the PING for the next one's schedule.
        """
        if slot.generation != self.generation:
            return
        self._expect(slot, CHECKING)
        del self.out[slot.conn]
        self.counters.pings += 1
        slot.lent_at = self.clock()
        if reason is None and slot.retire is not None:
            reason = slot.retire
        if reason is not None:
            self._close(slot, reason)
        else:
            self._give(slot, slot.idle_since)

    def reap(self, slot: Slot, reason: str) -> bool:
        """Close an IDLE slot (idle too long, or expired); False if not idle."""
        if slot.state is not IDLE or slot.generation != self.generation:
            return False
        self.idle.remove(slot)
        self._close(slot, reason)
        return True

    def report_leak(self, slot: Slot) -> bool:
        """Mark a LENT slot as reported held too long; False if already done."""
        if slot.state is not LENT or slot.leak_reported:
            return False
        slot.leak_reported = True
        self.counters.leaks += 1
        return True

    # -- fork ----------------------------------------------------------------

    def fork_reset(self) -> Tuple[List[Slot], List[Request]]:
        """In a forked child: start a new generation, empty and at full capacity.

        Returns the parent's slots, whose sockets the shell must keep from
        being used here (and whose fds it closes later), and the parent's
        waiters (queued, or served but not yet run), which the shell wakes
        so that they start again in the new generation.
        """
        inherited = self.idle + list(self.out.values())
        # A WAKE still in the outbox has not been scheduled (the shell empties
        # the outbox before any yield, so this is for completeness).
        requests = list(self.queue) + [item for kind, item in self.outbox if kind is WAKE]
        self.generation += 1
        self._reset_state()
        return inherited, requests

    # -- checks ----------------------------------------------------------------

    def _expect(self, slot: Slot, state: str) -> None:
        if slot.state is not state:
            raise AssertionError(f"slot {slot!r} is {slot.state}, expected {state}")

    def check(self) -> None:
        """Assert every invariant of the state; tests call it at every step."""
        idle_conns = [s.conn for s in self.idle]
        assert len(set(map(id, idle_conns))) == len(idle_conns), "a connection is idle twice"
        for slot in self.idle:
            assert slot.state is IDLE, slot
            assert slot.conn not in self.out, f"{slot!r} is idle and out"
        for conn, slot in self.out.items():
            assert slot.conn is conn, slot
            assert slot.state in (LENT, HANDED, CHECKING), slot
        assert self.dialling >= 0 and self.closing >= 0, (self.dialling, self.closing)
        assert self.size <= self.max_connections, f"size {self.size} > {self.max_connections}"
        assert self.dialling <= max(self.dial_limit, self.max_connections), self.dialling
        for request in self.queue:
            assert request.state is WAITING, request.state
            assert request.generation == self.generation
        if self.queue:
            assert not self.idle, "callers wait while connections are idle"
            assert not self.closed_flag, "callers wait on a closed pool"
        handed = sum(1 for s in self.out.values() if s.state is HANDED)
        counters = self.counters
        alive = len(self.idle) + len(self.out) + self.closing
        assert counters.created == sum(counters.closed.values()) + alive, (
            f"created {counters.created} != closed {sum(counters.closed.values())} + alive {alive}"
        )
        assert handed <= counters.waits, (handed, counters.waits)
