"""TCP keepalive options: built portably, applied as redis-py does, read back.

The sockets here are real loopback TCP connections to a listener made by the
test itself: no Redis server is needed. The tests pass with or without
gevent's monkey-patching, because they pick the plain and the gevent socket
classes explicitly.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Iterator
from typing import Any

import gevent.socket
import pytest
import redis
from gevent import monkey

from greenpool import keepalive
from greenpool.errors import ConfigError

# The stdlib class even when a conftest has monkey-patched socket.socket.
PlainSocket = monkey.get_original("socket", "socket")
SOCKET_CLASSES = [
    pytest.param(PlainSocket, id="plain"),
    pytest.param(gevent.socket.socket, id="gevent"),
]
LINUX = sys.platform.startswith("linux")
ALL = frozenset({"idle", "interval", "count", "user_timeout"})


@pytest.fixture
def listener() -> Iterator[tuple[str, int]]:
    """A loopback TCP listener; the kernel completes connects to it unaccepted."""
    server = PlainSocket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server.getsockname()
    finally:
        server.close()


@pytest.fixture
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which unsupported options were already logged."""
    monkeypatch.setattr(keepalive, "_reported", set())


def connect_like_redis(cls: Any, address: tuple[str, int], options: dict) -> Any:
    """Open a socket the way redis.connection.Connection._connect does."""
    sock = cls(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for constant, value in options.items():
        sock.setsockopt(socket.IPPROTO_TCP, constant, value)
    sock.settimeout(5)
    sock.connect(address)
    return sock


def expected(**values: Any) -> dict[str, Any]:
    """What read_options should report here, given the values that were set."""
    supported = keepalive.supported_options()
    names = {"idle": "keepalive_idle", "interval": "keepalive_interval",
             "count": "keepalive_count", "user_timeout": "tcp_user_timeout"}
    result: dict[str, Any] = {"socket_keepalive": True}
    for portable, key in names.items():
        result[key] = values[portable] if portable in supported else None
    return result


def test_linux_supports_every_option() -> None:
    """On Linux all four portable options map to a socket constant."""
    if not LINUX:
        pytest.skip("TCP_USER_TIMEOUT and friends are only all present on Linux")
    assert keepalive.supported_options() == ALL


@pytest.mark.parametrize("cls", SOCKET_CLASSES)
def test_options_read_back_from_live_socket(cls: Any, listener: Any) -> None:
    """Every option set through socket_options is what getsockopt reads back."""
    options = keepalive.socket_options(idle=7, interval=3, count=4, user_timeout=2.5)
    sock = connect_like_redis(cls, listener, options)
    try:
        got = keepalive.read_options(sock)
    finally:
        sock.close()
    assert got == expected(idle=7, interval=3, count=4, user_timeout=2.5)


@pytest.mark.parametrize("cls", SOCKET_CLASSES)
def test_fractions_round_up_on_live_socket(cls: Any, listener: Any) -> None:
    """Fractional seconds are rounded up before they reach the kernel."""
    options = keepalive.socket_options(
        idle=1.2, interval=0.3, count=2, user_timeout=0.0004
    )
    sock = connect_like_redis(cls, listener, options)
    try:
        got = keepalive.read_options(sock)
    finally:
        sock.close()
    assert got == expected(idle=2, interval=1, count=2, user_timeout=0.001)


def test_redis_py_connection_applies_the_options(listener: Any) -> None:
    """redis-py's own Connection._connect applies the mapping to its socket."""
    options = keepalive.socket_options(idle=11, interval=2, count=5, user_timeout=1.5)
    host, port = listener
    conn = redis.Connection(
        host=host, port=port, socket_keepalive=True,
        socket_keepalive_options=options, socket_connect_timeout=5,
    )
    sock = conn._connect()  # private, but it is exactly the code being mimicked
    try:
        got = keepalive.read_options(sock)
    finally:
        sock.close()
    assert got == expected(idle=11, interval=2, count=5, user_timeout=1.5)


@pytest.mark.parametrize("cls", SOCKET_CLASSES)
def test_keepalive_off_reads_false(cls: Any, listener: Any) -> None:
    """A socket without SO_KEEPALIVE reports socket_keepalive False."""
    sock = cls(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(listener)
        assert keepalive.read_options(sock)["socket_keepalive"] is False
    finally:
        sock.close()


def test_unix_socket_reports_none_for_tcp_options() -> None:
    """A socket that is not TCP reports None rather than raising."""
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("no Unix domain sockets on this platform")
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        got = keepalive.read_options(a)
    finally:
        a.close()
        b.close()
    assert got == {"socket_keepalive": False, "keepalive_idle": None,
                   "keepalive_interval": None, "keepalive_count": None,
                   "tcp_user_timeout": None}


def test_mapping_uses_platform_constants() -> None:
    """The mapping is keyed by this platform's socket constants."""
    if keepalive.supported_options() != ALL:
        pytest.skip("this platform lacks some options")
    assert keepalive.socket_options(idle=30, interval=5, count=3, user_timeout=10) == {
        socket.TCP_KEEPIDLE: 30, socket.TCP_KEEPINTVL: 5,
        socket.TCP_KEEPCNT: 3, socket.TCP_USER_TIMEOUT: 10_000,
    }


@pytest.mark.parametrize(
    ("seconds", "whole"),
    [(1, 1), (1.0, 1), (1.2, 2), (0.5, 1), (0.0001, 1), (29.999, 30), (0, 1)],
)
def test_seconds_round_up_to_at_least_one(seconds: float, whole: int) -> None:
    """Idle and interval round a fraction up, and never go below 1."""
    if "idle" not in keepalive.supported_options():
        pytest.skip("no idle option on this platform")
    (value,) = keepalive.socket_options(
        idle=seconds, interval=None, count=None, user_timeout=None
    ).values()
    assert value == whole


@pytest.mark.parametrize(
    ("seconds", "ms"),
    [(2.5, 2500), (0.3, 300), (1, 1000), (0.0004, 1), (0.0011, 2), (60.0, 60000)],
)
def test_user_timeout_in_whole_milliseconds(seconds: float, ms: int) -> None:
    """TCP_USER_TIMEOUT is given in seconds and set in integer milliseconds."""
    if "user_timeout" not in keepalive.supported_options():
        pytest.skip("TCP_USER_TIMEOUT is Linux only")
    options = keepalive.socket_options(
        idle=None, interval=None, count=None, user_timeout=seconds
    )
    assert options == {socket.TCP_USER_TIMEOUT: ms}
    assert type(options[socket.TCP_USER_TIMEOUT]) is int


def test_none_values_are_omitted() -> None:
    """None leaves an option out, so the OS default stays in force."""
    assert keepalive.socket_options(
        idle=None, interval=None, count=None, user_timeout=None
    ) == {}
    only_count = keepalive.socket_options(
        idle=None, interval=None, count=9, user_timeout=None
    )
    if "count" in keepalive.supported_options():
        assert only_count == {socket.TCP_KEEPCNT: 9}


def test_macos_idle_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TCP_KEEPIDLE, idle maps to macOS's TCP_KEEPALIVE."""
    monkeypatch.delattr(socket, "TCP_KEEPIDLE", raising=False)
    monkeypatch.setattr(socket, "TCP_KEEPALIVE", 0x10, raising=False)
    options = keepalive.socket_options(
        idle=30, interval=None, count=None, user_timeout=None
    )
    assert options == {0x10: 30}
    assert "idle" in keepalive.supported_options()


def test_keepidle_preferred_when_both_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where both constants exist, idle uses TCP_KEEPIDLE, the standard one."""
    monkeypatch.setattr(socket, "TCP_KEEPIDLE", 0x4, raising=False)
    monkeypatch.setattr(socket, "TCP_KEEPALIVE", 0x10, raising=False)
    options = keepalive.socket_options(
        idle=30, interval=None, count=None, user_timeout=None
    )
    assert options == {0x4: 30}


def test_unsupported_option_is_omitted_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_log: None
) -> None:
    """An option the platform lacks is left out and logged once at DEBUG."""
    monkeypatch.delattr(socket, "TCP_USER_TIMEOUT", raising=False)
    caplog.set_level(logging.DEBUG, logger="greenpool")
    for _ in range(3):
        options = keepalive.socket_options(
            idle=None, interval=None, count=None, user_timeout=5
        )
        assert options == {}
    assert "user_timeout" not in keepalive.supported_options()
    records = [r for r in caplog.records if "not supported" in r.getMessage()]
    assert len(records) == 1
    assert records[0].name == "greenpool"
    assert records[0].levelno == logging.DEBUG
    assert "'user_timeout'" in records[0].getMessage()


@pytest.mark.parametrize("bad", [True, float("nan"), float("inf"), -1, "30"])
def test_bad_values_are_refused(bad: Any) -> None:
    """A bool, NaN, infinity, negative or string never reaches setsockopt."""
    with pytest.raises(ConfigError, match=r"^keepalive_idle must be a finite number "
                       rf">= 0 \(got {bad!r}\)$"):
        keepalive.socket_options(idle=bad, interval=None, count=None, user_timeout=None)
