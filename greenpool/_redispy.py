"""Every place greenpool touches redis-py's private parts, in one module.

redis-py's pool and connection classes have no public way to ask whether a
connection still has its socket, to unwrap the client-side cache's proxy, or
to know the process a connection was opened in; greenpool needs all three.
They are read here and nowhere else, so a redis-py upgrade that renames one
breaks one module, and ``tests/test_redispy_interface.py`` lists what each
supported redis-py version's ``ConnectionPool`` defines, so a new method
there is either overridden by greenpool or reviewed in :data:`INHERITED`.

Reads: ``Connection._sock`` (the socket, None once disconnected),
``CacheProxyConnection._conn`` (the connection behind the cache proxy),
``Connection.pid`` (the process that created it), ``ConnectionPool._lock``
(what redis-py's cache proxy locks). Written: ``ConnectionPool.pid``
(see :func:`stamp_process`). Side effects relied upon: the base
``ConnectionPool.__init__`` (see :func:`init_base`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Set

import redis
from gevent.monkey import get_original

__all__ = [
    "RedisPyInterface", "INHERITED", "init_base", "stamp_process", "make_connection", "raw_connection",
    "sockets_of", "socket_fd", "set_socket_timeout", "restore_socket_timeout", "is_ready", "retire_reason",
    "from_before_fork", "neutralize",
]

_poll = get_original("select", "poll")
_POLLIN = 0x001 | 0x008 | 0x010  # POLLIN | POLLERR | POLLHUP

#: The methods of :class:`redis.ConnectionPool` (any supported version) that
#: greenpool's pool inherits unchanged, and why that is right. Every other
#: method redis-py defines is overridden; the interface test enforces it.
INHERITED = {
    "get_encoder": "reads connection_kwargs only",
    "get_protocol": "reads connection_kwargs only",
    "get_connection_count": "redis-py 8 observability; built on _get_free/_get_in_use_connections",
    "_get_pool_lock": "returns redis-py's _lock, which its cache proxy and maintenance code take",
    "_mock": "a no-op error callback for Retry objects",
    "connection_kwargs": "redis-py 8's maintenance-notification property over _connection_kwargs",
    "__enter__": "redis-py 5+: returns the pool (ours is defined too)",
    "__exit__": "redis-py 5+: closes the pool (ours is defined too)",
    # redis-py 7+ maintenance notifications: they walk the connections
    # through _get_free_connections()/_get_in_use_connections() under
    # _get_pool_lock() and change connection objects or connection_kwargs,
    # never the pool's lists. A free connection they disconnect reconnects
    # on its next command, as in redis-py's own pools; one they mark for
    # reconnect is closed by greenpool on release (reason "reconnect").
    "maint_notifications_enabled": "reads the notification handlers' config",
    "update_maint_notifications_config": "replaces the notification handlers",
    "_update_connection_kwargs_for_maint_notifications": "edits connection_kwargs",
    "_update_maint_notifications_configs_for_connections": "edits each connection's config",
    "_should_update_connection": "a predicate on one connection",
    "update_connection_kwargs": "edits connection_kwargs for future connections",
    "update_connection_settings": "edits one connection's settings",
    "update_connections_settings": "edits every connection's settings",
    "update_active_connections_for_reconnect": "marks in-use connections for reconnect",
    "disconnect_free_connections": "disconnects idle connection objects in place",
}


# Taken at import: a program (or redis-py's test suite, run through
# greenpool) may rebind redis.ConnectionPool to greenpool's own class.
_BASE_INIT = redis.connection.ConnectionPool.__init__


def init_base(pool: Any, connection_class: type, connection_kwargs: dict) -> None:
    """Run redis-py's ``ConnectionPool.__init__`` on *pool*.

    It sets up what redis-py's client expects of a pool: ``connection_kwargs``,
    the encoder settings, the protocol, the client-side cache (redis-py 5.1+),
    maintenance notifications (7+), ``_lock``, ``pid``; then calls
    ``pool.reset()``, which must work on the freshly built core.
    """
    _BASE_INIT(pool, connection_class=connection_class, **connection_kwargs)


def stamp_process(pool: Any) -> None:
    """Set ``pool.pid`` to this process, as redis-py's ``reset()`` does: its
    callers and tests compare a connection's ``pid`` with it. (greenpool's
    own fork safety needs no pid: see :mod:`greenpool._fork`.)"""
    pool.pid = os.getpid()


def make_connection(pool: Any, connection_class: type) -> Any:
    """A new, unconnected connection, wrapped in redis-py's cache proxy if
    the pool has a client-side cache."""
    conn = connection_class(**pool.connection_kwargs)
    cache = getattr(pool, "cache", None)  # redis-py >= 5.1; 4.6 has none
    if cache is not None:
        from redis.connection import CacheProxyConnection

        conn = CacheProxyConnection(conn, cache, pool._lock)  # type: ignore[abstract]
    return conn


class RedisPyInterface:
    """The methods redis-py's client, Sentinel and maintenance notifications
    call on a pool beyond checkout and release, including the private ones
    greenpool overrides. They read the pool's core (``self._core``) only."""

    _core: Any  # greenpool.core.PoolCore
    _tracked_class: type
    connection_kwargs: Dict[str, Any]

    def make_connection(self) -> Any:
        """Create a connection object (not yet connected); used by dials."""
        return make_connection(self, self._tracked_class)

    def _checkpid(self) -> None:
        # Fork safety comes from os.register_at_fork (see greenpool._fork), so
        # no getpid() syscall is needed on every checkout.
        pass

    def owns_connection(self, connection: Any) -> bool:
        core = self._core
        return connection in core.out or any(s.conn is connection for s in core.idle)

    def _get_free_connections(self) -> List[Any]:
        return [slot.conn for slot in self._core.idle]

    def _get_in_use_connections(self) -> Set[Any]:
        return set(self._core.out)

    def set_retry(self, retry: Any) -> None:
        self.connection_kwargs.update({"retry": retry})
        for conn in self._get_free_connections() + list(self._core.out):
            conn.retry = retry

    def re_auth_callback(self, token: Any) -> None:
        # Every connection sends AUTH with the new token when next released
        # (see greenpool._tracking.ReauthTracking); sending it here would
        # need I/O inside the pool's bookkeeping.
        for conn in self._get_free_connections() + list(self._core.out):
            conn.set_re_auth_token(token)

    def __del__(self) -> None:
        # redis-py's __del__ records metrics about its own lists; ours has none.
        pass


def raw_connection(conn: Any) -> Any:
    """The connection that talks to the socket (inside a cache proxy)."""
    return getattr(conn, "_conn", conn)


def sockets_of(raw: Any) -> List[Any]:
    """The socket *raw* holds, if any."""
    sock = raw._sock
    return [] if sock is None else [sock]


def socket_fd(raw: Any) -> Optional[int]:
    """The file descriptor of *raw*'s socket, or None when it has none."""
    sock = raw._sock
    if sock is None:
        return None
    try:
        fd = sock.fileno()
    except (OSError, ValueError, AttributeError):  # closed, or a stand-in with no fd
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def set_socket_timeout(raw: Any, seconds: Optional[float]) -> None:
    """Give *raw*'s socket, if it has one, the timeout *seconds* for its next calls."""
    sock = raw._sock
    if sock is not None:
        sock.settimeout(seconds)


def restore_socket_timeout(raw: Any) -> None:
    """Give *raw*'s socket its connection's ``socket_timeout`` again (after a
    dial bounded each step by what remained); a stand-in connection class
    without one is left alone."""
    if hasattr(raw, "socket_timeout"):
        set_socket_timeout(raw, raw.socket_timeout)


def is_ready(raw: Any) -> bool:
    """Whether an idle connection is fit to lend: connected, and nothing to read.

    A zero-timeout poll of the real fd: a system call, but never a hub round
    trip. Readable means EOF (the server closed it) or data nobody asked
    for; either way the connection is not clean.
    """
    sock = raw._sock
    if sock is None:
        return False
    try:
        fd = sock.fileno()
    except AttributeError:
        # A stand-in connection class's socket, with no descriptor to poll:
        # connected is all that can be known.
        return True
    except (OSError, ValueError):
        return False
    poller = _poll()
    try:
        poller.register(fd, _POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError, TypeError):
        return False


def retire_reason(raw: Any) -> Optional[str]:
    """Why a connection coming back must close (a PoolStats.closed key), or None.

    ``_greenpool_owed``, ``_greenpool_broken`` and ``_greenpool_reconnect``
    are greenpool's own (see :mod:`greenpool._tracking`); release() reads
    them inline and calls this only when one is set. ``_sock`` is redis-py's:
    a connection disconnected and then reconnected (redis-py does so on
    its own before a command) is healthy again. ``_re_auth_token`` is
    redis-py's too: a streaming credential provider's new token, sent here.
    """
    if raw._greenpool_owed:
        return "dirty"
    if raw._sock is None:
        return "broken"
    raw._greenpool_broken = False  # reconnected since, or given a new token
    if getattr(raw, "_re_auth_token", None) is not None:
        # A streaming credential provider's new token (ReauthTracking): AUTH
        # now, as redis-py's pools do on release; a connection that fails it
        # is closed, and its replacement authenticates afresh.
        try:
            raw.re_auth()
        except Exception:
            raw.disconnect()
            return "broken"
    if raw._greenpool_reconnect:
        return "reconnect"
    return None


def from_before_fork(conn: Any, orphans: List[Any]) -> bool:
    """Whether *conn* was opened in the parent of this (forked) process."""
    pid = getattr(conn, "pid", None)  # anything else is no connection of ours
    return conn in orphans or (pid is not None and pid != os.getpid())


def neutralize(sockets: Iterable[Any]) -> None:
    """Point each socket's file descriptor at ``/dev/null``, in this process only.

    Used in a forked child for the sockets it shares with its parent: a
    copied greenlet that goes on reading or writing one then reads EOF and
    writes nowhere, instead of taking the parent's replies or interleaving
    commands with it. The parent's socket is not touched (no shutdown, no
    I/O); the descriptor number stays taken until the child closes it, so
    it cannot be reused for a new socket under a greenlet that still holds
    it. Only system calls: safe inside a fork handler.
    """
    devnull = -1
    try:
        for sock in sockets:
            try:
                fd = sock.fileno()
            except (OSError, ValueError):
                continue
            if fd < 0:
                continue
            if devnull < 0:
                devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(devnull, fd)
            except OSError:
                pass
    finally:
        if devnull >= 0:
            os.close(devnull)
