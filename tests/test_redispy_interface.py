"""What greenpool's pool takes from redis-py's: every method that the
installed redis-py's ``ConnectionPool`` (and its bases) defines is either
overridden by greenpool or reviewed in ``greenpool._redispy.INHERITED``.

CI runs this with the newest redis-py and with 4.6, tox with every major,
so a redis-py release that adds a pool method fails here until someone
decides whether greenpool must override it.
"""

from __future__ import annotations

import inspect

import pytest
import redis

from greenpool import BlockingConnectionPool, _redispy


def _redispy_methods() -> set:
    names = set()
    for cls in redis.ConnectionPool.__mro__:
        if cls is object or not cls.__module__.startswith("redis"):
            continue
        for name, value in vars(cls).items():
            if name in ("__init__", "__dict__", "__weakref__", "__module__", "__doc__",
                        "__abstractmethods__", "__slots__", "__annotations__"):
                continue
            if callable(value) or isinstance(value, (property, classmethod, staticmethod)):
                names.add(name)
    return names


def _greenpool_defines(name: str) -> bool:
    return any(
        name in vars(cls)
        for cls in BlockingConnectionPool.__mro__
        if cls.__module__.startswith("greenpool")
    )


def test_every_redispy_pool_method_is_overridden_or_reviewed():
    """No method of redis.ConnectionPool reaches greenpool's pool unreviewed."""
    unreviewed = sorted(
        name for name in _redispy_methods()
        if not _greenpool_defines(name) and name not in _redispy.INHERITED
    )
    assert unreviewed == [], (
        f"redis-py {redis.__version__} ConnectionPool methods neither overridden by "
        f"greenpool nor listed in greenpool._redispy.INHERITED: {unreviewed}"
    )


def test_the_reviewed_list_names_only_what_is_inherited():
    """An entry of INHERITED that greenpool overrides, or no supported redis-py
    version has, would be a stale review."""
    for name in _redispy.INHERITED:
        assert not _greenpool_defines(name) or name in ("__enter__", "__exit__"), name


def test_the_core_methods_redispy_calls_are_overridden():
    """Checkout, release, reset, disconnect, close and the maintenance
    notification hooks are greenpool's, whatever the redis-py version."""
    for name in ("get_connection", "release", "reset", "disconnect", "close",
                 "make_connection", "_checkpid", "owns_connection",
                 "_get_free_connections", "_get_in_use_connections"):
        assert _greenpool_defines(name), name
        assert inspect.getmodule(getattr(BlockingConnectionPool, name)).__name__.startswith(
            "greenpool")


def test_private_redispy_reads_live_in_one_module():
    """Only greenpool._redispy reads redis-py's _sock, _conn or .pid."""
    import pathlib
    import re

    package = pathlib.Path(_redispy.__file__).parent
    pattern = re.compile(r"\._sock\b|\._conn\b|[\w\)]\.pid\b|\"_conn\"")
    offenders = []
    for path in package.rglob("*.py"):
        if path.name in ("_redispy.py", "_server.py"):  # _server: a subprocess's .pid
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(package)}:{number}: {line.strip()}")
    assert offenders == []


def test_get_connection_count_counts_the_pools_idle_and_used_connections(make_pool):
    """redis-py 8's observability call (inherited, built on _get_free_connections
    and _get_in_use_connections) sees greenpool's connections, as README says."""
    pool = make_pool(max_connections=3, timeout=1)
    if not hasattr(pool, "get_connection_count"):
        pytest.skip("redis-py before 8 has no get_connection_count")
    held = [pool.get_connection() for _ in range(3)]
    pool.release(held.pop())
    (idle, _), (used, _) = pool.get_connection_count()
    assert (idle, used) == (1, 2)
    for conn in held:
        pool.release(conn)
