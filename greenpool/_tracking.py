"""Reply accounting: knowing, without touching the socket, whether a
connection still owes us replies.

redis-py's own pool guards each checkout with ``can_read()``, a socket poll
that costs a hub round trip under gevent, and that redis-py 8 skips entirely
when RESP3 client-side caching or maintenance notifications are on. A
connection released with an unread reply is then handed out again and stays
one reply behind for ever (``GET b`` returns the value of ``a``).

greenpool counts instead: every command written adds one owed reply, every
reply read removes one, and a disconnect forgives them all. A connection
released with a non-zero count is closed, never handed out. The count is
kept by a subclass of the user's connection class that the pool builds once
(:func:`tracked_class`), so the check on release is one attribute read.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Type

from gevent import getcurrent
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from ._dial import DialDeadline

__all__ = ["tracked_class", "ReplyTracking", "ReconnectTracking", "ReauthTracking"]


class _PackedCommands(List[Any]):
    """The output of ``pack_commands``, remembering how many commands it holds."""

    greenpool_replies = 0


class ReplyTracking:
    """Mixin for a redis-py connection class: counts replies still owed."""

    #: Replies the server owes for commands written on this socket. Only the
    #: greenlet holding the connection touches it, so it needs no lock.
    _greenpool_owed = 0

    #: The greenlet that last checked it out, wrote to or read from it: a
    #: connection lent whose user is dead was abandoned (released by no one).
    #: Reading and writing count, not only the checkout: a PubSub's worker
    #: greenlet reads a connection another greenlet took.
    _greenpool_user: Any = None

    def pack_commands(self, commands: Iterable[Any]) -> List[Any]:
        commands = list(commands)
        packed = _PackedCommands(super().pack_commands(commands))  # type: ignore[misc]
        packed.greenpool_replies = len(commands)
        return packed

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self._greenpool_user = getcurrent()
        super().send_packed_command(command, check_health)  # type: ignore[misc]
        # Counted only once every byte is written: a failed or interrupted
        # write makes redis-py disconnect, which already forgave the count.
        self._greenpool_owed += getattr(command, "greenpool_replies", 1)

    #: Set while the pool dials (see greenpool._dial.DialDeadline).
    _greenpool_deadline: Optional[float]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        self._greenpool_user = getcurrent()
        if self._greenpool_deadline is not None:
            self._greenpool_read_step()  # type: ignore[attr-defined]
        # Never below zero: a reply nobody counted (a PubSub or MONITOR
        # message, or a write that bypassed send_packed_command) owes
        # nothing, and must not cancel the count of a later command.
        try:
            response = super().read_response(*args, **kwargs)  # type: ignore[misc]
        except ResponseError:
            # An error reply is still a reply: it was read off the socket.
            if self._greenpool_owed > 0:
                self._greenpool_owed -= 1
            raise
        if self._greenpool_owed > 0:
            self._greenpool_owed -= 1
        return response

    #: Set when redis-py asks for a reconnect (see ReconnectTracking); read
    #: by release() on every connection, so defined here too.
    _greenpool_reconnect = False

    #: Set by every disconnect, so that release() learns a connection lost
    #: its socket from an attribute of greenpool's own. redis-py reconnects
    #: by several paths (``connect``, ``connect_check_health``), so the flag
    #: is not cleared on connect: release() then asks
    #: :func:`greenpool._redispy.sockets_of` and clears it (the rare path).
    _greenpool_broken = False

    #: The error of the last failed connect attempt: redis-py's connect
    #: retries call ``disconnect(error)`` after each. A dial cut short
    #: while redis-py backs off before the next attempt failed of this.
    _greenpool_failure: Any = None

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().disconnect(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._greenpool_owed = 0
            self._greenpool_broken = True
            if args and isinstance(args[0], (RedisConnectionError, OSError)):
                self._greenpool_failure = args[0]


class ReauthTracking:
    """Mixin for redis-py 5.1+ connections, which take a streaming credential
    provider's new token with ``set_re_auth_token()``.

    redis-py sends the AUTH from a listener its pools call on every release;
    greenpool's release makes no such call for a healthy connection. A new
    token sets ``_greenpool_broken`` instead, so release() takes its rare
    path, where :func:`greenpool._redispy.retire_reason` re-authenticates.
    """

    def set_re_auth_token(self, token: Any) -> None:
        super().set_re_auth_token(token)  # type: ignore[misc]
        self._greenpool_broken = True


class ReconnectTracking:
    """Mixin for redis-py 7+ connections, which have ``mark_for_reconnect()``.

    redis-py marks a connection for reconnection on maintenance notifications;
    the pool then closes it on release. Mirroring the mark in a plain
    attribute spares release() a ``should_reconnect()`` call.
    """

    _greenpool_reconnect = False

    def mark_for_reconnect(self) -> None:
        super().mark_for_reconnect()  # type: ignore[misc]
        self._greenpool_reconnect = True

    def reset_should_reconnect(self) -> None:
        super().reset_should_reconnect()  # type: ignore[misc]
        self._greenpool_reconnect = False


_CLASSES: Dict[type, type] = {}


def tracked_class(connection_class: Type[Any]) -> Type[Any]:
    """Return the reply-tracking subclass of *connection_class* (built once),
    whose dials are bounded by their deadline (:class:`greenpool._dial.DialDeadline`)."""
    if issubclass(connection_class, ReplyTracking):
        return connection_class
    try:
        return _CLASSES[connection_class]
    except KeyError:
        pass
    mixins: tuple = (ReplyTracking, DialDeadline)
    if hasattr(connection_class, "mark_for_reconnect"):
        mixins = (ReconnectTracking, *mixins)
    if hasattr(connection_class, "set_re_auth_token"):
        mixins = (ReauthTracking, *mixins)
    cls = type(
        connection_class.__name__,
        (*mixins, connection_class),
        {"__module__": connection_class.__module__, "__doc__": connection_class.__doc__},
    )
    _CLASSES[connection_class] = cls
    return cls

