"""greenpool: a fair, bounded, kill-safe blocking Redis connection pool for gevent.

``greenpool.BlockingConnectionPool`` is a drop-in ``connection_pool=`` for
:class:`redis.Redis`. Start reading at :mod:`greenpool.pool`.

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
