"""The core as a state machine, proven by hypothesis's stateful testing.

:class:`CoreMachine` plays the shell around a :class:`greenpool.core.PoolCore`
with fake connections and a fake clock (no server, no hub): callers check
out, release (also twice, or a connection the pool never lent), time out or
are killed at any point, even just after a connection was handed to them;
dials succeed, fail, are killed or stay slow; the process forks; the pool
is closed or disconnected; maintenance runs; the clock jumps. After every
step the core's own ``check()`` runs, and a simple model of who holds what
is compared with the core:

- at no instant more than ``max_connections`` connections;
- no connection in two places (idle, held by two callers, handed twice);
- live waiters are served strictly in arrival order;
- counters add up (checkouts, timeouts, misuses, created vs closed);
- no slot is lost: every connection out of the idle set is held by a
  caller, handed to a waiting one, being checked, or being closed.

``GREENPOOL_HYPOTHESIS_EXAMPLES=N`` runs N examples instead of CI's 2,000.
"""

from __future__ import annotations

import math
import os
from typing import Any, List, Optional

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from greenpool import maintenance
from greenpool.core import (
    CHECKING,
    CLOSE,
    DIAL,
    FAILED,
    GONE,
    HANDED,
    IDLE,
    LENT,
    REFUSED_CLOSED,
    REFUSED_TIMEOUT,
    REFUSED_WAITERS,
    SERVED,
    WAITING,
    WAKE,
    PoolCore,
    Request,
)

EXAMPLES = int(os.environ.get("GREENPOOL_HYPOTHESIS_EXAMPLES", "2000"))


class FakeConnection:
    """What the core lends: an object with an identity, nothing more."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False

    def __repr__(self) -> str:
        return f"<conn {self.number}{' closed' if self.closed else ''}>"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CoreMachine(RuleBasedStateMachine):
    """The shell's side of the core, with a model to check it against."""

    @initialize(
        max_connections=st.integers(1, 4),
        max_waiters=st.one_of(st.none(), st.integers(0, 3)),
        dial_limit=st.integers(1, 3),
        lifetime=st.sampled_from([math.inf, 5.0, 30.0]),
        min_idle=st.integers(0, 2),
        idle_timeout=st.sampled_from([None, 2.0, 10.0]),
        ping_interval=st.sampled_from([None, 3.0]),
        leak_threshold=st.sampled_from([None, 4.0]),
        warm=st.integers(0, 4),
    )
    def setup(self, max_connections: int, max_waiters: Optional[int], dial_limit: int,
              lifetime: float, min_idle: int, idle_timeout: Optional[float],
              ping_interval: Optional[float], leak_threshold: Optional[float], warm: int) -> None:
        self.clock = Clock()
        self.core = PoolCore(
            max_connections, clock=self.clock, max_waiters=max_waiters,
            dial_limit=dial_limit, validation_window=0.5, max_lifetime=lifetime,
            rand=lambda: 0.5,
        )
        self.options = {
            "min_idle": min(min_idle, max_connections), "idle_timeout": idle_timeout,
            "keepalive_ping_interval": ping_interval, "leak_detection_threshold": leak_threshold,
        }
        self.numbers = iter(range(1, 10**9))
        # The model.
        self.held: List[Any] = []  # slots callers hold (LENT)
        self.released: List[Any] = []  # slots given back once (for double releases)
        self.waiting: List[Request] = []  # queued requests, in arrival order
        self.woken: List[Request] = []  # served or failed, their greenlet not yet run
        self.dials: List[Any] = []  # tickets in flight (any generation)
        self.pinging: List[Any] = []  # slots out for a keepalive PING
        self.closing: List[Any] = []  # CLOSE actions not yet carried out
        self.retired: set = set()  # slots out at disconnect()/close(): never idle again
        self.checkouts = 0
        self.timeouts = 0
        self.misuses = 0
        self.created = 0
        self.wait_time = 0.0  # seconds waited by requests claimed or cancelled
        # Start with up to `warm` idle connections, as min_idle would leave.
        self.core.fill(warm)
        self.act()
        for ticket in list(self.dials):
            self.dials.remove(ticket)
            conn = FakeConnection(next(self.numbers))
            assert self.core.dial_done(ticket, conn, conn) is not None
            self.created += 1
            self.act()

    # -- the shell: carrying out actions ---------------------------------------

    def act(self) -> None:
        outbox = self.core.outbox
        while outbox:
            kind, item = outbox.pop(0)
            if kind is WAKE:
                # Served strictly oldest first, among the live waiters.
                assert self.waiting and item is self.waiting[0], "not the oldest waiter"
                self.waiting.pop(0)
                assert item.state in (SERVED, FAILED)
                self.woken.append(item)
            elif kind is CLOSE:
                # Closing is the shell's I/O: it finishes in a later step.
                assert item not in self.closing, f"{item!r} closed twice"
                self.closing.append(item)
            elif kind is DIAL:
                self.dials.append(item)

    # -- callers ---------------------------------------------------------------

    def openable(self) -> int:
        """What the pool may still open, by the model's count."""
        core = self.core
        closing = [s for s in self.closing if s.generation == core.generation]
        return core.max_connections - len(core.idle) - len(core.out) - len(closing)

    def lent(self, slot: Any) -> None:
        """A slot a caller now holds: LENT, stamped now, counted."""
        assert slot.state is LENT and not slot.conn.closed
        assert slot.lent_at == self.clock.now, "lent_at is not the time of checkout"
        self.checkouts += 1
        self.held.append(slot)

    @rule(check_ok=st.booleans(), zero_timeout=st.booleans(), hot_path=st.booleans())
    def checkout(self, check_ok: bool, zero_timeout: bool, hot_path: bool) -> None:
        """lend(), else lend_any() (the shell may also go straight to it), else admit()."""
        core = self.core
        slot = core.lend() if hot_path else None
        while slot is None:
            fresh = bool(core.idle) and self.clock.now - core.idle[-1].idle_since <= 0.5
            slot = core.lend_any()
            self.act()
            if slot is None:
                ahead, openable = len(core.queue), self.openable()
                request = core.admit(zero_timeout=zero_timeout)
                self.act()
                if core.closed_flag:
                    assert request is REFUSED_CLOSED
                elif core.max_waiters is not None and ahead - openable >= core.max_waiters:
                    assert request is REFUSED_WAITERS, (ahead, openable)
                elif zero_timeout and ahead >= openable:
                    assert request is REFUSED_TIMEOUT, (ahead, openable)
                    self.timeouts += 1
                else:
                    assert isinstance(request, Request) and request.state is WAITING, request
                    self.waiting.append(request)
                return
            # lend_any() lends a connection used within validation_window
            # and checks an older one (expired ones close on the way).
            age = self.clock.now - slot.idle_since
            assert slot.state is (LENT if age <= 0.5 else CHECKING), (slot, age)
            if fresh:
                assert slot.state is LENT
            if slot.state is CHECKING:
                assert slot.conn in core.out
                ok = core.checked(slot, check_ok)
                assert ok is check_ok
                self.act()
                if not ok:
                    slot = None
        self.lent(slot)

    @precondition(lambda self: self.core.idle)
    @rule(seconds=st.sampled_from([0.2, 0.7, 3.0]), check_ok=st.booleans(),
          hot_path=st.booleans())
    def checkout_after_idling(self, seconds: float, check_ok: bool, hot_path: bool) -> None:
        """Idle connections age, then a caller comes: fresh, checked, or expired."""
        self.clock.now += seconds
        self.checkout(check_ok, False, hot_path)

    @precondition(lambda self: self.woken)
    @rule(data=st.data())
    def waiter_runs(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.woken))
        self.woken.remove(request)
        if request.generation != self.core.generation:
            return  # the shell starts it again in the new generation
        if request.state is SERVED:
            slot = self.core.claim(request)
            assert not slot.conn.closed
            self.wait_time += self.clock.now - request.since
            self.lent(slot)
        else:
            self.core.cancel(request, timed_out=False)
        assert request.state is GONE and request.slot is None, request

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def waiter_times_out(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.waiting))
        self.waiting.remove(request)
        self.core.cancel(request, timed_out=True)
        self.act()
        if request.generation == self.core.generation:
            self.timeouts += 1
            self.wait_time += self.clock.now - request.since
            assert request.state is GONE, request

    @precondition(lambda self: self.waiting or self.woken)
    @rule(data=st.data())
    def waiter_killed(self, data: st.DataObject) -> None:
        """GreenletExit while waiting, or just after a hand-off, before it ran."""
        request = data.draw(st.sampled_from(self.waiting + self.woken))
        was_waiting = request in self.waiting
        (self.waiting if was_waiting else self.woken).remove(request)
        self.core.cancel(request, timed_out=False)
        self.act()
        if request.generation == self.core.generation:
            if was_waiting:
                self.wait_time += self.clock.now - request.since
            assert request.state is GONE and request.slot is None, request

    @precondition(lambda self: self.held)
    @rule(data=st.data(), reason=st.sampled_from([None, None, None, "dirty", "broken"]))
    def release(self, data: st.DataObject, reason: Optional[str]) -> None:
        slot = data.draw(st.sampled_from(self.held))
        self.held.remove(slot)
        if slot.generation != self.core.generation:
            return  # the shell closes the child's copy; the core never sees it
        assert self.core.release(slot, reason) is None
        self.released.append(slot)
        self.act()

    @precondition(lambda self: self.released)
    @rule(data=st.data())
    def release_again(self, data: st.DataObject) -> None:
        """A second release of a connection: idle, handed over, lent anew, or closed."""
        slot = data.draw(st.sampled_from(self.released))
        if slot in self.held or slot.generation != self.core.generation:
            return  # lent again: a release now is its holder's own
        core = self.core
        if slot.conn in core.out:
            assert core.release(slot) is not None
        else:
            assert core.release_unknown(slot.conn) is not None
        self.misuses += 1
        assert not core.outbox

    @rule()
    def release_foreign(self) -> None:
        assert self.core.release_unknown(FakeConnection(0)) == "not lent out by this pool"
        self.misuses += 1

    @precondition(lambda self: self.closing)
    @rule(data=st.data())
    def close_finishes(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self.closing))
        self.closing.remove(slot)
        assert not slot.conn.closed, f"{slot!r} closed twice"
        slot.conn.closed = True
        self.core.closed(slot)
        self.act()

    # -- dials -------------------------------------------------------------------

    @precondition(lambda self: self.dials)
    @rule(data=st.data())
    def dial_succeeds(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(self.dials))
        self.dials.remove(ticket)
        conn = FakeConnection(next(self.numbers))
        current = ticket.generation == self.core.generation
        slot = self.core.dial_done(ticket, conn, conn)
        assert (slot is not None) == current
        if current:
            self.created += 1
        self.act()

    @precondition(lambda self: self.dials)
    @rule(data=st.data(), killed=st.booleans())
    def dial_fails(self, data: st.DataObject, killed: bool) -> None:
        ticket = data.draw(st.sampled_from(self.dials))
        self.dials.remove(ticket)
        self.core.dial_failed(ticket, None if killed else ConnectionError("refused"))
        self.act()

    # -- the pool as a whole -------------------------------------------------------

    @rule()
    def fork(self) -> None:
        inherited, requests = self.core.fork_reset()
        # The child has nothing of the parent's generation.
        assert set(map(id, inherited)) >= {id(s) for s in self.held + self.pinging}
        self.held.clear()
        self.pinging.clear()
        self.closing.clear()
        self.released.clear()
        self.retired.clear()
        self.woken = [r for r in self.woken] + [r for r in self.waiting]
        self.waiting.clear()
        self.checkouts = self.timeouts = self.misuses = self.created = 0
        self.wait_time = 0.0

    @rule()
    def close(self) -> None:
        self.retired |= set(self.core.out.values())
        self.core.close(lambda: ConnectionError("closed"))
        self.act()

    @rule(in_use=st.booleans())
    def disconnect(self, in_use: bool) -> None:
        if in_use:
            self.retired |= set(self.core.out.values())
        self.core.disconnect(in_use=in_use)
        self.act()

    @rule(dials=st.integers(0, 5))
    def refill(self, dials: int) -> None:
        """The shell asks for more dials than there is room for: the core caps them."""
        self.core.fill(dials)
        self.act()

    @rule(seconds=st.sampled_from([0.1, 0.6, 2.5, 6.0, 31.0]))
    def clock_jumps(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def maintenance_tick(self) -> None:
        core = self.core
        decided = maintenance.plan(maintenance.snapshot(core), self.clock.now, self.options)
        size_after = core.size - len(decided.close_idle) - len(decided.close_expired)
        assert size_after + decided.dials <= core.max_connections, "the refill breaks the bound"
        for slot in decided.close_expired:
            assert core.reap(slot, "expired")
        for slot in decided.close_idle:
            assert core.reap(slot, "idle")
        for slot in decided.leaks:
            assert core.report_leak(slot)
        self.act()
        core.fill(decided.dials)
        self.act()
        for slot in decided.ping:
            if core.begin_ping(slot):
                self.pinging.append(slot)

    @precondition(lambda self: self.pinging)
    @rule(data=st.data(), failed=st.booleans())
    def ping_ends(self, data: st.DataObject, failed: bool) -> None:
        slot = data.draw(st.sampled_from(self.pinging))
        self.pinging.remove(slot)
        self.core.ping_done(slot, "broken" if failed else None)
        self.act()

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        core = self.core
        core.check()
        assert not core.outbox, "the shell acts after every call"
        assert core.size <= core.max_connections
        held = [s for s in self.held if s.generation == core.generation]
        assert len(set(map(id, held))) == len(held), "a connection held twice"
        idle_ids = {id(s) for s in core.idle}
        assert not idle_ids & {id(s) for s in held}, "a held connection is idle"
        # No lost slot: everything out is accounted for by the model.
        handed = {id(r.slot) for r in self.woken if r.state is SERVED}
        for slot in core.out.values():
            if slot.state is LENT:
                assert slot in held, f"{slot!r} lent to nobody"
            elif slot.state is HANDED:
                assert id(slot) in handed, f"{slot!r} handed to nobody"
            else:
                assert slot in self.pinging, f"{slot!r} checked by nobody"
        assert all(s.state is LENT for s in held)
        assert all(s.state is IDLE for s in core.idle)
        assert all(not s.conn.closed for s in core.idle), "a closed connection is idle"
        current_closing = [s for s in self.closing if s.generation == core.generation]
        assert core.closing == len(current_closing), (core.closing, current_closing)
        assert not set(core.idle) & self.retired, "a connection marked by disconnect() came back idle"
        live_dials = [t for t in self.dials if t.generation == core.generation and not t.settled]
        assert core.dialling == len(live_dials)
        live_waiting = [r for r in self.waiting if r.state is WAITING]
        assert list(core.queue) == live_waiting, "the queue is not the live waiters in order"
        counters = core.counters
        assert counters.checkouts == self.checkouts
        assert counters.timeouts == self.timeouts
        assert counters.misuses == self.misuses
        assert counters.created == self.created
        assert math.isclose(counters.wait_time, self.wait_time, abs_tol=1e-6), (
            counters.wait_time, self.wait_time)


CoreMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCore = CoreMachine.TestCase


def test_model_sees_a_broken_bound() -> None:
    """The machine is not vacuous: a core whose bound check is removed fails it."""
    from hypothesis import given

    class Unbounded(PoolCore):
        def _grow(self) -> None:  # dials with no regard for max_connections
            while len(self.queue) > self.dialling and not self.closed_flag:
                self._start_dial()

    @settings(max_examples=50, deadline=None)
    @given(st.integers(2, 4))
    def run(waiters: int) -> None:
        core = Unbounded(1, clock=Clock())
        for _ in range(waiters):
            core.admit()
        try:
            core.check()
        except AssertionError as exc:
            assert "size" in str(exc)
        else:
            raise AssertionError("check() missed a broken bound")

    run()




def _core_with(idle: int) -> "tuple[PoolCore, Clock]":
    clock = Clock()
    core = PoolCore(2, clock=clock, max_waiters=None, dial_limit=2, validation_window=0.5,
                    max_lifetime=math.inf, rand=lambda: 0.5)
    core.fill(idle)
    for _, ticket in list(core.outbox):
        conn = FakeConnection(id(ticket))
        core.dial_done(ticket, conn, conn)
    core.outbox.clear()
    return core, clock


def test_core_refuses_impossible_transitions() -> None:
    """The shell's contract is checked: a call in the wrong state raises
    instead of corrupting the state (each would otherwise pass silently)."""
    import pytest

    core, clock = _core_with(1)
    slot = core.lend()
    assert slot is not None and slot.state is LENT
    with pytest.raises(AssertionError, match="expected checking"):
        core.checked(slot, True)  # only a CHECKING slot is checked
    request = core.admit()
    assert isinstance(request, Request)
    with pytest.raises(AssertionError):
        core.claim(request)  # not served yet
    core.release(slot)
    assert request.state is SERVED and request.slot is slot
    slot.state = LENT  # as if the shell had lent the handed slot elsewhere
    with pytest.raises(AssertionError, match="expected handed"):
        core.cancel(request, timed_out=False)

    core, clock = _core_with(1)
    slot = core.lend()
    request = core.admit()
    core.release(slot)
    slot.state = IDLE  # as if the handed slot had gone back idle
    with pytest.raises(AssertionError, match="expected handed"):
        core.claim(request)
