"""Instructions per operation, before and after a change, counted by callgrind.

::

    git worktree add /tmp/before <commit>
    python -m benchmarks.instructions --before /tmp/before --after . [--ops 1000,3000]

Wall-clock benchmarks on a shared, 2-core machine swing by 2x; callgrind
counts the instructions the client process executes, the same whatever else
runs. Each workload runs twice per tree (``--ops`` sizes) under
``valgrind --tool=callgrind`` against one redis-server (not traced), and the
per-operation count is the difference divided by the difference in
operations, so start-up and import costs cancel out:

- ``micro``: ``get_connection()`` + ``release()`` of a warm connection, no I/O;
- ``serial``: ``GET`` from one greenlet in a loop;
- ``idling``: ``GET`` then ``gevent.idle()``: the connection rests across a
  pass of the hub's loop every time (the idle watch's worst case: armed and
  stopped per command).

Needs ``valgrind`` on PATH (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

_CHILD = r"""
from gevent import monkey
monkey.patch_all()
import sys, gevent, redis, greenpool
workload, n, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pool = greenpool.BlockingConnectionPool(host="127.0.0.1", port=port, max_connections=2)
client = redis.Redis(connection_pool=pool)
client.set("k", "v")
get, release = pool.get_connection, pool.release
if workload == "micro":
    for _ in range(n * 20):
        release(get())
elif workload == "serial":
    for _ in range(n):
        client.get("k")
else:
    for _ in range(n):
        client.get("k")
        gevent.idle()
pool.close()
"""

WORKLOADS = ("micro", "serial", "idling")


def _count(tree: str, workload: str, n: int, port: int) -> int:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, "-c", _CHILD, workload, str(n), str(port)],
            env=env, capture_output=True, text=True, timeout=1800,
        )
        match = re.search(r"Collected : (\d+)", result.stderr)
        if result.returncode != 0 or not match:
            raise RuntimeError(f"callgrind run failed: {result.stderr[-2000:]}")
        return int(match.group(1))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="source tree of the code before")
    parser.add_argument("--after", default=".", help="source tree of the code after")
    parser.add_argument("--ops", default="1000,3000", help="two operation counts (default 1000,3000)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args(argv)
    low, high = (int(x) for x in args.ops.split(","))
    from greenpool._server import RedisServer

    per_op: Dict[str, Dict[str, float]] = {}
    with RedisServer() as server:
        for workload in args.workloads.split(","):
            per_op[workload] = {}
            for side, tree in (("before", args.before), ("after", args.after)):
                counts = [_count(tree, workload, n, server.port) for n in (low, high)]
                ops = (high - low) * (20 if workload == "micro" else 1)
                per_op[workload][side] = (counts[1] - counts[0]) / ops
            b, a = per_op[workload]["before"], per_op[workload]["after"]
            print(f"{workload}: before {b:,.0f} instructions/op, after {a:,.0f} (after/before {a / b:.3f})",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
