"""The real-server test rig: redis-server processes, a TCP proxy, hang guards.

Monkey-patching happens first, here, before anything imports redis, ssl or
greenpool: pytest itself imports ``socket``, ``threading`` and ``subprocess``
but not ``ssl`` (checked below), and patching modules that are already
imported is fine because gevent patches their attributes in place. A ``-p``
plugin would run even earlier but only works where the repo root is on
``sys.path`` (``python -m pytest``, not a bare ``pytest``), so it is not used.
"""

# The imports below must follow patch_all():
# ruff: noqa: E402
from __future__ import annotations

import sys

from gevent import monkey

# ssl imported before patching keeps unpatched references that break TLS in
# subtle ways, and gevent only warns about it: fail loudly instead.
if "ssl" in sys.modules and not monkey.is_module_patched("ssl"):
    raise RuntimeError(
        "ssl was imported before tests/conftest.py could monkey-patch it; "
        "a pytest plugin probably imports it: disable it with -p no:NAME"
    )
monkey.patch_all()

import contextlib
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Optional

import gevent
import pytest
import redis
from _tcp_proxy import TcpProxy

from greenpool import BlockingConnectionPool
from greenpool._server import ENV_VAR, RedisServer

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEST_TIMEOUT = 30.0


# -- every phase of every test runs under a gevent.Timeout ------------------


def _guarded(item: pytest.Item, phase: str) -> Generator[None, object, object]:
    """Fail *phase* of *item* if it is still running after its time limit.

    The exception is pytest's own "failed" outcome, a BaseException, so the
    test's ``except Exception`` cannot swallow it and its traceback shows
    where the test was blocked. Only a test that yields to the hub can be
    interrupted; ``faulthandler_timeout`` (in tox.ini) dumps the stacks of one
    that blocks the hub itself.
    """
    marker = item.get_closest_marker("timeout_seconds")
    seconds = float(marker.args[0]) if marker else DEFAULT_TEST_TIMEOUT
    failure = pytest.fail.Exception(
        f"{item.nodeid} ({phase}) still running after {seconds:g} s: it hangs "
        "(limit set by the gevent.Timeout guard in tests/conftest.py; "
        "raise it with @pytest.mark.timeout_seconds(N))"
    )
    with gevent.Timeout(seconds, failure):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded(item, "teardown"))


# -- isolation -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_greenpool_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's GREENPOOL_* settings out of the tests."""
    for name in list(os.environ):
        if name.startswith("GREENPOOL_") and name != ENV_VAR:
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _clean_shared_server(request: pytest.FixtureRequest) -> None:
    """Give each test using ``redis_server`` an empty server with no clients.

    Connections left by earlier tests (a pool not closed, a client not yet
    collected) are killed so that :func:`server_clients` counts only the
    current test's connections. Tests that need no server start none.
    """
    if "redis_server" not in request.fixturenames:
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    if not server.running:  # an earlier test killed the shared server by mistake
        server.restart()
    with _admin_client(server.url) as client:
        client.flushall()
        client.client_kill_filter(_type="normal", skipme=True)
        client.client_kill_filter(_type="pubsub", skipme=True)


@contextlib.contextmanager
def _admin_client(url: str) -> Iterator[redis.Redis]:
    """A one-connection client whose connection is closed on exit.

    redis-py 4.6's ``Redis.close()`` returns the connection to the pool
    without closing it, so the pool is disconnected explicitly: a lingering
    admin connection would be counted by the next :func:`server_clients`.
    """
    pool = redis.ConnectionPool.from_url(url)
    client = redis.Redis(connection_pool=pool, single_connection_client=True)
    try:
        yield client
    finally:
        client.close()
        pool.disconnect()


# -- servers -----------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server shared by the session, emptied before each test."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, free to kill, restart or break."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the shared server, database 0."""
    return redis_server.url


def count_server_clients(server: RedisServer | TcpProxy | str) -> int:
    """Return how many clients *server* has, not counting this query's own.

    Replication links and Sentinel's connections are not counted either.
    The server notices a client's close asynchronously, so poll when waiting
    for a count to go down.
    """
    url = server if isinstance(server, str) else server.url
    with _admin_client(url) as client:
        own_id = client.client_id()
        return sum(
            1
            for info in client.client_list()
            if int(info["id"]) != own_id
            and not set(info["flags"]) & {"M", "S"}
            and not info.get("name", "").startswith("sentinel-")
        )


@pytest.fixture
def server_clients() -> Callable[[RedisServer | TcpProxy | str], int]:
    """``server_clients(server)``: the number of clients connected to it."""
    return count_server_clients


# -- network faults ----------------------------------------------------------


@pytest.fixture
def tcp_proxy_factory() -> Iterator[Callable[[RedisServer], TcpProxy]]:
    """``tcp_proxy_factory(server)``: a new proxy to *server*, closed at teardown."""
    proxies: list[TcpProxy] = []

    def make(server: RedisServer) -> TcpProxy:
        proxy = TcpProxy((server.host, server.port))
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def tcp_proxy(
    redis_server: RedisServer, tcp_proxy_factory: Callable[[RedisServer], TcpProxy]
) -> TcpProxy:
    """A :class:`TcpProxy` in front of the shared server; connect to ``.url``."""
    return tcp_proxy_factory(redis_server)


# -- fresh interpreters ------------------------------------------------------


@pytest.fixture
def subprocess_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``subprocess_python(code, timeout=60)``: run *code* in a new interpreter.

    For scenarios this already-patched process cannot show (fork, patching
    late). The code is dedented; the repo is on ``PYTHONPATH``; output is
    captured as text and the exit status is not checked: assert on it.
    The test's own limit applies too: mark long runs with ``timeout_seconds``.
    """

    def run(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            path for path in (str(REPO_ROOT), env.get("PYTHONPATH")) if path
        )
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


# -- pools -------------------------------------------------------------------


@pytest.fixture
def make_pool(redis_server: RedisServer) -> Iterator[Callable[..., BlockingConnectionPool]]:
    """``make_pool(**kw)``: a greenpool pool on the shared server, closed at teardown."""
    pools: list[BlockingConnectionPool] = []

    def make(clock: Optional[Callable[[], float]] = None, **kwargs: Any) -> BlockingConnectionPool:
        # clock=: a pool reading that clock (the pool's clock is a class
        # attribute, substituted on a subclass).
        kwargs.setdefault("host", redis_server.host)
        kwargs.setdefault("port", redis_server.port)
        cls = BlockingConnectionPool
        if clock is not None:
            cls = type("FakeClockPool", (cls,), {"_clock": staticmethod(clock)})
        pool = cls(**kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
