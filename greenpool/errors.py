"""The exceptions greenpool raises.

Pool errors subclass :class:`redis.exceptions.ConnectionError`, so code that
already catches redis-py's connection errors keeps working unchanged.
"""

from __future__ import annotations

import redis.exceptions

__all__ = ["PoolError", "PoolTimeout", "PoolClosed", "TooManyWaiters", "ConfigError"]


class PoolError(redis.exceptions.ConnectionError):
    """Base class of the errors raised by a greenpool pool."""

    __module__ = "greenpool"

    def __repr__(self) -> str:
        # redis-py 8's RedisError.__repr__ drops the message ("network:
        # PoolTimeout"); logs, locust and pytest show repr, and the message
        # is the useful part.
        return f"{type(self).__name__}({str(self)!r})"


class PoolTimeout(PoolError, redis.exceptions.MaxConnectionsError):
    """No connection became available within the pool's timeout.

    Also a :class:`redis.exceptions.MaxConnectionsError`: exhaustion, not a
    broken server (redis-py's cluster client tells the two apart).
    """

    __module__ = "greenpool"


class PoolClosed(PoolError):
    """The pool was closed, before or while the caller asked for a connection."""

    __module__ = "greenpool"


class TooManyWaiters(PoolError, redis.exceptions.MaxConnectionsError):
    """The caller would exceed the pool's limit on waiting callers."""

    __module__ = "greenpool"


class ConfigError(ValueError):
    """A setting has a value of the wrong type or out of range.

    The message names the parameter or environment variable, the expected
    form and the value received.
    """

    __module__ = "greenpool"
