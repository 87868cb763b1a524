"""greenpool: a fair, bounded, kill-safe blocking Redis connection pool for gevent.

``greenpool.BlockingConnectionPool`` is a drop-in ``connection_pool=`` for
:class:`redis.Redis`. Start reading at :mod:`greenpool.pool`.
"""

from .env import from_env, redis_from_env
from .errors import ConfigError, PoolClosed, PoolError, PoolTimeout, TooManyWaiters
from .pool import BlockingConnectionPool
from .stats import PoolStats

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
