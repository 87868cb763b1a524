"""A paired before/after run of the hot path, for changes to the pool.

::

    git worktree add /tmp/before HEAD~1
    python -m benchmarks.paired --before /tmp/before --after . [--repeat 7]

Runs the same two measurements against two source trees of greenpool, in
fresh monkey-patched subprocesses, alternating before/after in every round
(so the machine's drift hits both alike), against one embedded
redis-server, and prints each round and the medians with their ratio:

- ``micro``: ns per uncontended ``get_connection()`` + ``release()`` of a
  warm connection (the code path DESIGN.md's "Cheap" line is about);
- ``contended``: GET operations per second from 100 greenlets sharing one
  ``redis.Redis`` on a pool of 8 connections;
- ``serial``: GET operations per second from one greenlet: every release
  leaves the connection idle while the hub runs (the idle watch's worst
  case: armed and stopped once per command).

The measurement code is inlined below, not imported from either tree, so
both are measured the same way whatever their benchmarks/ hold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

_CHILD = r"""
from gevent import monkey
monkey.patch_all()
import json, sys, time
import gevent, redis
import greenpool
url, n_micro, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pool = greenpool.BlockingConnectionPool.from_url(url, max_connections=8, timeout=5)
pool.release(pool.get_connection("GET"))
get, release = pool.get_connection, pool.release
for _ in range(1000):
    release(get("GET"))
start = time.perf_counter()
for _ in range(n_micro):
    release(get("GET"))
micro_ns = (time.perf_counter() - start) / n_micro * 1e9
client = redis.Redis(connection_pool=pool)
client.set("paired", "x")
ops = [0]
stop = time.perf_counter() + seconds
def user():
    while time.perf_counter() < stop:
        client.get("paired")
        ops[0] += 1
gevent.joinall([gevent.spawn(user) for _ in range(100)], timeout=seconds + 30)
contended = ops[0] / seconds
ops = [0]
stop = time.perf_counter() + seconds
gevent.spawn(user).join(timeout=seconds + 30)
print(json.dumps({"micro_ns": micro_ns, "contended_ops": contended, "serial_ops": ops[0] / seconds,
                  "version": greenpool.__file__}))
pool.close()
"""


def _measure(tree: str, url: str, n_micro: int, seconds: float) -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, url, str(n_micro), str(seconds)],
        env=env, capture_output=True, text=True, timeout=seconds + 120, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="source tree of the code before")
    parser.add_argument("--after", default=".", help="source tree of the code after")
    parser.add_argument("--repeat", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--micro", type=int, default=200_000, help="checkouts per micro run")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per contended run")
    args = parser.parse_args(argv)
    from greenpool._server import RedisServer

    results: Dict[str, Dict[str, List[float]]] = {
        side: {"micro_ns": [], "contended_ops": [], "serial_ops": []} for side in ("before", "after")
    }
    with RedisServer() as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        for round_ in range(args.repeat):
            # Alternate which side goes first, so neither always runs warm.
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
            line = []
            for side in order:
                tree = args.before if side == "before" else args.after
                got = _measure(tree, url, args.micro, args.seconds)
                for key in ("micro_ns", "contended_ops", "serial_ops"):
                    results[side][key].append(got[key])
                line.append(f"{side} {got['micro_ns']:.0f} ns, {got['contended_ops']:.0f} ops/s, "
                            f"serial {got['serial_ops']:.0f} ops/s")
            print(f"round {round_ + 1}: " + "; ".join(line), flush=True)
    med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in results.items()}
    print(
        f"medians of {args.repeat}: micro before {med['before']['micro_ns']:.0f} ns, "
        f"after {med['after']['micro_ns']:.0f} ns (after/before "
        f"{med['after']['micro_ns'] / med['before']['micro_ns']:.3f}); contended before "
        f"{med['before']['contended_ops']:.0f} ops/s, after {med['after']['contended_ops']:.0f} "
        f"ops/s (after/before {med['after']['contended_ops'] / med['before']['contended_ops']:.3f}); "
        f"serial before {med['before']['serial_ops']:.0f} ops/s, after {med['after']['serial_ops']:.0f} "
        f"ops/s (after/before {med['after']['serial_ops'] / med['before']['serial_ops']:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
