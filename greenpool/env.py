"""Pools and clients configured from ``GREENPOOL_*`` environment variables.

The twelve-factor entry points: gunicorn workers and locust runs configure
everything through the environment. The settings table and the strict
parsing live in :mod:`greenpool.config`; this module only builds objects.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import redis

from . import config
from .pool import BlockingConnectionPool

__all__ = ["from_env", "redis_from_env"]


def from_env(
    environ: Optional[Mapping[str, str]] = None,
    prefix: str = "GREENPOOL_",
    **overrides: Any,
) -> BlockingConnectionPool:
    """Build a pool from the environment.

    The server comes from ``GREENPOOL_URL`` (else ``REDIS_URL``, else
    redis-py's default, localhost:6379). Precedence: an explicit keyword in
    *overrides* > the URL's query options > ``GREENPOOL_*`` variables >
    defaults. Keywords that are not greenpool settings (``decode_responses``,
    ``protocol`` ...) go to redis-py's connection class.

    :param environ: the variables to read; ``os.environ`` by default.
    :param prefix: the variables' prefix.
    :raises ConfigError: for a bad value, naming the variable, the expected
        form and the value received, or for an unknown ``GREENPOOL_*`` variable.
    """
    url = overrides.pop("url", None)
    split = config.split(overrides, url=url, environ=environ, prefix=prefix, url_from_env=True)
    return BlockingConnectionPool._from_split(split)


def redis_from_env(
    environ: Optional[Mapping[str, str]] = None,
    prefix: str = "GREENPOOL_",
    **overrides: Any,
) -> "redis.Redis":
    """A :class:`redis.Redis` on a pool built by :func:`from_env`.

    The client does not own the pool: close it with
    ``client.connection_pool.close()`` when done.
    """
    return redis.Redis(connection_pool=from_env(environ, prefix, **overrides))
