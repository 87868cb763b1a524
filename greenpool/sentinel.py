"""Blocking pools for a service whose master Redis Sentinel elects.

redis-py's :class:`redis.sentinel.SentinelConnectionPool` finds the master
through the sentinels but, like :class:`redis.ConnectionPool`, raises "Too
many connections" at its cap. :class:`SentinelBlockingConnectionPool` is
greenpool's pool (fair, bounded, kill-safe waiting) with the same Sentinel
behaviour, for :meth:`redis.sentinel.Sentinel.master_for` and
:meth:`~redis.sentinel.Sentinel.slave_for`::

    sentinel = redis.sentinel.Sentinel([("127.0.0.1", 26379)])
    client = sentinel.master_for(
        "mymaster", connection_pool_class=SentinelBlockingConnectionPool,
        max_connections=20, timeout=2,
    )

or, in one call, :func:`master_for` and :func:`replica_for`, and from
``GREENPOOL_SENTINELS``, ``GREENPOOL_SENTINEL_SERVICE`` and
``GREENPOOL_SENTINEL_ROLE`` with :func:`from_env`.

Failover: every new connection asks the sentinels where the master is (in
the dial greenlet, outside the pool's bookkeeping). When the answer changes,
idle connections are closed and connections in use are closed when
released, so that no connection to the old master is handed out again;
callers waiting meanwhile keep waiting (up to their timeout) and are served
by connections to the new master. A read-only client rotates its new
connections over the replicas the sentinels report, falling back to the
master when there are none.
"""

from __future__ import annotations

import logging
import os
import random
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import gevent
import redis
from redis.connection import parse_url
from redis.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
    SlaveNotFoundError,
)

from . import _redispy, config
from .config import DEFAULT
from .errors import ConfigError
from .pool import BlockingConnectionPool

__all__ = [
    "SentinelBlockingConnectionPool",
    "master_for",
    "replica_for",
    "from_env",
    "SentinelConfig",
    "resolve",
    "SETTINGS",
]

logger = logging.getLogger("greenpool")

Address = Tuple[str, int]

#: The Sentinel rows of :data:`greenpool.config.TOPOLOGY_SETTINGS`.
SETTINGS: Tuple[config.Setting, ...] = tuple(
    s for s in config.TOPOLOGY_SETTINGS if s.name.startswith("sentinel")
)
_BY_NAME = {s.name: s for s in SETTINGS}
_ROLES = ("master", "replica")
_ADDRESS_FORM = SETTINGS[0].expected(env=True)


def _sentinel_addresses(value: Any, where: str) -> List[Address]:
    """Accept ``"h:p,h:p"``, or an iterable of ``(host, port)`` or ``"h:p"``."""
    if isinstance(value, str):
        return config.parse_addresses(value, where=where)
    try:
        items = list(value)
    except TypeError:
        items = []
    addresses = []
    for item in items:
        if isinstance(item, str):
            addresses.extend(config.parse_addresses(item, where=where))
        elif (
            isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], int) and not isinstance(item[1], bool)
        ):
            addresses.append((item[0], item[1]))
        else:
            addresses = []
            break
    if not addresses:
        raise ConfigError(
            f"{where} must be a non-empty list of (host, port) pairs or {_ADDRESS_FORM} (got {value!r})"
        )
    return addresses


def _role(value: Any, where: str) -> str:
    if value not in _ROLES:
        raise ConfigError(f"{where} must be master or replica (got {value!r})")
    return str(value)


#: Seconds a watcher waits for a message before checking its pool still
#: exists, and the bounds of its back-off between sentinels that fail.
_LISTEN_TIMEOUT = 30.0
_RETRY_MIN, _RETRY_MAX = 0.1, 5.0


class _SwitchWatcher:
    """Listens to a sentinel for ``+switch-master`` and tells the pool at once.

    Without it the pool learns of a failover only when a connection breaks:
    Sentinel demotes the old master (and closes its clients) at its next
    INFO round, up to 10 s after electing the new one, and writes sent to
    the old master meanwhile are lost when it resynchronises.

    The greenlet holds the pool by weakref, only while handling a message;
    the pool stops it on close() and after a fork (the child must not read
    the parent's subscription).
    """

    def __init__(self, pool: "SentinelBlockingConnectionPool") -> None:
        self._pool_ref = weakref.ref(pool)
        self.greenlet = gevent.spawn(self._run)
        self.greenlet.name = f"{pool.name}-sentinel-watch"

    def stop(self) -> None:
        self.greenlet.kill(block=False)

    def _run(self) -> None:
        delay = _RETRY_MIN
        while True:
            pool = self._pool_ref()
            if pool is None or pool.closed:
                return
            sentinels = list(pool.sentinel_manager.sentinels)
            del pool
            for client in sentinels:
                if self._listen(client):
                    delay = _RETRY_MIN
            gevent.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    def _listen(self, client: Any) -> bool:
        """Listen to one sentinel until it fails; whether it answered at all."""
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        answered = False
        try:
            pubsub.subscribe("+switch-master")
            while True:
                message = pubsub.get_message(timeout=_LISTEN_TIMEOUT)
                answered = True
                pool = self._pool_ref()
                if pool is None or pool.closed:
                    return answered
                if message is not None:
                    pool._switched(message["data"], client)
                del pool
        except Exception as exc:  # never BaseException: kill() must work
            logger.debug("sentinel watch on %r failed: %s", client, exc)
            return answered
        finally:
            pubsub.close()


class SentinelBlockingConnectionPool(BlockingConnectionPool):
    """A :class:`greenpool.BlockingConnectionPool` for a Sentinel-managed service.

    Built by :meth:`redis.sentinel.Sentinel.master_for` and
    :meth:`~redis.sentinel.Sentinel.slave_for` when passed as their
    ``connection_pool_class``; they call it as
    ``SentinelBlockingConnectionPool(service_name, sentinel, **kwargs)``, with
    the keyword arguments given to them (``max_connections``, ``timeout`` and
    every greenpool setting, plus redis-py's connection options).

    :param service_name: the name the sentinels monitor the master under.
    :param sentinel_manager: the :class:`redis.sentinel.Sentinel` to ask.
    :param is_master: connect to the master (True), or rotate over the
        replicas (False), as redis-py's pool does.
    :param check_connection: PING each new connection before using it.
    :param ssl: use TLS (when no ``connection_class`` is given).
    :param watch: for a master pool, subscribe to a sentinel's
        ``+switch-master`` events so that a failover moves new connections to
        the new master at once, rather than when the old one drops them.

    The pool's name defaults to ``<service>/master`` or ``<service>/replica``.
    """

    def __init__(
        self,
        service_name: str,
        sentinel_manager: Sentinel,
        max_connections: Optional[int] = None,
        timeout: Optional[float] = DEFAULT,
        *,
        is_master: bool = True,
        check_connection: bool = False,
        ssl: bool = False,
        watch: bool = True,
        connection_class: Optional[type] = None,
        **kwargs: Any,
    ) -> None:
        if connection_class is None:
            connection_class = SentinelManagedSSLConnection if ssl else SentinelManagedConnection
        self.service_name = service_name
        self.sentinel_manager = sentinel_manager
        self.is_master = is_master
        self.check_connection = check_connection
        #: The master's (host, port) as last reported by the sentinels, or None.
        self.master_address: Optional[Address] = None
        self._replica_counter: Optional[int] = None
        #: Whether close() closes the sentinel manager's connections too
        #: (set by master_for() and replica_for() for the manager they built).
        self._owns_sentinel = False
        self._watch = watch and is_master
        self._watcher: Optional[_SwitchWatcher] = None
        if "url" in kwargs:
            raise TypeError("SentinelBlockingConnectionPool() takes no url: the sentinels name the server")
        super().__init__(max_connections, timeout, connection_class=connection_class, **kwargs)
        if self.options["name"] is None:
            self.name = f"{service_name}/{'master' if is_master else 'replica'}"
        # The connections call back into the pool (get_master_address,
        # rotate_slaves) through a weak proxy, as redis-py's do: a strong
        # reference would make every pool part of a reference cycle.
        self.connection_kwargs["connection_pool"] = weakref.proxy(self)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "SentinelBlockingConnectionPool":
        """Not supported: the sentinels, not a URL, say where the server is."""
        raise TypeError(
            "SentinelBlockingConnectionPool has no from_url(): use "
            "greenpool.sentinel.master_for(sentinels, service_name, ...) or from_env()"
        )

    def reset(self) -> None:
        """Forget every connection and the master's address."""
        super().reset()
        self.master_address = None
        self._replica_counter = None

    # -- what SentinelManagedConnection asks of its pool ---------------------

    def get_master_address(self) -> Address:
        """Ask the sentinels for the master's address (called by each dial).

        When it changed, idle connections (to the old master) are closed now;
        connections in use are closed when released (see :meth:`release`).

        :raises redis.sentinel.MasterNotFoundError: no sentinel knows a
            healthy master.
        """
        if self._watch and self._watcher is None and not self.closed:
            self._watcher = _SwitchWatcher(self)
        host, port = self.sentinel_manager.discover_master(self.service_name)
        address = (host, int(port))
        if self.is_master:
            self._set_master(address)
        return address

    def _set_master(self, address: Address) -> None:
        previous, self.master_address = self.master_address, address
        if previous is not None and previous != address:
            logger.info(
                "pool %r: the master of %r moved from %s:%s to %s:%s",
                self.name, self.service_name, *previous, *address,
            )
            self.disconnect(inuse_connections=False)

    def _switched(self, data: Any, sentinel_client: Any) -> None:
        """Handle ``+switch-master <name> <old ip> <old port> <new ip> <new port>``."""
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        parts = str(data).split()
        if len(parts) != 5 or parts[0] != self.service_name or not parts[4].isdigit():
            return
        # Ask this sentinel first from now on, as discover_master() does with
        # the one that answers: the others may not have switched yet.
        sentinels = self.sentinel_manager.sentinels
        if sentinel_client in sentinels:
            sentinels.remove(sentinel_client)
            sentinels.insert(0, sentinel_client)
        self._set_master((parts[3], int(parts[4])))

    def _stop_watching(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()

    def _after_fork_in_child(self) -> None:
        # The child must not read the parent's subscription (greenpool._fork).
        super()._after_fork_in_child()
        self._stop_watching()

    def rotate_slaves(self) -> Iterator[Address]:
        """Yield the replicas round-robin, then the master as a fallback.

        :raises redis.sentinel.SlaveNotFoundError: after the last candidate.
        """
        replicas = self.sentinel_manager.discover_slaves(self.service_name)
        if replicas:
            if self._replica_counter is None:
                self._replica_counter = random.randrange(len(replicas))
            for _ in range(len(replicas)):
                self._replica_counter = (self._replica_counter + 1) % len(replicas)
                yield replicas[self._replica_counter]
        try:
            yield self.get_master_address()
        except MasterNotFoundError:
            pass
        raise SlaveNotFoundError(f"No slave found for {self.service_name!r}")

    rotate_replicas = rotate_slaves

    # -- retiring connections to a former master -----------------------------

    def _to_former_master(self, connection: Any) -> bool:
        raw = _redispy.raw_connection(connection)
        return (
            self.is_master
            and self.master_address is not None
            and bool(_redispy.sockets_of(raw))
            and (raw.host, raw.port) != self.master_address
        )

    # A connection to a former master is closed when it comes back.
    _custom_retire = True
    retire_on_release = _to_former_master

    def owns_connection(self, connection: Any) -> bool:
        """Whether the pool lent *connection* and it is not to a former master."""
        return super().owns_connection(connection) and not self._to_former_master(connection)

    def close(self) -> None:
        """Close the pool and its watcher, and the sentinel clients it made."""
        super().close()
        self._stop_watching()
        if self._owns_sentinel:
            for client in self.sentinel_manager.sentinels:
                client.connection_pool.disconnect()

    def _target(self) -> str:
        role = "master" if self.is_master else "replica"
        where = "%s:%s" % self.master_address if self.master_address else "not yet discovered"
        return f"sentinel {self.service_name!r} {role} at {where}"


# -- building clients ---------------------------------------------------------


def _client(
    sentinels: Union[Sentinel, str, Iterable[Any]],
    service_name: str,
    *,
    is_master: bool,
    sentinel_kwargs: Optional[Mapping[str, Any]],
    redis_class: type,
    sources: Optional[Mapping[str, "config.Source"]] = None,
    **kwargs: Any,
) -> Any:
    if not isinstance(service_name, str) or not service_name.strip():
        raise ConfigError(f"service_name must be a non-empty string (got {service_name!r})")
    owned = not isinstance(sentinels, Sentinel)
    if isinstance(sentinels, Sentinel):
        manager = sentinels
    else:
        addresses = _sentinel_addresses(sentinels, "sentinels")
        if sentinel_kwargs is None:
            # As redis-py does: the sentinels get the socket options, so a
            # hung sentinel cannot stall a dial for ever.
            sentinel_kwargs = {
                k: v for k, v in kwargs.items()
                if k in ("socket_timeout", "socket_connect_timeout") and v is not None
            }
        manager = Sentinel(addresses, sentinel_kwargs=dict(sentinel_kwargs))
    pool = SentinelBlockingConnectionPool(service_name, manager, is_master=is_master, **kwargs)
    pool._owns_sentinel = owned
    if sources is not None:
        pool.sources = sources
    return redis_class(connection_pool=pool)


def master_for(
    sentinels: Union[Sentinel, str, Iterable[Any]],
    service_name: str,
    *,
    sentinel_kwargs: Optional[Mapping[str, Any]] = None,
    redis_class: type = redis.Redis,
    **kwargs: Any,
) -> Any:
    """A client for the master of *service_name*, on a greenpool pool.

    :param sentinels: a :class:`redis.sentinel.Sentinel`, a list of
        ``(host, port)`` pairs, or ``"host:port,host:port"``.
    :param service_name: the name the sentinels monitor the master under.
    :param sentinel_kwargs: connection options for the sentinels themselves
        (``password`` ...); by default ``socket_timeout`` and
        ``socket_connect_timeout`` from *kwargs*.
    :param kwargs: pool settings (``max_connections``, ``timeout``, every
        greenpool setting) and redis-py connection options (``password``,
        ``db``, ``decode_responses`` ...).

    The client does not own the pool: close it with
    ``client.connection_pool.close()``, which also closes the sentinel
    connections made here.
    """
    return _client(
        sentinels, service_name, is_master=True, sentinel_kwargs=sentinel_kwargs,
        redis_class=redis_class, **kwargs,
    )


def replica_for(
    sentinels: Union[Sentinel, str, Iterable[Any]],
    service_name: str,
    *,
    sentinel_kwargs: Optional[Mapping[str, Any]] = None,
    redis_class: type = redis.Redis,
    **kwargs: Any,
) -> Any:
    """A read-only client whose connections rotate over the replicas.

    Each new connection goes to the next replica the sentinels report as
    up, or to the master when there is none. Arguments as for :func:`master_for`.
    """
    return _client(
        sentinels, service_name, is_master=False, sentinel_kwargs=sentinel_kwargs,
        redis_class=redis_class, **kwargs,
    )


# -- the environment ------------------------------------------------------------


@dataclass(frozen=True)
class SentinelConfig:
    """What :func:`resolve` found: where the sentinels are and what to ask."""

    sentinels: Tuple[Address, ...]
    service_name: str
    role: str  #: ``"master"`` or ``"replica"``


def resolve(
    environ: Optional[Mapping[str, str]] = None,
    *,
    prefix: str = "GREENPOOL_",
    overrides: Optional[Mapping[str, Any]] = None,
) -> SentinelConfig:
    """Read the Sentinel settings: explicit keyword > environment > default.

    :param overrides: ``sentinels``, ``sentinel_service``, ``sentinel_role``
        given explicitly (None counts as not given).
    :raises ConfigError: a value is malformed, or the sentinels or the
        service name are given nowhere.
    """
    environ = os.environ if environ is None else environ
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values: Dict[str, Any] = {}
    for setting in SETTINGS:
        name, variable = setting.name, prefix + setting.env
        if name in given:
            value, where, text = given[name], name, False
        elif variable in environ:
            value, where, text = environ[variable], variable, True
        elif setting.default is not None:
            values[name] = setting.default
            continue
        else:
            raise ConfigError(f"{variable} (or the keyword {name}) must be set: {setting.description}")
        if text:
            values[name] = config.parse(setting, value, where=where)
        elif name == "sentinels":
            values[name] = _sentinel_addresses(value, where)
        elif name == "sentinel_role":
            values[name] = _role(value, where)
        elif not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where} must be {setting.expected()} (got {value!r})")
        else:
            values[name] = value
    return SentinelConfig(tuple(values["sentinels"]), values["sentinel_service"], values["sentinel_role"])


def from_env(
    environ: Optional[Mapping[str, str]] = None,
    prefix: str = "GREENPOOL_",
    *,
    sentinel_kwargs: Optional[Mapping[str, Any]] = None,
    redis_class: type = redis.Redis,
    **overrides: Any,
) -> Any:
    """A client for a Sentinel-managed service, configured by the environment.

    ``GREENPOOL_SENTINELS``, ``GREENPOOL_SENTINEL_SERVICE`` and
    ``GREENPOOL_SENTINEL_ROLE`` (``master`` or ``replica``) say what to ask
    whom; the pool settings come from the usual ``GREENPOOL_*`` variables.
    ``GREENPOOL_URL`` (else ``REDIS_URL``), when set, contributes the
    credentials, database, TLS and query options of its URL, never its host
    and port: the sentinels name the server.

    Precedence: a keyword in *overrides* (``sentinels=``,
    ``sentinel_service=``, ``sentinel_role=``, any pool setting or redis-py
    connection option) > URL query option > environment > default.

    :raises ConfigError: for a bad or missing value, naming the variable.
    """
    environ = os.environ if environ is None else environ
    own = {k: overrides.pop(k) for k in list(overrides) if k in _BY_NAME}
    found = resolve(environ, prefix=prefix, overrides=own)
    settings = {k: v for k, v in overrides.items() if k in config.SETTINGS_BY_NAME}
    resolved = config.resolve(environ, prefix=prefix, overrides=settings)
    connection_kwargs = {}
    if resolved.url is not None:
        connection_kwargs = parse_url(resolved.url)
        if "path" in connection_kwargs:
            raise ConfigError(
                "with Sentinel the URL must be redis:// or rediss:// (got a unix:// URL)"
            )
        connection_kwargs.pop("host", None)
        connection_kwargs.pop("port", None)
        if connection_kwargs.pop("connection_class", None) is redis.SSLConnection:
            connection_kwargs["ssl"] = True
    connection_kwargs.update((k, v) for k, v in overrides.items() if k not in settings)
    return _client(
        list(found.sentinels), found.service_name, is_master=found.role == "master",
        sentinel_kwargs=sentinel_kwargs, redis_class=redis_class, sources=resolved.sources,
        **{k: v for k, v in resolved.options.items() if k != "url"},
        **connection_kwargs,
    )

