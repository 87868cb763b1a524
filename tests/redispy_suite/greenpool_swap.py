"""pytest plugin for redis-py's own test suite: gevent, then greenpool's pool.

Loaded by ``run.py`` with ``-p greenpool_swap`` (this directory on
``PYTHONPATH``), so it is imported before redis-py's ``conftest.py`` and test
modules. At import it monkey-patches gevent first, then rebinds redis-py's
pool names to :class:`greenpool.BlockingConnectionPool`, as chosen by
``REDISPY_SUITE_SWAP``:

- ``none``: nothing is swapped (the baseline);
- ``default``: ``redis.BlockingConnectionPool`` and the pool ``redis.Redis``
  builds itself (``Redis(host=...)``, ``Redis.from_url``);
- ``explicit``: also ``redis.ConnectionPool``, the name the tests and
  redis-py's ``conftest.py`` call (``redis.ConnectionPool(**url_options)``,
  ``from redis.connection import ConnectionPool``).

``REDISPY_SUITE_MONKEY=0`` skips ``patch_all()``. At the end of the session
the outcome counts, the failed test ids and the deselected counts per
category (``REDISPY_SUITE_CATEGORIES``: a JSON object of node id prefix to
category) are written as JSON to ``REDISPY_SUITE_RESULT``.
"""

from __future__ import annotations

import inspect
import json
import os
import types
from typing import Any, Dict, List

from gevent import monkey

if os.environ.get("REDISPY_SUITE_MONKEY", "1") != "0":
    monkey.patch_all()

import redis  # noqa: E402  (after patch_all, on purpose)
import redis.client  # noqa: E402
import redis.connection  # noqa: E402

import greenpool  # noqa: E402

MODE = os.environ.get("REDISPY_SUITE_SWAP", "none")
ORIGINAL = {
    "ConnectionPool": redis.connection.ConnectionPool,
    "BlockingConnectionPool": redis.connection.BlockingConnectionPool,
}

# Module attributes rebound per mode, as (module, attribute). In redis-py 4.6
# through 8.1, Redis.__init__ builds ``ConnectionPool(**kwargs)`` and
# Redis.from_url calls ``ConnectionPool.from_url`` through redis/client.py's
# module global, imported from redis.connection.
SWAPS = {
    "none": [],
    "default": [
        (redis, "BlockingConnectionPool"),
        (redis.connection, "BlockingConnectionPool"),
        (redis.client, "ConnectionPool"),
    ],
}
SWAPS["explicit"] = SWAPS["default"] + [
    (redis, "ConnectionPool"),
    (redis.connection, "ConnectionPool"),
]
if MODE not in SWAPS:
    raise SystemExit(f"REDISPY_SUITE_SWAP must be one of {sorted(SWAPS)} (got {MODE!r})")
for _module, _name in SWAPS[MODE]:
    setattr(_module, _name, greenpool.BlockingConnectionPool)


class _Unswapped(types.ModuleType):
    """``redis`` as greenpool must see it: redis-py's own pool classes."""

    def __getattr__(self, name: str) -> Any:
        return ORIGINAL[name] if name in ORIGINAL else getattr(redis, name)


def _probe() -> List[str]:
    """Build and close one pool; if greenpool itself cannot run with the
    names swapped, work around it (so the suite still says something) and
    return the problem, which run.py reports as a failure."""
    try:
        greenpool.BlockingConnectionPool().close()
        return []
    except RecursionError:
        # greenpool._redispy.init_base calls redis.ConnectionPool.__init__
        # looked up at call time, which is greenpool's own __init__ now.
        import greenpool._redispy as redispy_access

        redispy_access.redis = _Unswapped("redis")  # type: ignore[assignment]
        greenpool.BlockingConnectionPool().close()
        return [
            "greenpool: BlockingConnectionPool() recurses (RecursionError) once redis.ConnectionPool "
            "is greenpool's class: greenpool/_redispy.py init_base() looks redis.ConnectionPool up "
            "at call time; worked around here by showing it redis-py's class"
        ]


PROBLEMS = _probe()

_deselected: Dict[str, int] = {}


def _categories() -> Dict[str, str]:
    raw = os.environ.get("REDISPY_SUITE_CATEGORIES")
    return json.loads(raw) if raw else {}


def pytest_report_header(config: Any) -> List[str]:
    swapped = ", ".join(f"{m.__name__}.{n}" for m, n in SWAPS[MODE]) or "nothing"
    header = f"greenpool swap={MODE}: {swapped} -> greenpool.BlockingConnectionPool"
    return [header] + [f"PROBLEM {p}" for p in PROBLEMS]


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    """Deselect coroutine tests: they need pytest-asyncio, and greenpool
    serves redis-py's sync client only (counted as ``outside (async)``)."""
    keep, drop = [], []
    for item in items:
        function = getattr(item, "function", None)
        is_async = function is not None and inspect.iscoroutinefunction(inspect.unwrap(function))
        (drop if is_async else keep).append(item)
    if drop:
        _deselected["outside (async)"] = len(drop)
        items[:] = keep


def pytest_deselected(items: List[Any]) -> None:
    prefixes = sorted(_categories().items(), key=lambda kv: -len(kv[0]))
    for item in items:
        category = next((c for p, c in prefixes if item.nodeid.startswith(p)), "by -m or -k")
        _deselected[category] = _deselected.get(category, 0) + 1


def _crash(report: Any) -> str:
    """The one-line essence of a failure: the exception and its message."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1:]
    return f"{report.when}: " + " ".join(str(text).split())[:300]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    path = os.environ.get("REDISPY_SUITE_RESULT")
    if not path:
        return
    stats = terminalreporter.stats
    counts = {key: len(stats.get(key, [])) for key in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    # A test whose setup passed but teardown failed is both passed and error;
    # the ids say which.
    failed = {r.nodeid: _crash(r) for key in ("failed", "error") for r in stats.get(key, [])}
    with open(path, "w") as file:
        json.dump(
            {"counts": counts, "failed": failed, "deselected": _deselected, "problems": PROBLEMS}, file, indent=1
        )
