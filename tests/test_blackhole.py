"""A network path that silently drops every packet, as a dead load balancer
or a NAT that forgot the flow does: TCP_USER_TIMEOUT bounds a command in
flight, TCP keepalive kills an idle connection, and the pool recovers when
the path is back.

A userspace proxy cannot fake this (its kernel still acknowledges the bytes),
so the scenario runs in a network namespace of its own, on that namespace's
loopback only: the server listens on 127.0.0.2 and an ``ip rule`` of type
``blackhole`` drops what is sent to it and what it sends. It needs root and iproute2, as the
CI machine has; elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timing, pytest.mark.timeout_seconds(90)]

SCENARIO = r"""
from gevent import monkey; monkey.patch_all()
import json, subprocess, time
import gevent, redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from greenpool import BlockingConnectionPool
from greenpool._server import RedisServer

def sh(command):
    subprocess.run(command, shell=True, check=True)

sh("ip link set lo up && ip addr add 127.0.0.2/8 dev lo")
# Move the local table's rule back so a blackhole rule can come before it.
sh("ip rule add pref 100 lookup local && ip rule del pref 0")
server = RedisServer(args=["--bind", "127.0.0.2"])
server.host = "127.0.0.2"
server.start()
report = {}

def pool(**kw):
    return BlockingConnectionPool(
        max_connections=2, timeout=5, host="127.0.0.2", port=server.port,
        socket_connect_timeout=1, retry=Retry(NoBackoff(), 0), **kw)

def blackhole(on):
    # Both directions: a path that answers keepalive probes is not dead.
    verb = "add" if on else "del"
    sh(f"ip rule {verb} pref 10 to 127.0.0.2 blackhole && ip rule {verb} pref 11 from 127.0.0.2 blackhole")

# 1. A command in flight: TCP_USER_TIMEOUT ends it.
p = pool(tcp_user_timeout=1.0)
r = redis.Redis(connection_pool=p)
r.set("k", "v")
blackhole(True)
start = time.monotonic()
try:
    r.get("k")
    report["in_flight"] = "no error"
except redis.RedisError as exc:
    report["in_flight"] = type(exc).__name__
report["in_flight_seconds"] = round(time.monotonic() - start, 2)
blackhole(False)
report["after_restore"] = r.get("k").decode()
report["in_flight_closed"] = p.stats().closed["broken"]
p.close()

# 2. An idle connection: keepalive (idle 1 s, 2 probes 1 s apart) kills it
#    during the outage, and the readiness check replaces it unseen.
for keepalive in (True, False):
    p = pool(socket_keepalive=keepalive, keepalive_idle=1, keepalive_interval=1,
             keepalive_count=2, validation_window=0)
    r = redis.Redis(connection_pool=p)
    r.set("k", "v")
    blackhole(True)
    gevent.sleep(4.5)
    blackhole(False)
    report["idle_keepalive_%s" % keepalive] = {
        "get": r.get("k").decode(),
        "dropped": p.stats().closed["failed_check"] + p.stats().closed["server_closed"]}
    p.close()
server.stop()
print(json.dumps(report))
"""


def test_blackholed_path_is_detected_by_user_timeout_and_keepalive(subprocess_python):
    """In flight: an error within ~tcp_user_timeout; idle: keepalive kills it, unseen by callers."""
    if os.geteuid() != 0 or not shutil.which("ip") or not sys.platform.startswith("linux"):
        pytest.skip("needs root and iproute2 on Linux to make a network namespace")
    namespace = f"greenpool-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        result = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", SCENARIO],
            capture_output=True,
            text=True,
            timeout=80,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["in_flight"] in ("TimeoutError", "ConnectionError"), report
    assert 0.8 <= report["in_flight_seconds"] < 5, report
    assert report["after_restore"] == "v" and report["in_flight_closed"] == 1
    # With keepalive the kernel gave up on the silent peer; the pool dropped
    # the connection (its idle watch fired, or the check at checkout) and
    # dialled afresh, and the caller saw no error.
    assert report["idle_keepalive_True"] == {"get": "v", "dropped": 1}
    # Without keepalive nothing noticed: the old connection simply resumed.
    assert report["idle_keepalive_False"] == {"get": "v", "dropped": 0}
