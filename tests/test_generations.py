"""Contract 15: a fork starts a new generation. Nothing of the parent's
generation (waiters, hand-offs, dials, sockets) can touch the child's
counters, connections or sockets, and the child has full capacity.

Each scenario forks a monkey-patched subprocess while the pool is busy in a
particular way, and both processes report what they saw.
"""

from __future__ import annotations

import json

import pytest

# Shared by the scenarios: run in both processes after the fork, report a line.
_REPORT = """
def report(**fields):
    fields["role"] = "child" if os.getpid() != PARENT else "parent"
    print(json.dumps(fields), flush=True)

def echo_check(conn, n=20):
    # Commands tagged with this process's pid: a reply meant for the other
    # process (a shared socket) shows up as a mismatch.
    tag = str(os.getpid())
    bad = 0
    for i in range(n):
        conn.send_command("ECHO", f"{tag}-{i}")
        if conn.read_response() != f"{tag}-{i}".encode():
            bad += 1
    return bad
"""


def _reports(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {line["role"]: line for line in lines}


WAITERS_AT_FORK = """
from gevent import monkey; monkey.patch_all()
import json, os, gevent, redis
from greenpool import BlockingConnectionPool, PoolTimeout
PARENT = os.getpid()
""" + _REPORT + """
pool = BlockingConnectionPool(max_connections=1, timeout=0.5, host="127.0.0.1", port=PORT)
held = pool.get_connection()
def waiter():
    try:
        conn = pool.get_connection()
    except PoolTimeout:
        return "timeout"
    pool.release(conn)
    return "served"
waiters = [gevent.spawn(waiter) for _ in range(3)]
gevent.sleep(0)  # all three are queued behind `held`
assert pool.stats().waiting == 3
pid = os.fork()
if pid == 0:
    # The copied waiters start again in the child, where the pool is empty.
    outcomes = [g.get(timeout=5) for g in waiters]
    stats = pool.stats()
    client = redis.Redis(connection_pool=pool)
    gevent.joinall([gevent.spawn(client.incr, "gen-n") for _ in range(20)], timeout=5)
    pool.check()
    stats2 = pool.stats()
    report(outcomes=outcomes, waiting=stats.waiting, timeouts=stats.timeouts,
           size=stats2.size, checkouts=stats2.checkouts, waiting_after=stats2.waiting)
    os._exit(0)
outcomes = [g.get(timeout=5) for g in waiters]
os.waitpid(pid, 0)
pool.release(held)
pool.check()
report(outcomes=outcomes, timeouts=pool.stats().timeouts)
"""


def test_waiters_copied_by_a_fork_never_skew_the_childs_counts(subprocess_python, redis_server):
    """Waiters queued at fork time start again in the child; its counts stay exact."""
    got = _reports(subprocess_python(WAITERS_AT_FORK.replace("PORT", str(redis_server.port))))
    child, parent = got["child"], got["parent"]
    # In the child the copied waiters found a fresh, empty pool at full capacity.
    assert child["outcomes"] == ["served"] * 3
    assert child["waiting"] == 0 and child["waiting_after"] == 0
    assert child["timeouts"] == 0  # the parent's timers count nothing here
    assert child["size"] == 1 and child["checkouts"] == 3 + 20
    # The parent's waiters time out behind `held`, as they would unforked.
    assert parent["outcomes"] == ["timeout"] * 3 and parent["timeouts"] == 3


HANDOFF_AT_FORK = """
from gevent import monkey; monkey.patch_all()
import json, os, gevent, redis
from greenpool import BlockingConnectionPool
PARENT = os.getpid()
""" + _REPORT + """
pool = BlockingConnectionPool(max_connections=1, timeout=5, host="127.0.0.1", port=PORT)
held = pool.get_connection()
def waiter():
    conn = pool.get_connection()
    try:
        return conn is held, echo_check(conn)
    finally:
        pool.release(conn)
w = gevent.spawn(waiter)
gevent.sleep(0)
pool.release(held)  # handed to the waiter, which has not run yet
pid = os.fork()      # no yield in between
got_parents, bad = w.get(timeout=10)
if pid == 0:
    pool.check()
    report(got_parents=got_parents, bad=bad, created=pool.stats().created)
    os._exit(0)
os.waitpid(pid, 0)
pool.check()
report(got_parents=got_parents, bad=bad)
"""


def test_a_hand_off_in_flight_at_fork_stays_in_the_parent(subprocess_python, redis_server):
    """Forked just after release() handed a connection over, the child's copy of
    the waiter gets a connection of its own; no reply crosses."""
    for _ in range(3):  # the scenario is deterministic; repeat to be sure
        got = _reports(subprocess_python(HANDOFF_AT_FORK.replace("PORT", str(redis_server.port))))
        assert got["parent"] == {"role": "parent", "got_parents": True, "bad": 0}
        assert got["child"]["got_parents"] is False and got["child"]["bad"] == 0
        assert got["child"]["created"] == 1


DIAL_AT_FORK = """
from gevent import monkey; monkey.patch_all()
import json, os, gevent, redis
from greenpool import BlockingConnectionPool
PARENT = os.getpid()
""" + _REPORT + """
# The proxy holds the handshake's first reply 0.5 s: the fork lands mid-dial.
pool = BlockingConnectionPool(max_connections=2, timeout=10, host="127.0.0.1", port=PORT,
                              client_name="mid-dial")
def caller():
    conn = pool.get_connection()
    try:
        return echo_check(conn)
    finally:
        pool.release(conn)
c = gevent.spawn(caller)
gevent.sleep(0.2)
assert pool.stats().dialling == 1
(record,) = pool._dialer._in_flight.values()
fd = record.conn._sock.fileno()  # mid-handshake: the socket is the connection's
pid = os.fork()
if pid == 0:
    # At once, before any greenlet runs: the dial's socket points at
    # /dev/null here, its connection waits to be closed, the record is gone.
    seen = (os.readlink("/proc/self/fd/%d" % fd), len(pool._orphans), len(pool._dialer._in_flight))
try:
    bad = c.get(timeout=10)
    error = None
except Exception as exc:
    bad, error = None, repr(exc)
if pid == 0:
    pool.check()
    report(bad=bad, error=error, size=pool.stats().size, seen=list(seen))
    os._exit(0)
os.waitpid(pid, 0)
pool.check()
report(bad=bad, error=error, dial_errors=pool.stats().dial_errors)
"""


@pytest.mark.slow
def test_a_dial_in_flight_at_fork_never_shares_its_socket(
    subprocess_python, redis_server, tcp_proxy
):
    """Forked mid-handshake, the child's copy of the dial never reads or writes
    the parent's socket: the parent's caller gets only its own replies."""
    tcp_proxy.first_reply_delay = 0.5
    for _ in range(3):
        got = _reports(subprocess_python(DIAL_AT_FORK.replace("PORT", str(tcp_proxy.port))))
        assert got["parent"] == {"role": "parent", "bad": 0, "error": None, "dial_errors": 0}
        assert got["child"]["bad"] == 0 and got["child"]["error"] is None
        assert got["child"]["size"] == 1
        assert got["child"]["seen"] == ["/dev/null", 1, 0]
