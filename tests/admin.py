"""Helpers for tests that run several servers: admin clients and polling."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Tuple

import gevent
import pytest
import redis

from greenpool._server import RedisServer

_ADMINS: Dict[Tuple[str, int], redis.Redis] = {}


def admin(server: RedisServer) -> redis.Redis:
    """A client for direct commands to *server*, closed by :func:`close_admin_clients`."""
    key = (server.host, server.port)
    if key not in _ADMINS:
        _ADMINS[key] = redis.Redis(host=server.host, port=server.port, decode_responses=True)
    return _ADMINS[key]


@pytest.fixture(scope="module", autouse=True)
def close_admin_clients() -> Iterator[None]:
    """Close the admin clients' connections when the module ends (left to the GC they would warn)."""
    yield
    for client in _ADMINS.values():
        client.connection_pool.disconnect()
    _ADMINS.clear()


def wait_until(predicate: Callable[[], Any], seconds: float, what: str) -> None:
    """Poll *predicate* every 20 ms; fail naming *what* after *seconds*."""
    with gevent.Timeout(seconds, AssertionError(f"timed out waiting for {what}")):
        while not predicate():
            gevent.sleep(0.02)
