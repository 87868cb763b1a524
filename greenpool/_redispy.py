"""What redis-py's client, Sentinel and maintenance notifications expect of
a pool, on top of checkout and release: kept apart so :mod:`greenpool.pool`
reads as the pool's own logic.
"""

from __future__ import annotations

from typing import Any, Dict, List, Set

__all__ = ["RedisPyPoolMixin"]


class RedisPyPoolMixin:
    """Methods redis-py calls on a pool, over greenpool's idle and in-use records."""

    connection_kwargs: Dict[str, Any]
    cache: Any = None  # redis-py >= 5.1 sets it; 4.6 has no client-side cache
    _lock: Any
    _tracked_class: type
    _idle: List[Any]
    _in_use: Dict[Any, Any]

    def make_connection(self) -> Any:
        """Create a connection object (not yet connected); used by dials."""
        conn = self._tracked_class(**self.connection_kwargs)
        if self.cache is not None:
            from redis.connection import CacheProxyConnection

            conn = CacheProxyConnection(conn, self.cache, self._lock)  # type: ignore[abstract]
        return conn

    def _checkpid(self) -> None:
        # Fork safety comes from os.register_at_fork (see greenpool._fork), so
        # no getpid() syscall is needed on every checkout.
        pass

    def owns_connection(self, connection: Any) -> bool:
        return connection in self._in_use or any(s.conn is connection for s in self._idle)

    # redis-py's client and maintenance notifications call these.

    def _get_free_connections(self) -> List[Any]:
        return [slot.conn for slot in self._idle]

    def _get_in_use_connections(self) -> Set[Any]:
        return set(self._in_use)

    def set_retry(self, retry: Any) -> None:
        self.connection_kwargs.update({"retry": retry})
        for conn in self._get_free_connections() + list(self._in_use):
            conn.retry = retry

    def re_auth_callback(self, token: Any) -> None:
        # Idle connections re-authenticate when next lent (redis-py checks the
        # token before each command); sending AUTH here would need I/O inside
        # the pool's bookkeeping.
        for conn in self._get_free_connections() + list(self._in_use):
            conn.set_re_auth_token(token)

    def __del__(self) -> None:
        # redis-py's __del__ records metrics about its own lists; ours has none.
        pass
