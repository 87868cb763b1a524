# The imports below must follow patch_all() when run as a worker:
# ruff: noqa: E402
"""The workloads: one scenario, one pool, in this fresh process.

The harness runs each configuration as
``python -m benchmarks.scenarios '{"scenario": ..., "pool": ..., "url": ..., "params": {...}}'``
in a new interpreter that monkey-patches before importing redis, as a gevent
application does, and reads one JSON object from the last line of stdout:
``{"metrics": {...}, "parser": ...}``. Run by hand, the same command
reproduces a single measurement; ``--profile`` before the spec adds a
cProfile summary on stderr.

The pools (names as in :data:`benchmarks.report.POOLS`):

``greenpool``, ``redis-blocking``
    the blocking pools, ``max_connections=M``;
``redis-bounded``
    ``redis.ConnectionPool(max_connections=M)``: past M it raises
    "Too many connections"; the caller counts it, yields
    (``gevent.sleep(0)``) and tries again;
``redis-unbounded``
    ``redis.ConnectionPool(max_connections=2**31)`` (redis-py reads ``None``
    as 100, so the bound is given explicitly): a connection per caller;
``pinned``
    the ceiling, with no pool code at all: M ``redis.Redis`` clients built
    with ``single_connection_client=True``, each owning one dedicated
    connection, and greenlet *i* uses client ``i % M``. The client's own
    lock (a gevent lock after patching) serialises the greenlets sharing
    it. gevent's lock lets a releasing greenlet take it straight back, so
    in practice one greenlet per connection runs back-to-back commands with
    no hand-off: the most throughput M connections give this process,
    and, by the same token, no model of fairness.

Every connection is a :class:`CountingConnection`, which counts the sockets
it opens (``connections`` in every result, ``opened`` in the spike).
"""

from __future__ import annotations

if __name__ == "__main__":
    # Before socket, ssl or redis are imported: every run measures a
    # monkey-patched process, as a gevent application is.
    from gevent import monkey

    monkey.patch_all()

import hashlib
import inspect
import json
import os
import platform
import sys
from time import perf_counter
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import gevent
import redis
from gevent import monkey
from gevent.event import Event
from redis.exceptions import ConnectionError as RedisConnectionError

import greenpool
import greenpool.pool

from . import report

__all__ = ["CountingConnection", "Subject", "open_subject", "classify", "run", "main"]

#: redis-py's "unbounded": ``max_connections=None`` means 100 in redis-py 8.
UNBOUNDED = 2**31

_KEYS = 64  # distinct keys the contended greenlets spread over


class CountingConnection(redis.Connection):
    """A redis-py connection that counts the sockets it opens."""

    #: Sockets opened in this process (one configuration per process).
    opened = 0
    #: The reply parser class of the last connection opened.
    parser = ""

    def _connect(self) -> Any:
        sock = super()._connect()
        CountingConnection.opened += 1
        CountingConnection.parser = type(self._parser).__name__
        return sock


class _TimedLock:
    """Wraps a pinned client's lock, timing each acquire as a wait."""

    def __init__(self, lock: Any, waits: List[float]) -> None:
        self._lock = lock
        self._waits = waits

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        start = perf_counter()
        acquired = self._lock.acquire(*args, **kwargs)
        self._waits.append(perf_counter() - start)
        return acquired

    def release(self) -> None:
        self._lock.release()


def _timed(cls: type, waits: List[float]) -> type:
    """A subclass of the pool class *cls* that times each ``get_connection``."""

    class Timed(cls):
        def get_connection(self, *args: Any, **kwargs: Any) -> Any:
            start = perf_counter()
            connection = super().get_connection(*args, **kwargs)
            waits.append(perf_counter() - start)
            return connection

    Timed.__name__ = Timed.__qualname__ = cls.__name__
    return Timed


_CLASSES: Dict[str, Any] = {
    "greenpool": greenpool.BlockingConnectionPool,
    "redis-blocking": redis.BlockingConnectionPool,
    "redis-bounded": redis.ConnectionPool,
    "redis-unbounded": redis.ConnectionPool,
}


class Subject:
    """What a scenario drives: a pool and one client on it, or the pinned clients."""

    def __init__(self, name: str, clients: List[redis.Redis], pool: Any) -> None:
        self.name = name
        self.clients = clients
        #: The pool; ``None`` for ``pinned``.
        self.pool = pool

    def client(self, i: int) -> redis.Redis:
        """The client greenlet *i* uses."""
        return self.clients[i % len(self.clients)]

    def warm(self, count: int) -> None:
        """Open *count* connections and put them back (pinned clients already are)."""
        if self.pool is None:
            return
        args = checkout_args(self.pool)
        held = [self.pool.get_connection(*args) for _ in range(count)]
        for connection in held:
            self.pool.release(connection)

    def close(self) -> None:
        """Close every connection."""
        for client in self.clients:
            client.close()
            client.connection_pool.disconnect()
        if self.pool is not None:
            getattr(self.pool, "close", self.pool.disconnect)()


def open_subject(
    name: str, url: str, m: int, timeout: Optional[float], waits: Optional[List[float]] = None
) -> Subject:
    """Build pool *name* with *m* connections (pinned: *m* clients).

    :param waits: if given, the time of each successful checkout (pinned:
        each acquire of a client's lock) is appended to it, in seconds.
    """
    if name == "pinned":
        clients = []
        for _ in range(m):
            pool = redis.ConnectionPool.from_url(
                url, connection_class=CountingConnection, max_connections=1
            )
            client = redis.Redis(connection_pool=pool, single_connection_client=True)
            if waits is not None:
                # Duck-typed: the client only calls acquire() and release().
                lock = _TimedLock(client.single_connection_lock, waits)
                client.single_connection_lock = lock  # type: ignore[assignment]
            clients.append(client)
        return Subject(name, clients, None)
    if name not in _CLASSES:
        raise ValueError(f"pool must be one of {', '.join(report.POOLS)} (got {name!r})")
    cls: Any = _CLASSES[name] if waits is None else _timed(_CLASSES[name], waits)
    kwargs: Dict[str, Any] = {"connection_class": CountingConnection}
    if name in ("greenpool", "redis-blocking"):
        kwargs.update(max_connections=m, timeout=timeout)
    else:
        kwargs["max_connections"] = m if name == "redis-bounded" else UNBOUNDED
    pool = cls.from_url(url, **kwargs)
    return Subject(name, [redis.Redis(connection_pool=pool)], pool)


def classify(exc: BaseException) -> str:
    """``timeouts`` (waited for a connection in vain), ``rejections`` or ``errors``."""
    text = str(exc)
    if isinstance(exc, greenpool.PoolTimeout) or "No connection available" in text:
        return "timeouts"
    if "Too many connections" in text:  # MaxConnectionsError, or ConnectionError in redis-py 4
        return "rejections"
    return "errors"


def _failed(failures: Dict[str, Any], exc: BaseException) -> None:
    """Count a failed command, and yield unless the caller already waited."""
    kind = classify(exc)
    failures[kind] += 1
    if kind == "rejections":
        gevent.sleep(0)
    elif kind == "errors":
        failures.setdefault("first_error", repr(exc))
        gevent.sleep(0.01)  # a broken server: do not spin


def _start_together() -> None:
    # Let every spawned greenlet reach the starting line (go.wait()) first.
    gevent.sleep(0)


def _finish(greenlets: List[gevent.Greenlet], timeout: float) -> bool:
    """Join *greenlets* for up to *timeout* s, kill stragglers; whether all finished."""
    done = gevent.joinall(greenlets, timeout=timeout)
    if len(done) == len(greenlets):
        return True
    gevent.killall(greenlets, timeout=5)
    return False


# -- the scenarios -------------------------------------------------------------


def checkout_args(pool: Any) -> Tuple[str, ...]:
    """Arguments for ``pool.get_connection``: redis-py before 5.3 requires a
    command name, later versions deprecate passing one."""
    params = list(inspect.signature(pool.get_connection).parameters.values())
    needs_name = bool(params) and params[0].default is inspect.Parameter.empty and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return ("_",) if needs_name else ()


def _pool_loop(pool: Any, n: int) -> float:
    args = checkout_args(pool)
    start = perf_counter()
    for _ in range(n):
        pool.release(pool.get_connection(*args))
    return perf_counter() - start


def _lock_loop(lock: Any, n: int) -> float:
    start = perf_counter()
    for _ in range(n):
        lock.acquire()
        lock.release()
    return perf_counter() - start


def micro(name: str, url: str, params: Mapping[str, Any]) -> Dict[str, Any]:
    """One greenlet, a warm pool: the cost of one checkout and release.

    The iteration count is calibrated (doubling) until one timing lasts
    ``min_time`` seconds, unless ``iterations`` is given; then
    ``inner_repeat`` timings, of which the best is the result (as timeit
    does: slower timings measure interference). The garbage collector stays
    on, as in an application. For ``pinned`` the loop acquires and releases
    the client's lock, its whole "checkout".
    """
    subject = open_subject(name, url, 1 if name == "pinned" else 8, 20.0)
    try:
        loop: Callable[[int], float]
        if subject.pool is not None:
            pool = subject.pool
            pool.release(pool.get_connection(*checkout_args(pool)))
            loop = lambda n: _pool_loop(pool, n)  # noqa: E731
        else:
            lock = subject.clients[0].single_connection_lock
            loop = lambda n: _lock_loop(lock, n)  # noqa: E731
        iterations = params.get("iterations")
        if not iterations:
            iterations = 100
            while loop(iterations) < params["min_time"] and iterations < 50_000_000:
                iterations *= 2
        timings = [loop(iterations) / iterations * 1e9 for _ in range(params["inner_repeat"])]
    finally:
        subject.close()
    return {
        "ns_per_op": min(timings),
        "ns_per_op_median": report.median(timings),
        "ns_per_op_all": timings,
        "iterations": iterations,
        "connections": CountingConnection.opened,
    }


def contended(name: str, url: str, params: Mapping[str, Any]) -> Dict[str, Any]:
    """N greenlets share M connections until a budget of commands is spent.

    Each greenlet alternates GET and SET on one of 64 keys. The clock and
    the budget start when the last greenlet starts (see :func:`fairness`);
    commands run before that are not counted. A counted command is claimed
    from the budget before it runs and given back if it fails, so exactly
    ``budget`` commands succeed unless ``max_seconds`` runs out first
    (``truncated``). Waits are the times to get a connection.
    """
    n, m, budget = params["n"], params["m"], params["budget"]
    waits: List[float] = []
    subject = open_subject(name, url, m, params["timeout"], waits)
    value = b"v" * params["value_size"]
    keys = [f"bench:{i}" for i in range(_KEYS)]
    subject.warm(m)
    subject.client(0).mset({key: value for key in keys})
    failures: Dict[str, Any] = {"timeouts": 0, "rejections": 0, "errors": 0}
    done = [0] * n
    left = budget
    arrived = 0
    start = float("inf")
    first_wait = 0  # waits before the clock started are not counted
    deadline = perf_counter() + params["max_seconds"]
    go = Event()

    def user(i: int) -> None:
        nonlocal left, arrived, start, first_wait, deadline
        client = subject.client(i)
        key = keys[i % _KEYS]
        go.wait()
        arrived += 1
        if arrived == n:
            start = perf_counter()
            deadline = start + params["max_seconds"]
            first_wait = len(waits)
        calls = 0
        while left > 0 and perf_counter() < deadline:
            counted = arrived == n
            left -= counted
            try:
                if calls & 1:
                    client.set(key, value)
                else:
                    client.get(key)
            except RedisConnectionError as exc:
                left += counted
                _failed(failures, exc)
                continue
            calls += 1
            done[i] += counted

    greenlets = [gevent.spawn(user, i) for i in range(n)]
    _start_together()
    deadline = perf_counter() + params["max_seconds"]
    go.set()
    finished = _finish(greenlets, params["max_seconds"] + params["timeout"] + 10)
    elapsed = perf_counter() - start
    subject.close()
    completed = sum(done)
    counted_waits = waits[first_wait:]
    has_waits = bool(counted_waits) and arrived == n
    return {
        "ops_per_s": completed / elapsed if elapsed > 0 else 0.0,
        "completed": completed,
        "elapsed": elapsed,
        "wait_p50": report.percentile(counted_waits, 50) if has_waits else None,
        "wait_p90": report.percentile(counted_waits, 90) if has_waits else None,
        "wait_p99": report.percentile(counted_waits, 99) if has_waits else None,
        "wait_max": max(counted_waits) if has_waits else None,
        "jain": report.jain_index(done),
        "connections": CountingConnection.opened,
        "truncated": completed < budget or not finished,
        **failures,
    }


def fairness(name: str, url: str, params: Mapping[str, Any]) -> Dict[str, Any]:
    """N greenlets loop on GET for a fixed time over M connections.

    Every greenlet asks again as soon as its command returns, the case
    where a pool that lets the releaser barge in starves the waiters.
    The window opens when the last greenlet starts: the first ones woken
    can run many commands before the hub wakes the rest (a reply already
    there costs no switch), an artefact of starting together that would
    otherwise weigh on Jain's index. Completions outside the window are
    not counted; gaps are per greenlet (see :func:`benchmarks.report.gap_stats`).
    """
    n, m, duration = params["n"], params["m"], params["duration"]
    subject = open_subject(name, url, m, params["timeout"])
    subject.warm(m)
    subject.client(0).set("bench:fair", b"v" * 16)
    failures: Dict[str, Any] = {"timeouts": 0, "rejections": 0, "errors": 0}
    completions: List[List[float]] = [[] for _ in range(n)]
    arrived = 0
    start = end = float("inf")
    go = Event()

    def user(i: int) -> None:
        nonlocal arrived, start, end
        client = subject.client(i)
        times = completions[i]
        go.wait()
        arrived += 1
        if arrived == n:
            start = perf_counter()
            end = start + duration
        while perf_counter() < end:
            try:
                client.get("bench:fair")
            except RedisConnectionError as exc:
                _failed(failures, exc)
                continue
            times.append(perf_counter())

    greenlets = [gevent.spawn(user, i) for i in range(n)]
    _start_together()
    go.set()
    finished = _finish(greenlets, duration + params["timeout"] + 10)
    subject.close()
    if arrived < n:  # never all running: killed by _finish
        start, end = 0.0, 0.0
    within = [[t for t in times if start <= t <= end] for times in completions]
    counts = [len(times) for times in within]
    gaps = report.gap_stats(start, end, within)
    return {
        "ops_per_s": sum(counts) / duration,
        "completions": sum(counts),
        "completions_min": min(counts),
        "completions_max": max(counts),
        "starved": sum(1 for c in counts if c == 0),
        "jain": report.jain_index(counts),
        **gaps,
        "connections": CountingConnection.opened,
        "truncated": not finished,
        **failures,
    }


def spike(name: str, url: str, params: Mapping[str, Any]) -> Dict[str, Any]:
    """Many callers at once, one GET each, on a few warm connections.

    ``opened`` counts the connections opened while serving the spike.
    ``pinned`` has ``warm`` clients and opens none by construction.
    """
    callers, warm = params["callers"], params["warm"]
    m = warm if name == "pinned" else params["max_connections"]
    subject = open_subject(name, url, m, params["timeout"])
    subject.warm(warm)
    subject.client(0).set("bench:spike", b"v" * 16)
    before = CountingConnection.opened
    failures: Dict[str, Any] = {"timeouts": 0, "rejections": 0, "errors": 0}
    go = Event()

    def caller(i: int) -> None:
        client = subject.client(i)
        go.wait()
        try:
            client.get("bench:spike")
        except RedisConnectionError as exc:
            failures[classify(exc)] += 1

    greenlets = [gevent.spawn(caller, i) for i in range(callers)]
    _start_together()
    start = perf_counter()
    go.set()
    finished = _finish(greenlets, params["timeout"] + 10)
    elapsed = perf_counter() - start
    opened = CountingConnection.opened - before
    subject.close()
    return {
        "opened": opened,
        "connections": CountingConnection.opened,
        "elapsed": elapsed,
        "failures": sum(failures.values()),
        "truncated": not finished,
        **failures,
    }


def probe(url: str) -> Dict[str, Any]:
    """The environment the measurements run in, for the report's header."""
    client = redis.Redis.from_url(url)
    info = client.info("server")
    connection = client.connection_pool.get_connection(*checkout_args(client.connection_pool))
    parser = type(connection._parser).__name__
    protocol = getattr(connection, "protocol", 2)
    client.connection_pool.release(connection)
    client.connection_pool.disconnect()
    try:
        import hiredis

        hiredis_version: Optional[str] = hiredis.__version__
    except ImportError:
        hiredis_version = None
    affinity = getattr(os, "sched_getaffinity", None)
    with open(greenpool.pool.__file__, "rb") as source:
        # Ties results to the pool's code while it is being optimised.
        pool_digest = hashlib.sha1(source.read()).hexdigest()[:12]
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "redis_py": redis.__version__,
        "hiredis": hiredis_version,
        "parser": parser,
        "protocol": protocol,
        "gevent": gevent.__version__,
        "greenpool": greenpool.__version__,
        "greenpool_pool_sha1": pool_digest,
        "redis_server": info.get("redis_version"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(affinity(0)) if affinity else None,
        "platform": platform.platform(),
        "monkey_patched": monkey.is_module_patched("socket"),
    }


_SCENARIOS: Dict[str, Callable[[str, str, Mapping[str, Any]], Dict[str, Any]]] = {
    "micro": micro,
    "contended": contended,
    "fairness": fairness,
    "spike": spike,
}


def run(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """Run the measurement *spec* describes and return its result."""
    if spec["scenario"] == "probe":
        return probe(spec["url"])
    if spec["scenario"] not in _SCENARIOS:
        raise ValueError(
            f"scenario must be one of {', '.join(_SCENARIOS)} or probe (got {spec['scenario']!r})"
        )
    metrics = _SCENARIOS[spec["scenario"]](spec["pool"], spec["url"], spec["params"])
    return {"metrics": metrics, "parser": CountingConnection.parser}


def _profiled(spec: Mapping[str, Any], top: int = 30) -> Dict[str, Any]:
    """Run *spec* under cProfile; print the functions with the most own time to stderr.

    Own time ("tottime") stays meaningful under gevent; cumulative times do
    not, because a greenlet switch looks like a call that never returns.
    """
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    result = profiler.runcall(run, spec)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    sys.stderr.write(text.getvalue())
    return result


def main(argv: Optional[List[str]] = None) -> int:
    """Worker entry point: one JSON spec in argv, one JSON result on stdout.

    ``--profile`` before the spec also prints a cProfile summary to stderr.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    profile = args[:1] == ["--profile"]
    if profile:
        args = args[1:]
    if len(args) != 1:
        sys.stderr.write("usage: python -m benchmarks.scenarios [--profile] '<json spec>'\n")
        return 2
    if not monkey.is_module_patched("socket"):
        # Imported rather than run: redis was imported before any patching.
        raise RuntimeError(
            "the workloads need a monkey-patched process: run python -m benchmarks.scenarios"
        )
    spec = json.loads(args[0])
    result = _profiled(spec) if profile else run(spec)
    sys.stdout.write(report.json_line(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
