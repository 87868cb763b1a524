"""Maintenance's decisions: :func:`greenpool.maintenance.plan` is a pure
function of a snapshot, ``now`` and the settings, tested on synthetic slots
with no server and no hub; and issue 19's refill against a real pool."""

from __future__ import annotations

import itertools
import math

from pools import check_invariants
from test_maintenance import FakeClock, quiet, settle

from greenpool import maintenance
from greenpool.core import Slot
from greenpool.maintenance import SlotView, Snapshot, plan

OPTIONS = {"min_idle": 0, "idle_timeout": None, "keepalive_ping_interval": None,
           "leak_detection_threshold": None}


def idle_view(n: int, *, idle_since: float = 0.0, expires_at: float = math.inf,
              lent_at: float = 0.0) -> SlotView:
    slot = Slot(f"conn{n}", f"conn{n}", 0, 0.0, expires_at)
    return SlotView(slot, idle_since, expires_at, lent_at, False)


def snap(idle=(), lent=(), *, dialling=0, max_connections=2, closed=False) -> Snapshot:
    return Snapshot(tuple(idle), tuple(lent), len(idle) + len(lent) + dialling, dialling,
                    max_connections, closed)


def test_refill_counts_each_expired_connection_once():
    """max_connections=2, min_idle=2, one in use, one idle and expired: one dial, not two."""
    expired = idle_view(1, expires_at=50.0)
    decided = plan(snap([expired], [idle_view(2)]), 100.0, dict(OPTIONS, min_idle=2))
    assert decided.close_expired == [expired.slot]
    assert decided.dials == 1


def test_refill_never_plans_past_the_bound():
    """Every mix of in-use, expired and idle-too-long connections and min_idle
    ends within max_connections (3), with min_idle idle where there is room."""
    for in_use, expired, stale, min_idle in itertools.product(range(4), repeat=4):
        if in_use + expired + stale > 3:
            continue
        idle = [idle_view(i, expires_at=50.0) for i in range(expired)]
        idle += [idle_view(10 + i, idle_since=0.0) for i in range(stale)]
        lent = [idle_view(20 + i) for i in range(in_use)]
        options = dict(OPTIONS, min_idle=min_idle, idle_timeout=30.0)
        decided = plan(snap(idle, lent, max_connections=3), 100.0, options)
        case = (in_use, expired, stale, min_idle, decided)
        assert len(decided.close_expired) == expired, case
        kept = stale - len(decided.close_idle)
        assert kept == min(stale, min_idle), case  # reaped down to min_idle
        assert in_use + kept + decided.dials <= 3, case
        assert kept + decided.dials == max(kept, min(min_idle, 3 - in_use)), case


def test_plan_is_pure():
    """plan() changes nothing it is given, and gives the same answer twice."""
    views = [idle_view(1, expires_at=50.0), idle_view(2, idle_since=0.0)]
    s = snap(views, [], max_connections=4)
    options = dict(OPTIONS, min_idle=1, idle_timeout=10.0)
    first, second = plan(s, 100.0, options), plan(s, 100.0, options)
    assert first == second and s == snap(views, [], max_connections=4)
    assert all(v.slot.state == "idle" for v in views)


def test_plan_of_a_closed_pool_is_empty():
    assert plan(snap([idle_view(1, expires_at=0.0)], closed=True), 100.0,
                dict(OPTIONS, min_idle=2)) == maintenance.Plan()


def test_the_min_idle_refill_keeps_the_bound_with_expired_idle(make_pool):
    """Issue 19 against a real pool: with one connection in use and one idle
    past max_lifetime, maintenance ends at size 2, not 3."""
    clock = FakeClock()
    pool = quiet(make_pool(max_connections=2, min_idle=2, max_lifetime=100, clock=clock))
    settle(pool)
    held = pool.get_connection()
    assert pool.stats().idle == 1 and pool.stats().size == 2
    clock.jump(101)
    decided = maintenance.run_once(pool)
    assert len(decided.close_expired) == 1 and decided.dials == 1
    assert pool.stats().size <= 2
    settle(pool)
    stats = pool.stats()
    assert (stats.size, stats.idle, stats.in_use) == (2, 1, 1)
    check_invariants(pool)
    pool.release(held)
