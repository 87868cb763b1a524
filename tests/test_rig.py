"""The test rig itself: servers, the TCP proxy, the hang guard, subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import gevent
import pytest
import redis
from _tcp_proxy import TcpProxy
from gevent import monkey
from redis.backoff import NoBackoff
from redis.retry import Retry

from greenpool._server import RedisServer

TESTS = Path(__file__).resolve().parent


def client(url: str, **kwargs: object) -> redis.Redis:
    """A client that never retries, so each fault shows on the first call."""
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kwargs)


def test_process_is_monkey_patched() -> None:
    """conftest patched the test process, ssl included."""
    assert monkey.is_module_patched("socket")
    assert monkey.is_module_patched("ssl")


def test_shared_server_answers_ping(redis_server: RedisServer, redis_url: str) -> None:
    """The session server is up on loopback and redis_url points at it."""
    assert redis_server.running
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert client(redis_url).ping() is True


def test_kill_then_restart_on_same_port(fresh_redis_server: RedisServer) -> None:
    """kill() makes commands fail; restart() brings the server back on its port."""
    r = client(fresh_redis_server.url)
    r.set("k", "v")
    port = fresh_redis_server.port
    fresh_redis_server.kill()
    with pytest.raises(redis.ConnectionError):
        r.get("k")
    fresh_redis_server.restart()
    assert fresh_redis_server.port == port
    assert r.get("k") is None  # no persistence: a restart starts empty
    assert r.ping() is True


def test_server_clients_counts_connections(
    redis_server: RedisServer, server_clients: Callable[[RedisServer], int]
) -> None:
    """server_clients counts open connections, not its own, and sees closes."""
    assert server_clients(redis_server) == 0
    clients = [client(redis_server.url, single_connection_client=True) for _ in range(3)]
    for c in clients:
        c.ping()
    assert server_clients(redis_server) == 3
    for c in clients:
        c.close()
        c.connection_pool.disconnect()  # redis-py 4.6's close() keeps it open
    with gevent.Timeout(2):
        while server_clients(redis_server) != 0:
            gevent.sleep(0.01)


def test_blackhole_times_out_and_restore_lets_traffic_flow(tcp_proxy: TcpProxy) -> None:
    """A blackholed proxy makes reads time out; restore() makes them work again."""
    busy = client(tcp_proxy.url, socket_timeout=0.2)
    idle = client(tcp_proxy.url, single_connection_client=True)
    busy.set("k", "v")
    idle.ping()
    tcp_proxy.blackhole()
    with pytest.raises(redis.TimeoutError):
        busy.get("k")
    assert tcp_proxy.connections == 2  # nothing was closed, as with a dead LB
    tcp_proxy.restore()
    assert busy.get("k") == b"v"
    assert idle.ping() is True  # a connection idle meanwhile lost nothing


def test_drop_all_breaks_the_next_read(tcp_proxy: TcpProxy) -> None:
    """drop_all() closes proxied connections: the next read fails."""
    r = client(tcp_proxy.url, single_connection_client=True)
    assert r.ping() is True
    assert tcp_proxy.connections == 1
    tcp_proxy.drop_all()
    assert tcp_proxy.connections == 0
    with pytest.raises(redis.ConnectionError):
        r.ping()


def test_subprocess_python_runs_a_fresh_interpreter(
    subprocess_python: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """subprocess_python runs unpatched code that can import the repo."""
    result = subprocess_python(
        """
        from gevent import monkey
        import greenpool._server
        print("patched:", monkey.is_module_patched("socket"))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "patched: False\n"


def test_hang_guard_fails_a_hanging_test(tmp_path: Path) -> None:
    """A test that hangs fails after its timeout_seconds, with a clear message."""
    for name in ("conftest.py", "_tcp_proxy.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "pytest.ini").write_text(
        textwrap.dedent(
            """
            [pytest]
            addopts = --strict-markers -p no:cacheprovider
            filterwarnings = error
            markers = timeout_seconds(seconds): per-phase limit
            """
        )
    )
    (tmp_path / "test_hang.py").write_text(
        textwrap.dedent(
            """
            import gevent, pytest

            @pytest.mark.timeout_seconds(0.5)
            def test_hangs():
                try:
                    gevent.sleep(60)
                except Exception:
                    pass  # the guard's failure is not an Exception

            def test_after_the_hang():
                gevent.sleep(0)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "test_hang.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=25,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 passed" in result.stdout
    assert "test_hang.py::test_hangs (call) still running after 0.5 s" in result.stdout
