"""What the OS-thread guard costs on the checkout+release hot path.

::

    python -m benchmarks.guard_cost [--repeat 9] [--url redis://...]

``get_connection()`` and ``release()`` each begin with a check that the
caller runs in the OS thread the pool belongs to (DESIGN.md, "Threads": a
pool used from another thread must fail clearly, never corrupt its state).
This script measures the micro scenario's loop, in one monkey-patched
process and interleaved, for three pools: greenpool as shipped, the same
pool with the two checks removed (built from the shipped source, so it
cannot drift from it), and redis.BlockingConnectionPool; it prints medians
and the ratio of each greenpool variant to redis-py's pool.

It answers issue 7's question of what the "50x redis.BlockingConnectionPool"
micro target would take; the guard stays, as the contract asks.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402
import argparse
import inspect
import statistics
import sys
import textwrap
from time import perf_counter
from typing import Any, Dict, List, Optional, Sequence

import redis

import greenpool
from greenpool import pool as pool_module
from greenpool._server import RedisServer

from .scenarios import checkout_args

GUARD = "if _thread_ident() != self._thread:\n    self._adopt_thread()\n"


def unguarded_pool_class() -> type:
    """greenpool's pool with the thread checks cut out of its two hot methods."""
    namespace: Dict[str, Any] = dict(vars(pool_module))
    methods = {}
    for name in ("get_connection", "release"):
        source = textwrap.dedent(inspect.getsource(getattr(greenpool.BlockingConnectionPool, name)))
        guard = textwrap.indent(GUARD, "    ")
        if source.count(guard) != 1:
            raise SystemExit(f"guard_cost: the thread check in {name}() changed; update GUARD")
        body = source.replace(guard, "")
        exec(compile(body, f"<unguarded {name}>", "exec"), namespace)
        methods[name] = namespace[name]
    return type("UnguardedPool", (greenpool.BlockingConnectionPool,), methods)


def timed_loop(pool: Any, iterations: int) -> float:
    """Nanoseconds per pool.release(pool.get_connection())."""
    get, release, args = pool.get_connection, pool.release, checkout_args(pool)
    start = perf_counter()
    for _ in range(iterations):
        release(get(*args))
    return (perf_counter() - start) / iterations * 1e9


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--iterations", type=int, default=100_000, help="loop length for greenpool's pools")
    parser.add_argument("--url", help="a Redis URL (default: start a redis-server)")
    args = parser.parse_args(argv)
    server = None if args.url else RedisServer().start()
    url = args.url or server.url  # type: ignore[union-attr]
    try:
        classes = {
            "greenpool": greenpool.BlockingConnectionPool,
            "greenpool, no thread guard": unguarded_pool_class(),
            "redis.BlockingConnectionPool": redis.BlockingConnectionPool,
        }
        pools = {name: cls.from_url(url, max_connections=8) for name, cls in classes.items()}
        for pool in pools.values():
            pool.release(pool.get_connection(*checkout_args(pool)))  # warm: one idle connection
        results: Dict[str, List[float]] = {name: [] for name in pools}
        for _ in range(args.repeat):
            for name, pool in pools.items():
                n = args.iterations if name.startswith("greenpool") else max(args.iterations // 30, 100)
                results[name].append(min(timed_loop(pool, n) for _ in range(3)))
        reference = statistics.median(results["redis.BlockingConnectionPool"])
        print(f"checkout+release, one greenlet, warm pool; medians of {args.repeat} interleaved rounds (best of 3 each)")
        for name, values in results.items():
            median = statistics.median(values)
            print(f"  {name:30} {median:9,.0f} ns   {reference / median:6.1f}x redis.BlockingConnectionPool")
        for pool in pools.values():
            pool.disconnect()
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
