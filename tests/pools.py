"""Helpers the pool tests share: building pools and checking their invariants."""

from __future__ import annotations

from typing import Callable

import gevent

from greenpool import BlockingConnectionPool

PoolFactory = Callable[..., BlockingConnectionPool]


def check_invariants(pool: BlockingConnectionPool) -> None:
    """Assert the pool's invariants at this instant (the core's own check)."""
    pool.check()
    stats = pool.stats()
    assert stats.size == stats.idle + stats.in_use + stats.dialling, stats


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
