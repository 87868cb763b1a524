"""Contract 10 and contract 2 after a fork: the child never touches the
parent's sockets and never exceeds max_connections, even for a pool built
before monkey-patching (gunicorn --preload with gevent workers)."""

from __future__ import annotations

import json

PATCHED_FORK = """
from gevent import monkey; monkey.patch_all()
import json, os, gevent, redis
from greenpool import BlockingConnectionPool
pool = BlockingConnectionPool(max_connections=3, timeout=5, host="127.0.0.1", port={port},
                              client_name="parent")
client = redis.Redis(connection_pool=pool)
client.set("k", "parent")
parent_conns = list(pool._get_free_connections())
pid = os.fork()
if pid == 0:
    report = {{"inherited_idle": pool.stats().idle}}
    child = redis.Redis(connection_pool=pool)
    gevent.joinall([gevent.spawn(child.incr, "n") for _ in range(20)], timeout=10)
    report["size"] = pool.stats().size
    report["fresh"] = all(c not in parent_conns for c in pool._get_free_connections())
    print(json.dumps(report), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
# The parent's connection still works: the child neither used nor shut it down.
print(json.dumps({{"parent_get": client.get("k").decode(), "n": client.get("n").decode(),
                  "parent_conn_same": pool._get_free_connections() == parent_conns}}))
"""

PREPATCH_FORK = """
import json, os, redis
from greenpool import BlockingConnectionPool
# Built and used before gevent patches anything, as gunicorn --preload does.
pool = BlockingConnectionPool(max_connections=3, timeout=5, host="127.0.0.1", port={port},
                              client_name="preload")
redis.Redis(connection_pool=pool).set("pre", "1")
pid = os.fork()
if pid == 0:
    from gevent import monkey; monkey.patch_all()   # the gevent worker patches after fork
    import gevent
    peak = [0]
    client = redis.Redis(connection_pool=pool)
    probe = redis.Redis(host="127.0.0.1", port={port})
    def work():
        for _ in range(5):
            client.incr("n")
            peak[0] = max(peak[0], pool.stats().size)
            gevent.sleep(0.001)
    def server_side():
        seen = 0
        for _ in range(50):
            mine = [c for c in probe.client_list() if c.get("name") == "preload"]
            seen = max(seen, len(mine))
            gevent.sleep(0.002)
        return seen
    watcher = gevent.spawn(server_side)
    gevent.joinall([gevent.spawn(work) for _ in range(40)], timeout=10)
    print(json.dumps({{"peak": peak[0], "server_peak": watcher.get(timeout=10),
                      "n": int(client.get("n"))}}), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0, status
"""


def test_forked_child_builds_its_own_connections(subprocess_python, redis_server):
    """After fork the child dials afresh; the parent's sockets keep working."""
    result = subprocess_python(PATCHED_FORK.format(port=redis_server.port), timeout=60)
    assert result.returncode == 0, result.stderr
    child, parent = (json.loads(line) for line in result.stdout.splitlines())
    assert child["inherited_idle"] == 0 and child["fresh"] is True
    assert 1 <= child["size"] <= 3
    assert parent == {"parent_get": "parent", "n": "20", "parent_conn_same": True}


def test_pool_built_before_patching_stays_bounded_in_the_forked_child(subprocess_python, redis_server):
    """gunicorn --preload: pool built unpatched, child patches; never more than max_connections."""
    result = subprocess_python(PREPATCH_FORK.format(port=redis_server.port), timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["n"] == 200
    assert report["peak"] <= 3
    # The parent's preload connection stays open in the parent: at most 3 + 1.
    assert 1 <= report["server_peak"] <= 4


CHILD_HOUSEKEEPING = """
from gevent import monkey; monkey.patch_all()
import json, os, gevent, redis
from greenpool import BlockingConnectionPool
pool = BlockingConnectionPool(max_connections=2, timeout=5, host="127.0.0.1", port={port},
                              idle_timeout=0.2)
client = redis.Redis(connection_pool=pool)
held = pool.get_connection()
client.set("k", "1")
inherited = pool._get_free_connections()[0]
parent_greenlet = pool._maintenance.greenlet
pid = os.fork()
if pid == 0:
    pool.release(held)  # checked out before the fork, released in the child
    report = {{"prefork_release_closed": held._sock is None}}
    client.incr("n")
    report["new_maintenance"] = pool._maintenance.greenlet is not parent_greenlet
    gevent.sleep(0.6)
    report["reaped"] = pool.stats().idle == 0
    report["inherited_fd_closed"] = inherited._sock is None
    print(json.dumps(report), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
held.send_command("PING")  # the child closed only its copy of the fd
print(json.dumps({{"parent_ping": held.read_response().decode()}}))
pool.release(held)
"""


def test_child_runs_its_own_maintenance_and_closes_inherited_fds(subprocess_python, redis_server):
    """In the child: a new maintenance greenlet, inherited fds closed, pre-fork releases closed."""
    result = subprocess_python(CHILD_HOUSEKEEPING.format(port=redis_server.port))
    assert result.returncode == 0, result.stderr
    child, parent = (json.loads(line) for line in result.stdout.splitlines())
    assert child == {
        "prefork_release_closed": True,
        "new_maintenance": True,
        "reaped": True,
        "inherited_fd_closed": True,
    }
    assert parent == {"parent_ping": "PONG"}
