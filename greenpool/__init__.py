"""greenpool: a fair, bounded, kill-safe blocking Redis connection pool for gevent.

``greenpool.BlockingConnectionPool`` is a drop-in ``connection_pool=`` for
:class:`redis.Redis`. Start reading at :mod:`greenpool.core`, then :mod:`greenpool.pool`.

Where each behaviour lives:

- ``core``: the pool's state machine: every change of state, no I/O
  (slots, the wait queue, dials, generations, counters, ``check()``).
- ``pool``: the shell: redis-py's pool interface, carrying out the core's
  actions with gevent (waiting, waking, closing).
- ``_dial``: opening connections in greenlets the pool owns.
- ``_tracking``: counting the replies a connection still owes.
- ``_redispy``: every read of redis-py's private attributes, and the
  methods redis-py calls on a pool beyond checkout.
- ``_fork``: rebuilding pools in a forked child.
- ``maintenance``: the background greenlet (idle reaping, lifetimes,
  ``min_idle``, keepalive PINGs, leak reports).
- ``keepalive``: TCP keepalive socket options.
- ``config``: the settings table, validation and environment parsing;
  ``env``: pools and clients built from the environment.
- ``stats``: counters and the ``stats()`` snapshot; ``errors``: exceptions.
- ``sentinel``, ``cluster``: blocking pools for Redis Sentinel and Cluster.
- ``contrib.locust``: a locust user with a shared pool.
- ``cli`` (with ``_demo_command`` and ``demo``): the command line;
  ``_server``: an embedded redis-server for the demo and the tests.

The names below are imported on first use: ``python -m greenpool demo`` must
monkey-patch gevent before redis-py (and through it ``ssl``) is imported,
and importing the package is the first thing ``python -m`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "BlockingConnectionPool",
    "from_env",
    "redis_from_env",
    "PoolStats",
    "PoolError",
    "PoolTimeout",
    "PoolClosed",
    "TooManyWaiters",
    "ConfigError",
    "__version__",
]

__version__ = "0.1.0"

_WHERE = {
    "BlockingConnectionPool": "pool",
    "from_env": "env",
    "redis_from_env": "env",
    "PoolStats": "stats",
    "PoolError": "errors",
    "PoolTimeout": "errors",
    "PoolClosed": "errors",
    "TooManyWaiters": "errors",
    "ConfigError": "errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from .env import from_env, redis_from_env
    from .errors import ConfigError, PoolClosed, PoolError, PoolTimeout, TooManyWaiters
    from .pool import BlockingConnectionPool
    from .stats import PoolStats


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'greenpool' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
