"""The demo's load generator and measurements.

Many greenlets share a small pool and run short commands as fast as the pool
lets them, for a fixed time; :func:`run_pool` reports how much got done and
how evenly it was shared. The ``demo`` command (:mod:`greenpool.cli`) runs it
for greenpool's pool and for redis-py's two pools under the same load.

Import this module only in a process that gevent has monkey-patched: the
load is greenlets doing socket I/O, and unpatched sockets would block the
hub on every command.

Every pool is measured the same way, from outside: :class:`redis.Redis` is
given a thin proxy of the pool that times each checkout and counts the
connections lent and the callers waiting, so no pool's own statistics (which
redis-py's pools do not keep) are needed.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import gevent
import redis

from . import config
from .pool import BlockingConnectionPool

__all__ = [
    "POOLS",
    "Progress",
    "Result",
    "build_pool",
    "close_pool",
    "delete_keys",
    "jain_index",
    "percentile",
    "run_pool",
]

#: The pools the demo compares: short name -> the name shown to the user.
POOLS: Mapping[str, str] = {
    "greenpool": "greenpool.BlockingConnectionPool",
    "redis": "redis.ConnectionPool",
    "redis-blocking": "redis.BlockingConnectionPool",
}

#: Every key the demo writes starts with this; :func:`delete_keys` removes them.
KEY_PREFIX = "greenpool:demo:"
#: Distinct keys per kind (value, counter): few, so commands hit the same keys.
KEYS = 64
#: Seconds to live of the values (and of counters a pipeline touched), so
#: that most keys go away even if the demo is killed before it cleans up.
KEY_TTL = 60
VALUE = "x" * 32
#: A greenlet whose command failed pauses this long, as a client would before
#: its next request. Without a pause, a pool that fails at once (redis-py's
#: ConnectionPool at its cap) would have its greenlets spin until the
#: deadline without ever yielding, starving the hub and every other greenlet.
ERROR_PAUSE = 0.01
#: At the deadline each greenlet ends after the command it is running, and a
#: waiting one as soon as it gets a connection (which it gives straight back).
#: One still busy this long after (its server stopped answering) is killed.
#: Killing is the last resort because redis-py's BlockingConnectionPool is not
#: kill-safe: a greenlet killed while waiting in its queue can break the
#: queue's lock ("Semaphore released too many times").
DRAIN_TIMEOUT = 2.0
# The command mix: cumulative shares of GET, SET, INCR; the rest (5 %) is a
# three-command pipeline, which holds its connection a little longer.
_GET, _SET, _INCR = 0.50, 0.80, 0.95


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index of *values*: ``(sum x)**2 / (n * sum x**2)``.

    1.0 when every value is equal, ``1/n`` when one value has everything.

    :returns: 0.0 when every value is zero (nothing was shared: the index is
        undefined there).
    :raises ValueError: for an empty sequence or a negative value.
    """
    if not values:
        raise ValueError("jain_index needs at least one value (got none)")
    if min(values) < 0:
        raise ValueError(f"jain_index needs values >= 0 (got {min(values)!r})")
    squares = math.fsum(x * x for x in values)
    if squares == 0:
        return 0.0
    return math.fsum(values) ** 2 / (len(values) * squares)


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile of *values* by the nearest-rank method.

    The result is always one of *values*: the smallest value that at least
    *q* percent of the values do not exceed (``q=0`` gives the minimum,
    ``q=100`` the maximum).

    :raises ValueError: for an empty sequence or *q* outside 0..100.
    """
    if not values:
        raise ValueError("percentile needs at least one value (got none)")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be between 0 and 100 (got {q!r})")
    ordered = sorted(values)
    rank = max(1, math.ceil(round(q / 100 * len(ordered), 9)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Progress:
    """A snapshot taken while :func:`run_pool` runs, for a live display.

    Rates and the percentile cover the time since the previous snapshot.
    """

    label: str
    elapsed: float  #: seconds since the load started
    duration: float  #: seconds the load lasts
    operations: int  #: completed since the start
    errors: int  #: failed since the start
    ops_per_second: float
    in_use: int  #: connections lent out now
    max_connections: int
    waiting: int  #: callers waiting for a connection now
    wait_p99: Optional[float]  #: seconds; None when nobody asked for one


@dataclass(frozen=True)
class Result:
    """What one pool achieved in :func:`run_pool`."""

    label: str
    greenlets: int
    max_connections: int
    duration: float  #: seconds the load ran
    operations: int  #: commands (a pipeline counts as one) that succeeded
    #: failures by exception type, e.g. ``{"MaxConnectionsError": 1200}``
    error_counts: Mapping[str, int] = field(default_factory=dict)
    #: one message per exception type, e.g. ``"Too many connections"``
    error_examples: Mapping[str, str] = field(default_factory=dict)
    starved: int = 0  #: greenlets that completed no operation
    fairness: float = 0.0  #: Jain's index over per-greenlet operations
    #: seconds: 99th percentile of the time a checkout took, failed ones included
    wait_p99: Optional[float] = None
    peak_in_use: int = 0  #: the most connections lent out at once

    @property
    def errors(self) -> int:
        """Failed operations of every kind (exhausted pool, timeouts ...)."""
        return sum(self.error_counts.values())

    @property
    def ops_per_second(self) -> float:
        """Operations per second of load."""
        return self.operations / self.duration if self.duration > 0 else 0.0


class _Stopped(Exception):
    """The run is over: the connection just obtained was given back."""


class _Meter:
    """A pool seen through a proxy that times checkouts and counts holders.

    :class:`redis.Redis` and its pipelines only call ``get_connection`` and
    ``release`` on their pool during commands; everything else they read
    (encoder, protocol, connection settings) is passed through.
    """

    def __init__(self, pool: Any, clock: Callable[[], float]) -> None:
        self._pool = pool
        self._clock = clock
        self.waits: List[float] = []  # seconds per checkout, failed ones included
        self.waiting = 0
        self.in_use = 0
        self.peak_in_use = 0
        self.stopping = False  # set at the deadline: checkouts end the worker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.waiting += 1
        start = self._clock()
        try:
            connection = self._pool.get_connection(*args, **kwargs)
        finally:
            self.waiting -= 1
            self.waits.append(self._clock() - start)
        if self.stopping:
            self._pool.release(connection)
            raise _Stopped
        self.in_use += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return connection

    def release(self, connection: Any) -> None:
        self.in_use -= 1
        self._pool.release(connection)


def _keys(index: int) -> Tuple[str, str]:
    slot = index % KEYS
    return f"{KEY_PREFIX}value:{slot}", f"{KEY_PREFIX}counter:{slot}"


def _worker(
    client: redis.Redis,
    meter: _Meter,
    index: int,
    deadline: float,
    clock: Callable[[], float],
    completions: List[int],
    failures: Dict[str, List[Any]],
    rng: random.Random,
) -> None:
    key, counter = _keys(index)
    while clock() < deadline and not meter.stopping:
        roll = rng.random()
        try:
            if roll < _GET:
                client.get(key)
            elif roll < _SET:
                client.set(key, VALUE, ex=KEY_TTL)
            elif roll < _INCR:
                client.incr(counter)
            else:
                pipe = client.pipeline(transaction=False)
                pipe.incr(counter)
                pipe.get(key)
                pipe.expire(counter, KEY_TTL)
                pipe.execute()
        except _Stopped:
            return
        except redis.RedisError as exc:
            kind = failures.setdefault(type(exc).__name__, [0, str(exc)])
            kind[0] += 1
            gevent.sleep(ERROR_PAUSE)
        else:
            completions[index] += 1


def run_pool(
    pool: Any,
    *,
    greenlets: int,
    duration: float,
    label: Optional[str] = None,
    on_progress: Optional[Callable[[Progress], None]] = None,
    interval: float = 0.5,
    seed: int = 0,
) -> Result:
    """Run *greenlets* greenlets over *pool* for *duration* seconds.

    Each greenlet loops on a mix of GET, SET, INCR and a small pipeline
    (on keys under ``greenpool:demo:``; see :func:`delete_keys`) until the
    time is up. The result is taken at the deadline; then every greenlet
    ends and is joined (see :data:`DRAIN_TIMEOUT`), also when the caller is
    interrupted (``KeyboardInterrupt``). The pool is left open: close it
    with :func:`close_pool`.

    :param pool: any redis-py connection pool.
    :param label: the name in :class:`Progress` and :class:`Result`; by
        default the pool's class.
    :param on_progress: called every *interval* seconds until the deadline.
    :param seed: seeds each greenlet's command mix, for repeatable runs.
    """
    if greenlets < 1:
        raise ValueError(f"greenlets must be >= 1 (got {greenlets!r})")
    if not duration > 0:
        raise ValueError(f"duration must be > 0 seconds (got {duration!r})")
    clock = time.monotonic
    label = label or f"{type(pool).__module__}.{type(pool).__name__}"
    meter = _Meter(pool, clock)
    client = redis.Redis(connection_pool=meter)  # type: ignore[arg-type]
    completions = [0] * greenlets
    failures: Dict[str, List[Any]] = {}
    start = clock()
    deadline = start + duration
    workers = [
        gevent.spawn(_worker, client, meter, i, deadline, clock, completions, failures,
                     random.Random(seed * 1_000_003 + i))
        for i in range(greenlets)
    ]
    try:
        last_time, last_ops, last_wait = start, 0, 0
        while True:
            now = clock()
            if now >= deadline:
                break
            gevent.sleep(min(interval, deadline - now))
            now, ops = clock(), sum(completions)
            if on_progress is None or now >= deadline:
                continue  # the end is summed up in the Result, not here
            window = meter.waits[last_wait:]
            on_progress(Progress(
                label=label,
                elapsed=min(now - start, duration),
                duration=duration,
                operations=ops,
                errors=sum(kind[0] for kind in failures.values()),
                ops_per_second=(ops - last_ops) / (now - last_time) if now > last_time else 0.0,
                in_use=meter.in_use,
                max_connections=pool.max_connections,
                waiting=meter.waiting,
                wait_p99=percentile(window, 99) if window else None,
            ))
            last_time, last_ops, last_wait = now, ops, len(meter.waits)
        # Taken without yielding, so the greenlets winding down below add
        # nothing to the result.
        elapsed = clock() - start
        per_greenlet = list(completions)
        waits = list(meter.waits)
        errors = {name: kind[0] for name, kind in failures.items()}
        examples = {name: kind[1] for name, kind in failures.items()}
    finally:
        meter.stopping = True
        gevent.joinall(workers, timeout=DRAIN_TIMEOUT)
        gevent.killall([w for w in workers if not w.dead], block=True, timeout=DRAIN_TIMEOUT)
    return Result(
        label=label,
        greenlets=greenlets,
        max_connections=pool.max_connections,
        duration=elapsed,
        operations=sum(per_greenlet),
        error_counts=dict(Counter(errors).most_common()),
        error_examples=examples,
        starved=per_greenlet.count(0),
        fairness=jain_index(per_greenlet),
        wait_p99=percentile(waits, 99) if waits else None,
        peak_in_use=meter.peak_in_use,
    )


def build_pool(kind: str, url: str, *, max_connections: int, timeout: float) -> Any:
    """Build one of the :data:`POOLS` for *url*, bounded the same way.

    redis-py's ``ConnectionPool`` has no timeout: at its cap it fails at once.
    greenpool's settings in the URL's query or the environment apply to
    greenpool's pool only; redis-py's pools get the URL without them (they
    would pass them to their connections as unknown keywords).

    :raises ValueError: for an unknown *kind*.
    """
    if kind == "greenpool":
        return BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, name="demo"
        )
    plain = config.resolve(url=url).url
    assert plain is not None
    if kind == "redis":
        return redis.ConnectionPool.from_url(plain, max_connections=max_connections)
    if kind == "redis-blocking":
        return redis.BlockingConnectionPool.from_url(
            plain, max_connections=max_connections, timeout=timeout
        )
    raise ValueError(f"kind must be one of {', '.join(POOLS)} (got {kind!r})")


def close_pool(pool: Any) -> None:
    """Close a pool built by :func:`build_pool` and every connection it holds."""
    if isinstance(pool, BlockingConnectionPool):
        pool.close()
    else:
        # redis-py 4.6's pools have no close(); disconnect() closes them all.
        pool.disconnect()


def delete_keys(client: redis.Redis) -> int:
    """Delete the keys the demo writes; return how many existed."""
    keys = [key for index in range(KEYS) for key in _keys(index)]
    return int(client.delete(*keys))
