"""Helpers the pool tests share: building pools and checking their invariants."""

from __future__ import annotations

from typing import Callable

import gevent

from greenpool import BlockingConnectionPool

PoolFactory = Callable[..., BlockingConnectionPool]


def check_invariants(pool: BlockingConnectionPool) -> None:
    """Assert the pool's bookkeeping is consistent at this instant."""
    idle = [slot.conn for slot in pool._idle]
    in_use = list(pool._in_use)
    assert len(set(idle)) == len(idle), "a connection is idle twice"
    assert not set(idle) & set(in_use), "a connection is both idle and in use"
    assert pool._size() <= pool.max_connections, repr(pool)
    live = [w for w in pool._waiters if not w.cancelled]
    assert pool._nwaiting == len(live), repr(pool)
    if live:
        assert not idle, f"callers wait while connections idle: {pool!r}"
    stats = pool.stats()
    assert stats.size == stats.idle + stats.in_use + stats.dialling


def watch_invariants(pool: BlockingConnectionPool, every: float = 0.0) -> gevent.Greenlet:
    """Spawn a greenlet that checks the invariants at every turn of the hub.

    The greenlet dies with the AssertionError if one fails; the test joins it
    and re-raises with ``greenlet.get()``.
    """

    def run() -> None:
        while True:
            check_invariants(pool)
            gevent.sleep(every)

    return gevent.spawn(run)


def stop_watching(watcher: gevent.Greenlet) -> None:
    """Stop a watcher, raising what it found if it failed."""
    if watcher.dead:
        watcher.get()  # re-raises the AssertionError
    watcher.kill()
