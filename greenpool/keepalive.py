"""Portable TCP keepalive options, and reading them back from a live socket.

redis-py's ``Connection`` takes ``socket_keepalive=True`` and
``socket_keepalive_options={constant: int}`` and, on every (re)connect, calls
``sock.setsockopt(socket.IPPROTO_TCP, constant, value)`` for each entry.
:func:`socket_options` builds that mapping from portable names, so the same
configuration works on Linux, macOS and the BSDs; :func:`read_options` reads
the options back with ``getsockopt`` so a test (or an operator) can check what
the kernel actually holds.

An option that this platform does not offer (``TCP_USER_TIMEOUT`` outside
Linux, for instance) is left out of the mapping rather than failing every
connect. :func:`supported_options` tells which portable names this platform
supports, and the first time an unsupported option is requested it is logged
at DEBUG on the ``greenpool`` logger.
"""

from __future__ import annotations

import logging
import math
import socket
from typing import Any

from .errors import ConfigError

__all__ = ["socket_options", "supported_options", "read_options"]

logger = logging.getLogger("greenpool")

# Portable name -> candidate constant names, in order of preference. macOS has
# no TCP_KEEPIDLE; its TCP_KEEPALIVE means the same (idle seconds before the
# first probe). On Linux TCP_KEEPALIVE does not exist, so there is no clash.
_CONSTANTS: dict[str, tuple[str, ...]] = {
    "idle": ("TCP_KEEPIDLE", "TCP_KEEPALIVE"),
    "interval": ("TCP_KEEPINTVL",),
    "count": ("TCP_KEEPCNT",),
    "user_timeout": ("TCP_USER_TIMEOUT",),
}

# Names already reported as unsupported: one DEBUG line per process, not one
# per connection pool.
_reported: set[str] = set()


def _constant(portable: str) -> int | None:
    # Looked up on every call rather than at import, so tests can simulate
    # another platform by patching the socket module.
    for attr in _CONSTANTS[portable]:
        value = getattr(socket, attr, None)
        if value is not None:
            return int(value)
    return None


def supported_options() -> frozenset[str]:
    """Return the portable option names this platform can set.

    :returns: a subset of ``{"idle", "interval", "count", "user_timeout"}``.
    """
    return frozenset(name for name in _CONSTANTS if _constant(name) is not None)


def _whole(name: str, value: Any, scale: int) -> int:
    # Values normally arrive validated by greenpool.config; this guard keeps a
    # stray bool or NaN from reaching setsockopt as 1 or an OverflowError.
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0 (got {value!r})")
    # round() first so that 0.3 s is 300 ms, not ceil(300.00000000000006) = 301.
    return max(1, math.ceil(round(value * scale, 6)))


def socket_options(
    *,
    idle: float | None,
    interval: float | None,
    count: int | None,
    user_timeout: float | None,
) -> dict[int, int]:
    """Build redis-py's ``socket_keepalive_options`` mapping.

    :param idle: seconds of idleness before the first probe (``TCP_KEEPIDLE``,
        or ``TCP_KEEPALIVE`` on macOS).
    :param interval: seconds between probes (``TCP_KEEPINTVL``).
    :param count: unanswered probes before the connection is dropped
        (``TCP_KEEPCNT``).
    :param user_timeout: seconds that sent data may stay unacknowledged
        (``TCP_USER_TIMEOUT``, Linux only), set in integer milliseconds.
    :returns: ``{constant: value}`` for ``Connection(socket_keepalive_options=...)``.
        Seconds are rounded up to whole units, at least 1, because the kernel
        takes integers and rounding down could turn 0.5 into "off". ``None``
        leaves that option at the operating system's default. Options this
        platform lacks are omitted (see :func:`supported_options`).
    """
    requested = {
        # portable name: (value, the setting to name in errors, units per second)
        "idle": (idle, "keepalive_idle", 1),
        "interval": (interval, "keepalive_interval", 1),
        "count": (count, "keepalive_count", 1),
        "user_timeout": (user_timeout, "tcp_user_timeout", 1000),
    }
    options: dict[int, int] = {}
    for portable, (value, setting, scale) in requested.items():
        if value is None:
            continue
        whole = _whole(setting, value, scale)  # a bad value fails on every platform
        constant = _constant(portable)
        if constant is None:
            if portable not in _reported:
                _reported.add(portable)
                logger.debug(
                    "TCP keepalive option %r is not supported on this platform; "
                    "leaving it at the system default",
                    portable,
                )
            continue
        options[constant] = whole
    return options


def _tcp(sock: Any, portable: str) -> int | None:
    constant = _constant(portable)
    if constant is None:
        return None
    try:
        return int(sock.getsockopt(socket.IPPROTO_TCP, constant))
    except OSError:
        # Not a TCP socket (a Unix socket, say): there is nothing to report.
        return None


def read_options(sock: Any) -> dict[str, Any]:
    """Read the keepalive options back from a live socket with ``getsockopt``.

    Works on a plain :class:`socket.socket`, a gevent socket, or anything
    else with a ``getsockopt`` method.

    :returns: ``{"socket_keepalive": bool, "keepalive_idle": int | None,
        "keepalive_interval": int | None, "keepalive_count": int | None,
        "tcp_user_timeout": float | None}``, durations in seconds. ``None``
        means this platform (or this kind of socket) lacks the option;
        a ``tcp_user_timeout`` of ``0.0`` means the kernel default is in force.
    """
    keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    user_timeout_ms = _tcp(sock, "user_timeout")
    return {
        "socket_keepalive": bool(keepalive),
        "keepalive_idle": _tcp(sock, "idle"),
        "keepalive_interval": _tcp(sock, "interval"),
        "keepalive_count": _tcp(sock, "count"),
        "tcp_user_timeout": None if user_timeout_ms is None else user_timeout_ms / 1000,
    }
