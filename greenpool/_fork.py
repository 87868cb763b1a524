"""Fork safety: after ``os.fork()`` a child must not use, write to or shut
down its parent's sockets, and must not run its parent's greenlets' work.

Objects that hold such state register here; in the child, inside
``os.fork()`` itself and before any greenlet runs, each gets its
``_after_fork_in_child()`` called. That holds whether or not gevent has
patched the process yet (gunicorn ``--preload`` builds pools, forks, then
patches in the worker), and spares the hot path a ``getpid()`` call per
checkout. The callbacks must be pure bookkeeping: no I/O, no hub calls.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

__all__ = ["register"]

_REGISTERED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register(obj: Any) -> None:
    """Call ``obj._after_fork_in_child()`` in every child forked from now on."""
    _REGISTERED.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_REGISTERED):
        obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
