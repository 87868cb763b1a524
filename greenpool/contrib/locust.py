"""Load-test Redis with locust: Redis commands in locust's statistics.

:class:`RedisUser` is an abstract locust ``User`` whose ``self.client`` is a
:class:`redis.Redis` on one greenpool pool shared by every user of the locust
process::

    from locust import task
    from greenpool.contrib.locust import RedisUser

    class CacheUser(RedisUser):
        @task
        def read(self):
            self.client.get("greeting")

    # locust -f locustfile.py --host redis://127.0.0.1:6379/0

Each command is one locust request: type ``redis``, named after the command
(``GET``, ``CLIENT LIST``); a pipeline or transaction is one request named
``pipeline:`` and its distinct commands in order (``pipeline:SET,EXPIRE``).
A failed command, a :class:`~greenpool.PoolTimeout` included, is reported as
a failure with its message (the event's ``exception`` is a
:class:`RedisFailure` whose ``error`` is the exception) and then raised as
usual, so the rest of the task is skipped; locust also lists an uncaught
one under Exceptions. ``response_length`` is the length of a string reply,
the number of items of a list, set or dict reply, else 0 (a pipeline: the
sum over its replies).

The pool reads ``GREENPOOL_*`` variables (:func:`greenpool.from_env`); a
``redis://``, ``rediss://`` or ``unix://`` ``--host`` wins over
``GREENPOOL_URL`` and ``REDIS_URL`` (another ``--host``, such as an HTTP one
meant for other users, is ignored). Its statistics go to the
``greenpool.locust`` logger every :attr:`RedisUser.stats_interval` seconds and
when the test stops, which also closes the pool.

Importing this module imports locust, which monkey-patches the process.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gevent
import redis
from redis.client import Pipeline

from ..env import from_env
from ..pool import BlockingConnectionPool

try:
    from locust import User
    from locust.env import Environment
    from locust.event import EventHook
except ImportError as exc:  # the optional dependency is missing
    raise ImportError(
        "greenpool.contrib.locust needs locust, which is not installed: "
        "pip install 'greenpool[locust]'"
    ) from exc

__all__ = ["RedisUser", "RedisClient", "RedisFailure"]

logger = logging.getLogger("greenpool.locust")

_URL_SCHEMES = ("redis://", "rediss://", "unix://")
#: Distinct command names a pipeline's request name lists before "+N".
_PIPELINE_NAMES = 4


def _command_name(name: Any) -> str:
    if isinstance(name, (bytes, bytearray)):
        name = name.decode("utf-8", "replace")
    return str(name).upper()


def _pipeline_name(stack: Sequence[Tuple[Sequence[Any], Any]]) -> str:
    names = list(dict.fromkeys(_command_name(args[0]) for args, _ in stack))
    if not names:  # execute() after WATCH with nothing queued
        return "pipeline"
    more = len(names) - _PIPELINE_NAMES
    return "pipeline:" + ",".join(names[:_PIPELINE_NAMES]) + (f",+{more}" if more > 0 else "")


def _length(reply: Any) -> int:
    """Bytes (or characters) of a string reply, items of a collection, else 0."""
    if isinstance(reply, (bytes, bytearray, str, list, tuple, set, dict)):
        return len(reply)
    return 0


class RedisFailure(Exception):
    """A failed command as reported to locust; the error raised is :attr:`error`.

    locust names a failure by its ``repr()``, and redis-py 8's errors print
    as ``network:PoolTimeout``, without their message. This one prints as
    ``PoolTimeout('no connection from pool ...')`` on every redis-py version.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error

    def __repr__(self) -> str:
        return f"{type(self.error).__name__}({str(self.error)!r})"

    def __str__(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"


class _Reporter:
    """Times a call and fires one locust request event for it."""

    __slots__ = ("event", "user")

    def __init__(self, event: EventHook, user: Optional[User]) -> None:
        self.event = event
        self.user = user

    def call(self, name: str, length: Callable[[Any], int], fn: Callable[..., Any],
             *args: Any, **kwargs: Any) -> Any:
        start_time = time.time()
        start = time.perf_counter()
        try:
            reply = fn(*args, **kwargs)
        except Exception as exc:
            # Only Exception: GreenletExit means locust stopped the user, which
            # is no failure of the command.
            self._fire(name, start_time, start, 0, RedisFailure(exc))
            raise
        self._fire(name, start_time, start, length(reply), None)
        return reply

    def _fire(self, name: str, start_time: float, start: float, length: int,
              failure: Optional[RedisFailure]) -> None:
        self.event.fire(
            request_type="redis",
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=failure,
            context=self.user.context() if self.user is not None else {},
            start_time=start_time,
        )


class RedisClient(redis.Redis):
    """A :class:`redis.Redis` that reports every command as a locust request.

    :param connection_pool: the pool to use; the client does not close it.
    :param request_event: where to report, usually
        ``environment.events.request``.
    :param user: the locust user whose ``context()`` goes with each event.
    """

    def __init__(self, *, connection_pool: redis.ConnectionPool, request_event: EventHook,
                 user: Optional[User] = None) -> None:
        super().__init__(connection_pool=connection_pool)
        self._reporter = _Reporter(request_event, user)

    def execute_command(self, *args: Any, **options: Any) -> Any:
        return self._reporter.call(
            _command_name(args[0]), _length, super().execute_command, *args, **options
        )

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        pipe = _ReportingPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe._reporter = self._reporter
        return pipe


class _ReportingPipeline(Pipeline):
    """A pipeline whose ``execute()`` is one locust request."""

    _reporter: _Reporter

    def execute(self, raise_on_error: bool = True) -> List[Any]:
        if not self.command_stack and not self.watching:
            return super().execute(raise_on_error)  # nothing is sent
        replies: List[Any] = self._reporter.call(
            _pipeline_name(self.command_stack),
            lambda replies: sum(_length(reply) for reply in replies),
            super().execute,
            raise_on_error,
        )
        return replies

    def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        # WATCH, and commands after it, run at once: each is a round trip.
        return self._reporter.call(
            _command_name(args[0]), _length, super().immediate_execute_command,
            *args, **options,
        )


class _SharedPools:
    """The pools of one locust Environment, closed when its test stops.

    It holds the Environment's events, never the Environment itself, so
    :data:`_shared`'s weak key can go.
    """

    def __init__(self, events: Any) -> None:
        self.events = events
        self.pools: Dict[Optional[str], BlockingConnectionPool] = {}
        self.reporters: List[gevent.Greenlet] = []
        self.closed = False
        events.test_stop.add_listener(self.close)
        events.quitting.add_listener(self.close)

    def get(self, host: Optional[str], stats_interval: Optional[float]) -> BlockingConnectionPool:
        url = host if host and host.startswith(_URL_SCHEMES) else None
        pool = self.pools.get(url)
        if pool is not None:
            return pool
        if host and url is None:
            logger.info("RedisUser ignores host %r (not a redis://, rediss:// or unix:// "
                        "URL); the pool reads GREENPOOL_URL or REDIS_URL", host)
        pool = from_env() if url is None else from_env(url=url)
        self.pools[url] = pool
        logger.info("RedisUser pool: %r", pool)
        if stats_interval:
            reporter = gevent.spawn(_report_stats, pool, stats_interval)
            reporter.name = f"{pool.name}-locust-stats"
            self.reporters.append(reporter)
        return pool

    def close(self, environment: Any = None, **_kwargs: Any) -> None:
        """Log each pool's final statistics and close it (a locust listener)."""
        self.closed = True
        self.events.test_stop.remove_listener(self.close)
        self.events.quitting.remove_listener(self.close)
        if environment is not None and _shared.get(environment) is self:
            del _shared[environment]
        gevent.killall(self.reporters)
        for pool in self.pools.values():
            logger.info("%s (test stopped, pool closed)", _stats_line(pool))
            pool.close()


#: Environment -> its pools. A new test after a stop builds new ones.
_shared: weakref.WeakKeyDictionary[Environment, _SharedPools] = weakref.WeakKeyDictionary()


def _stats_line(pool: BlockingConnectionPool) -> str:
    s = pool.stats()
    closed = ",".join(f"{reason}:{n}" for reason, n in s.closed.items() if n) or "0"
    return (
        f"pool {s.name!r}: size={s.size}/{s.max_connections} idle={s.idle} "
        f"in_use={s.in_use} dialling={s.dialling} waiting={s.waiting} "
        f"checkouts={s.checkouts} waits={s.waits} wait_time={s.wait_time:.2f}s "
        f"timeouts={s.timeouts} created={s.created} dial_errors={s.dial_errors} "
        f"closed={closed}"
    )


def _report_stats(pool: BlockingConnectionPool, interval: float) -> None:
    while not pool.closed:
        gevent.sleep(interval)
        logger.info("%s", _stats_line(pool))


class RedisUser(User):
    """An abstract locust user whose ``client`` is a reporting :class:`redis.Redis`.

    Every user of the locust process shares one pool per Redis URL, built
    by the first user from ``GREENPOOL_*`` variables and a Redis ``--host``,
    and closed when the test stops. Subclasses that override
    :meth:`on_stop` should call ``super().on_stop()``.
    """

    abstract = True
    #: Seconds between two log lines of pool statistics; None for none.
    stats_interval: Optional[float] = 10.0

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        shared = _shared.get(environment)
        if shared is None or shared.closed:
            shared = _shared[environment] = _SharedPools(environment.events)
        # The runner copies --host to each user class; environment.host also
        # serves users built by hand (tests, locust.run_single_user).
        pool = shared.get(self.host or environment.host, self.stats_interval)
        self.client = RedisClient(
            connection_pool=pool, request_event=environment.events.request, user=self
        )

    def on_stop(self) -> None:
        # close() gives back a connection the client holds (none unless
        # single_connection_client) and leaves the shared pool open.
        self.client.close()
