"""Redis Cluster with a greenpool pool for every node.

redis-py's :class:`redis.cluster.RedisCluster` takes a
``connection_pool_class`` but honours it only for a client built from a URL:
built from ``host``/``port`` or ``startup_nodes``, every node silently gets
a plain :class:`redis.ConnectionPool`. :class:`RedisCluster` here is a
drop-in subclass that always takes redis-py's URL path (the one that calls
``connection_pool_class``), whichever way it is built, and passes a
per-client factory as that class::

    client = greenpool.cluster.RedisCluster(host="10.0.0.1", port=7000,
                                            max_connections=10, timeout=2)

The factory is what redis-py's ``NodesManager.create_redis_node`` calls for
*every* node it ever creates a client for: those found at start-up, and
those it finds later when a MOVED or ASK redirection or a failed node makes
it refresh the topology. So nodes discovered later get a pool too, with no
patching of redis-py. The factory keeps one pool per node address for the
client's life: when redis-py rebuilds a node's client (4.6 drops it on any
connection error), it gets the same pool back, so the per-node bound holds.

The node pools (:class:`ClusterNodePool`) are hardened for redis-py's
cluster client, 4.6 to 8.1:

- exhaustion raises :class:`NodePoolTimeout`, also a
  :class:`redis.exceptions.MaxConnectionsError`, which redis-py 8.1 treats as
  exhaustion rather than as a failed node (it would mark the node's
  connections for reconnection and refresh the whole topology);
- redis-py refreshes the topology through the node pools while it still
  holds the connection that got a MOVED reply or an error: within one
  command, a caller holding a connection of a full pool fails at once
  rather than waiting (a deadlock until ``timeout`` when several do it);
- redis-py releases a connection a second time when a redirected attempt
  fails early (redis/redis-py#4015): that release is ignored rather than
  taking the connection from the caller it was lent to since.

The last two need to know where one command starts and ends: the
subclass marks its ``_execute_command`` calls (a private redis-py method,
present and with the same signature from 4.6 to 8.1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set

import redis
import redis.cluster
from gevent.local import local
from redis.cluster import ClusterNode
from redis.exceptions import MaxConnectionsError

from . import config
from .errors import ConfigError, PoolTimeout, TooManyWaiters
from .pool import BlockingConnectionPool
from .stats import PoolStats

__all__ = [
    "RedisCluster",
    "ClusterNodePool",
    "NodePoolTimeout",
    "NodeTooManyWaiters",
    "ClusterStats",
    "cluster_stats",
    "from_env",
    "CLUSTER_NODES",
]

#: The startup-nodes row of :data:`greenpool.config.TOPOLOGY_SETTINGS`.
CLUSTER_NODES = next(s for s in config.TOPOLOGY_SETTINGS if s.name == "cluster_nodes")
logger = logging.getLogger("greenpool")

_NODES_FORM = "a comma-separated list of host:port such as 127.0.0.1:7000,127.0.0.1:7001"


class NodePoolTimeout(PoolTimeout, MaxConnectionsError):
    """A cluster node's pool had no connection within its timeout."""

    __module__ = "greenpool.cluster"


class NodeTooManyWaiters(TooManyWaiters, MaxConnectionsError):
    """A cluster node's pool already had ``max_waiters`` callers waiting."""

    __module__ = "greenpool.cluster"


class _Command:
    """The connections one cluster command took and gave back, per attempt."""

    __slots__ = ("holding", "released")

    def __init__(self) -> None:
        self.holding: Set[Any] = set()
        self.released: Set[Any] = set()


_commands = local()  # .current: the _Command the greenlet is executing, if any


@contextlib.contextmanager
def _command_scope() -> Iterator[_Command]:
    """Mark one ``RedisCluster._execute_command`` call of this greenlet."""
    outer = getattr(_commands, "current", None)
    _commands.current = command = _Command()
    try:
        yield command
    finally:
        _commands.current = outer


class ClusterNodePool(BlockingConnectionPool):
    """The pool of one cluster node, hardened for redis-py's cluster client.

    - Exhaustion errors are also :class:`~redis.exceptions.MaxConnectionsError`.
    - Within one command of a :class:`RedisCluster`, a caller that holds one
      of its connections never waits for another, and a repeated release of
      the same connection is ignored (see :meth:`get_connection` and
      :meth:`release`). Elsewhere it behaves exactly as its base class.
    """

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        """Lend a connection, as :meth:`BlockingConnectionPool.get_connection`.

        redis-py's cluster client refreshes its topology (``CLUSTER SLOTS``
        through the node pools) while still holding the connection that got
        the MOVED reply or the connection error. Commands doing so at once
        can hold every connection of a node while each waits for one: a
        deadlock until ``timeout``. So when every connection is in use and
        the command holds one, it fails at once, and redis-py asks another
        node.

        :raises NodePoolTimeout: rather than ``PoolTimeout``, and at once in
            the case above.
        :raises NodeTooManyWaiters: rather than ``TooManyWaiters``.
        """
        command = getattr(_commands, "current", None)
        if (
            command is not None
            and command.holding
            and not self._core.idle
            and self._core.size >= self.max_connections
            and any(c in self._core.out for c in command.holding)
        ):
            raise NodePoolTimeout(
                f"no connection from pool {self.name!r}: all {self.max_connections} are "
                "in use and this command holds one of them, so waiting could deadlock"
            )
        try:
            connection = super().get_connection(command_name, *keys, **options)
        except PoolTimeout as exc:
            raise NodePoolTimeout(str(exc)) from None
        except TooManyWaiters as exc:
            raise NodeTooManyWaiters(str(exc)) from None
        if command is not None:
            command.holding.add(connection)
            command.released.discard(connection)
        return connection

    def release(self, connection: Any) -> None:
        """Take a connection back, ignoring a command's repeated release.

        redis-py's cluster client (4.6 to 8.1, ``_execute_command``) releases
        the connection of one attempt again when the next attempt, after a
        MOVED or ASK redirection, fails before getting its own connection
        (an ASK to a node it does not know yet, say). By then the connection
        may be lent to another caller; taking it back would hand one socket
        to two callers.
        """
        command = getattr(_commands, "current", None)
        if command is not None:
            if connection in command.released and connection not in command.holding:
                logger.warning(
                    "pool %r ignored a release: %r was released twice by one command "
                    "(redis-py's cluster client does so after a failed redirection)",
                    self.name, connection,
                )
                return
            command.holding.discard(connection)
            command.released.add(connection)
        super().release(connection)


class _NodePools:
    """The ``connection_pool_class`` a :class:`RedisCluster` hands to redis-py.

    redis-py calls it as ``connection_pool_class(host=..., port=..., **kwargs)``
    for each node client it creates; it returns that node's pool, creating it
    on the first call. Node pools are named ``host:port`` (``<name>/host:port``
    when the client was given a ``name``).
    """

    def __init__(self, resolved: config.Resolved) -> None:
        # Every setting, as the cluster resolved it: given explicitly to each
        # node's pool, so the nodes cannot differ.
        self._settings = {k: v for k, v in resolved.options.items() if k != "url"}
        self._sources = resolved.sources
        #: node name ("host:port") -> its pool, in order of creation
        self.pools: Dict[str, ClusterNodePool] = {}

    def __call__(self, **kwargs: Any) -> ClusterNodePool:
        host, port = kwargs["host"], kwargs["port"]
        node = f"{host}:{port}"
        pool = self.pools.get(node)
        if pool is not None and not pool.closed:
            return pool
        if kwargs.pop("ssl", False):
            # Redis(ssl=True) would pick the class; the pool takes the class.
            kwargs.setdefault("connection_class", redis.SSLConnection)
        kwargs.pop("queue_class", None)  # redis-py's BlockingConnectionPool's own
        name = self._settings["name"]
        settings = dict(self._settings, name=f"{name}/{node}" if name else node)
        pool = self.pools[node] = ClusterNodePool(**kwargs, **settings)
        pool.sources = self._sources
        return pool

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


def _url(host: str, port: Any) -> str:
    return f"redis://[{host}]:{port}" if ":" in host else f"redis://{host}:{port}"


class RedisCluster(redis.cluster.RedisCluster):
    """A :class:`redis.cluster.RedisCluster` whose every node has a greenpool pool.

    Takes redis-py's arguments (``host``/``port``, ``startup_nodes``,
    ``url`` or :meth:`from_url`, and the rest as keywords) plus every greenpool setting
    (``max_connections``, ``timeout``, ``idle_timeout`` ...), which apply to
    each node's pool: ``max_connections=10`` means at most 10 connections to
    each node. A URL's greenpool query options are parsed strictly, as by
    :meth:`BlockingConnectionPool.from_url`.

    :meth:`close` closes every node's pool.
    """

    def __init__(
        self,
        host: Optional[str] = None,
        port: int = 6379,
        startup_nodes: Optional[List[ClusterNode]] = None,
        *,
        url: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        if "connection_pool_class" in kwargs:
            raise TypeError(
                "greenpool.cluster.RedisCluster sets connection_pool_class itself; "
                "configure the node pools with greenpool settings (max_connections=...)"
            )
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in config.SETTINGS_BY_NAME}
        resolved = config.resolve(url=url, overrides=settings, read_url=False)
        if url is not None:
            url = resolved.url  # without greenpool's query options
        elif host is not None:
            url = _url(host, port)
        elif startup_nodes:
            url = _url(startup_nodes[0].host, startup_nodes[0].port)
        # redis-py calls connection_pool_class only for a client built from a
        # URL, so one is always given; the other startup nodes stay as they are.
        self._node_pools = _NodePools(resolved)
        super().__init__(
            None, port, list(startup_nodes or []), url=url,
            connection_pool_class=self._node_pools, **kwargs,
        )

    def _execute_command(self, target_node: Any, *args: Any, **kwargs: Any) -> Any:
        # redis-py's attempt loop for one command on one node: mark it, so the
        # node pools can tell its repeated release and its hold-and-wait.
        with _command_scope():
            return super()._execute_command(target_node, *args, **kwargs)

    def node_pools(self) -> Dict[str, ClusterNodePool]:
        """Every node pool this client created, by node name (``host:port``).

        Includes nodes that have since left the cluster (their idle
        connections are reaped after ``idle_timeout``).
        """
        return dict(self._node_pools.pools)

    def close(self) -> None:
        """Close the client and every node's pool."""
        try:
            super().close()
        finally:
            node_pools = getattr(self, "_node_pools", None)  # __init__ may have failed
            if node_pools is not None:
                node_pools.close()


# -- stats ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterStats:
    """Per-node pool statistics of a cluster client, and their sum."""

    nodes: Mapping[str, PoolStats]  #: node name ("host:port") -> its pool's stats
    total: PoolStats  #: every number summed over the nodes; ``name`` is ``"total"``


def cluster_stats(client: redis.cluster.RedisCluster) -> ClusterStats:
    """Snapshot the pool of every node of *client*, and the total.

    For a :class:`RedisCluster`, every node pool it created; for another
    :class:`redis.cluster.RedisCluster`, the greenpool pools among its
    current nodes' pools.
    """
    if isinstance(client, RedisCluster):
        pools: Mapping[str, BlockingConnectionPool] = client.node_pools()
    else:
        pools = {
            node.name: node.redis_connection.connection_pool
            for node in client.get_nodes()
            if node.redis_connection is not None
            and isinstance(node.redis_connection.connection_pool, BlockingConnectionPool)
        }
    nodes = {name: pool.stats() for name, pool in pools.items()}
    total: Dict[str, Any] = {}
    for f in fields(PoolStats):
        values = [getattr(s, f.name) for s in nodes.values()]
        if f.name == "name":
            total[f.name] = "total"
        elif f.name == "closed":
            total[f.name] = {
                reason: sum(v.get(reason, 0) for v in values)
                for reason in dict.fromkeys(r for v in values for r in v)
            }
        else:
            total[f.name] = sum(values)
    return ClusterStats(types.MappingProxyType(nodes), PoolStats(**total))


# -- the environment ------------------------------------------------------------


def from_env(
    environ: Optional[Mapping[str, str]] = None,
    prefix: str = "GREENPOOL_",
    **overrides: Any,
) -> RedisCluster:
    """A :class:`RedisCluster` configured by the environment.

    The startup nodes come from ``GREENPOOL_CLUSTER_NODES``
    (``host:port,host:port``) and from ``GREENPOOL_URL`` (else
    ``REDIS_URL``), which also gives credentials, TLS and query options;
    one of them must be set. Each node's pool takes the usual settings
    (``GREENPOOL_MAX_CONNECTIONS`` is per node). Precedence: a keyword in
    *overrides* (``cluster_nodes=``, ``url=``, any setting or redis-py
    option) > URL query option > environment > default.

    :raises ConfigError: for a bad value, naming the variable, or when no
        startup node is given.
    """
    environ = os.environ if environ is None else environ
    variable = prefix + CLUSTER_NODES.env
    nodes_text = overrides.pop("cluster_nodes", None)
    where = "cluster_nodes"
    if nodes_text is None and variable in environ:
        nodes_text, where = environ[variable], variable
    settings = {k: overrides.pop(k) for k in list(overrides) if k in config.SETTINGS_BY_NAME}
    resolved = config.resolve(environ, prefix=prefix, url=overrides.pop("url", None), overrides=settings)
    startup_nodes = []
    if nodes_text is not None:
        if not isinstance(nodes_text, str):
            raise ConfigError(f"{where} must be {_NODES_FORM} (got {nodes_text!r})")
        startup_nodes = [ClusterNode(h, p) for h, p in config.parse_addresses(nodes_text, where=where, form=_NODES_FORM)]
    if resolved.url is None and not startup_nodes:
        raise ConfigError(
            f"{variable} or {prefix}URL must name at least one cluster node "
            f"(got neither; {variable} must be {_NODES_FORM})"
        )
    client = RedisCluster(
        startup_nodes=startup_nodes, url=resolved.url,
        **{k: v for k, v in resolved.options.items() if k != "url"}, **overrides,
    )
    for pool in client.node_pools().values():
        pool.sources = resolved.sources
    client._node_pools._sources = resolved.sources  # for nodes found later
    return client
