"""The settings table, and everything it drives.

One table, :data:`SETTINGS`, feeds keyword validation (:func:`validate`,
:func:`validate_all`), the strict parser for ``GREENPOOL_*`` variables and URL
query options (:func:`parse`, :func:`resolve`), the ``config`` command
(:func:`describe`) and the README (:func:`readme_table`), so they cannot drift.
Precedence: explicit argument > URL query option > environment > default.

``keepalive_ping_interval`` has no relation to ``idle_timeout``: keepalive
pings do not count as use and do not reset a connection's idle clock, so they
never keep a connection past ``idle_timeout``; they keep ``min_idle`` ones alive.
"""

from __future__ import annotations

import datetime
import difflib
import inspect
import math
import numbers
import os
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import unquote_plus

import redis
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url

from . import keepalive
from .errors import ConfigError

__all__ = [
    "Setting", "SETTINGS", "SETTINGS_BY_NAME", "TOPOLOGY_SETTINGS", "Resolved",
    "validate", "validate_all", "parse", "parse_addresses", "resolve", "describe",
    "readme_table", "connection_kwargs", "redact", "split", "Split", "DEFAULT",
    "check_connection_class", "connection_parameters",
]

Kind = Literal["int", "duration", "bool", "str", "url", "addresses", "role"]
Source = Literal["argument", "url", "environment", "default"]


@dataclass(frozen=True)
class Setting:
    """One setting: keyword, variable, kind, default, bounds and meaning."""

    name: str  #: the keyword argument
    env: str  #: the environment variable without its prefix
    kind: Kind
    default: Any
    description: str  #: one sentence, for the README and the ``config`` command
    allow_none: bool = False
    minimum: float | None = None
    exclusive_minimum: bool = False  #: ``> minimum`` rather than ``>= minimum``

    @property
    def bound(self) -> str:
        """The lower bound as text, such as ``">= 1"``, or ``""``."""
        if self.minimum is None:
            return ""
        return f"{'>' if self.exclusive_minimum else '>='} {_number(self.minimum)}"

    def expected(self, *, env: bool = False) -> str:
        """Describe the accepted values, as error messages and the CLI say it.

        :param env: describe the text form (``none``, ``30s``) used in the
            environment and URLs, rather than the Python one.
        """
        text = {
            "int": f"an integer {self.bound}",
            "duration": f"a {'duration' if env else 'number of seconds'} {self.bound}",
            "bool": _BOOL_WORDS if env else "True or False",
            "str": "a non-empty string",
            "url": "a Redis URL (redis://, rediss:// or unix://)",
            "addresses": _ADDRESSES_FORM,
            "role": "master or replica",
        }[self.kind].strip()
        if self.allow_none:
            text += " or none" if env else " or None"
        return text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _s(name: str, kind: Kind, default: Any, text: str, **bounds: Any) -> Setting:
    # Every variable is its keyword in capitals: one rule, nothing to look up.
    return Setting(name, name.upper(), kind, default, text, **bounds)


_NONE = {"allow_none": True}
_GE0, _GE1 = {"minimum": 0}, {"minimum": 1}
_GT0 = {"minimum": 0, "exclusive_minimum": True}

SETTINGS: tuple[Setting, ...] = (
    _s("url", "url", None, "The Redis URL (redis://, rediss:// or unix://); "
       "REDIS_URL is read when GREENPOOL_URL is unset.", **_NONE),
    _s("max_connections", "int", 50, "The most connections that exist at once: "
       "idle, in use and being dialled.", **_GE1),
    _s("timeout", "duration", 20.0, "How long a caller waits for a connection; "
       "none waits forever and 0 never waits.", **_GE0, **_NONE),
    _s("max_waiters", "int", None, "How many callers may wait for a busy connection "
       "(more get TooManyWaiters; callers the pool can open a connection for never "
       "count); none means no limit.", **_GE0, **_NONE),
    _s("name", "str", None, "The pool's name in logs, errors and repr.", **_NONE),
    _s("idle_timeout", "duration", 300.0, "Idle connections beyond min_idle are "
       "closed after this long; none keeps them.", **_GT0, **_NONE),
    _s("min_idle", "int", 0, "How many connections are kept open and ready.", **_GE0),
    _s("max_lifetime", "duration", 3600.0, "Connections are replaced after this "
       "long (less up to 10% jitter), never while in use; none keeps them.",
       **_GT0, **_NONE),
    _s("validation_window", "duration", 0.5, "A connection idle for less than this "
       "is handed out unchecked; an older one gets a non-blocking readiness "
       "check.", **_GE0),
    _s("health_check_interval", "duration", 0.0, "redis-py's own PING-before-use "
       "interval, passed to each connection; 0 turns it off.", **_GE0),
    _s("socket_keepalive", "bool", True, "Turn TCP keepalive on for every "
       "connection."),
    _s("keepalive_idle", "duration", 30.0, "Idle time before the first TCP "
       "keepalive probe (TCP_KEEPIDLE, or TCP_KEEPALIVE on macOS); none keeps the "
       "OS default.", **_GE1, **_NONE),
    _s("keepalive_interval", "duration", 5.0, "Time between TCP keepalive probes "
       "(TCP_KEEPINTVL); none keeps the OS default.", **_GE1, **_NONE),
    _s("keepalive_count", "int", 3, "Unanswered TCP keepalive probes before the "
       "connection is dropped (TCP_KEEPCNT); none keeps the OS default.",
       **_GE1, **_NONE),
    _s("tcp_user_timeout", "duration", None, "Linux only: how long sent data may "
       "stay unacknowledged before the connection is dropped (TCP_USER_TIMEOUT); "
       "needs socket_keepalive.", **_GT0, **_NONE),
    _s("keepalive_ping_interval", "duration", None, "PING idle connections this "
       "often so NAT and load balancers keep them; pings do not reset the idle "
       "clock.", **_GT0, **_NONE),
    _s("leak_detection_threshold", "duration", None, "A connection held longer "
       "than this is reported once, with the stack that checked it out.",
       **_GT0, **_NONE),
    _s("socket_timeout", "duration", None, "redis-py's timeout for each socket "
       "read and write (none waits forever); not set, the connection class's "
       "own default applies: 5 s in redis-py 8, none before.", **_GT0, **_NONE),
    _s("socket_connect_timeout", "duration", 10.0, "How long opening a connection "
       "may take: TCP connect, TLS and Redis handshakes, retries included; none waits forever.", **_GT0, **_NONE),
    _s("client_name", "str", None, "The name each connection gives itself with "
       "CLIENT SETNAME.", **_NONE),
)

SETTINGS_BY_NAME: Mapping[str, Setting] = types.MappingProxyType(
    {s.name: s for s in SETTINGS}
)

#: Where the servers are, for :mod:`greenpool.sentinel` and
#: :mod:`greenpool.cluster`. No pool takes these; the same rules read them
#: from the environment and the README's table lists them with the rest.
TOPOLOGY_SETTINGS: tuple[Setting, ...] = (
    _s("sentinels", "addresses", None, "Sentinel only: the sentinels to ask for the "
       "master, as host:port pairs separated by commas."),
    _s("sentinel_service", "str", None, "Sentinel only: the service name the "
       "sentinels monitor (sentinel monitor <name> ...)."),
    _s("sentinel_role", "role", "master", "Sentinel only: master for a read-write "
       "client of the master, replica for a read-only client rotating over the "
       "replicas."),
    _s("cluster_nodes", "addresses", None, "Cluster only: startup nodes as host:port "
       "pairs separated by commas; GREENPOOL_URL may name one instead."),
)

# Settings that redis-py's connection takes as they are.
_FOR_REDIS = ("health_check_interval", "socket_timeout", "socket_connect_timeout",
              "client_name")
# Variables under the prefix that are not pool settings: greenpool._server
# reads GREENPOOL_REDIS_SERVER to find the redis-server binary for the tests.
_NOT_SETTINGS = ("REDIS_SERVER",)
_BOOL_WORDS = "a boolean: 1, true, yes, on, 0, false, no or off"
_DURATION_FORM = "a duration such as 30, 30s or 500ms"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
# No sign, exponent, nan or inf: what an operator means to write, nothing more.
_INT_RE = re.compile(r"[0-9]+")
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)?", re.I)
_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
_URL_SCHEMES = ("redis://", "rediss://", "unix://")
_ADDRESS_RE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:,\[\]]+)):(?P<port>[0-9]+)")
_ADDRESSES_FORM = "a comma-separated list of host:port such as 127.0.0.1:26379,127.0.0.1:26380"
_INVALID = object()
# A password= query option, or key=value pair, whatever precedes it.
_PASSWORD_OPTION = re.compile(r"((?:^|[?&;\s])password=)[^&#\s]*", re.I)


def redact(value: Any) -> Any:
    """*value* with any password in it masked as ``***``; other values unchanged.

    The one place greenpool hides secrets: a URL's password (``redis://user:pw@h``)
    and ``password=`` query options, in every error, log line, repr and
    ``config`` output. Text without ``://`` or ``password=`` is returned as is.
    """
    if not isinstance(value, str):
        return value
    text = value
    scheme, sep, rest = text.partition("://")
    if sep:
        end = len(rest)
        for mark in "/?#":
            found = rest.find(mark)
            if found != -1:
                end = min(end, found)
        authority = rest[:end]
        if "@" in authority:
            userinfo, _, hostport = authority.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            authority = f"{user}{':***' if colon else ''}@{hostport}"
        text = f"{scheme}://{authority}{rest[end:]}"
    return _PASSWORD_OPTION.sub(r"\1***", text)


def _fail(where: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"{where} must be {expected} (got {redact(got)!r})")


def _setting(setting: Setting | str) -> Setting:
    if isinstance(setting, Setting):
        return setting
    for known in SETTINGS + TOPOLOGY_SETTINGS:
        if known.name == setting:
            return known
    raise ConfigError(f"unknown setting {setting!r}")


def parse_addresses(text: str, *, where: str, form: str = _ADDRESSES_FORM) -> list[tuple[str, int]]:
    """Parse ``host:port,host:port`` (IPv6 as ``[::1]:26379``), strictly.

    Blanks around items are ignored; an empty list, an empty item, a missing
    or out-of-range port is an error.

    :param where: the variable or parameter to name in errors.
    :raises ConfigError: e.g. ``GREENPOOL_SENTINELS must be a comma-separated
        list of host:port such as ... (got '127.0.0.1')``.
    """
    addresses = []
    for item in text.split(","):
        match = _ADDRESS_RE.fullmatch(item.strip())
        port = int(match.group("port")) if match else 0
        if not match or not 0 < port < 65536:
            raise ConfigError(f"{where} must be {form} (got {text!r})")
        addresses.append((match.group("v6") or match.group("host"), port))
    return addresses


def _from_python(kind: Kind, value: Any) -> Any:
    if isinstance(value, bool):
        # bool is an int subclass: True would otherwise mean max_connections=1.
        return value if kind == "bool" else _INVALID
    if isinstance(value, datetime.timedelta):
        return value.total_seconds() if kind == "duration" else _INVALID
    if kind == "int" and isinstance(value, numbers.Integral):
        return int(value)
    if kind in ("int", "duration") and isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:
            return _INVALID
        if not math.isfinite(number):
            return _INVALID
        if kind == "duration":
            return number
        # An integral float (2.0) is taken as 2; 2.5 connections is a mistake.
        return int(number) if number.is_integer() else _INVALID
    text = value if isinstance(value, str) and value.strip() else ""
    if kind == "str" and text or kind == "url" and text.startswith(_URL_SCHEMES):
        return value
    return _INVALID


def _in_bounds(setting: Setting, value: Any) -> bool:
    low, strict = setting.minimum, setting.exclusive_minimum
    return low is None or value > low or (value == low and not strict)


def validate(name: str, value: Any, *, where: str | None = None) -> Any:
    """Validate and normalise one keyword value given in Python.

    Durations become ``float`` (a :class:`~datetime.timedelta` is accepted),
    integers ``int`` (``2.0`` is taken as ``2``). Refused: bools where a number
    is meant, strings for numbers, NaN, infinities, values below the bound.

    :param where: what to call the value in the error, if not ``name``.
    :raises ConfigError: e.g. ``max_connections must be an integer >= 1 (got 0)``.
    """
    setting = _setting(name)
    if value is None and setting.allow_none:
        return None
    normalised = _INVALID if value is None else _from_python(setting.kind, value)
    if normalised is _INVALID or not _in_bounds(setting, normalised):
        raise _fail(where or setting.name, setting.expected(), value)
    return normalised


def _check_relations(options: Mapping[str, Any]) -> None:
    def get(name: str) -> Any:
        return options.get(name, SETTINGS_BY_NAME[name].default)

    if get("min_idle") > get("max_connections"):
        raise ConfigError(
            "min_idle must be <= max_connections (got min_idle="
            f"{get('min_idle')}, max_connections={get('max_connections')})"
        )
    # TCP_USER_TIMEOUT rides in redis-py's socket_keepalive_options, which
    # redis-py applies only when socket_keepalive is on.
    if get("tcp_user_timeout") is not None and not get("socket_keepalive"):
        raise ConfigError(
            "tcp_user_timeout requires socket_keepalive=True, as it is applied "
            "with redis-py's keepalive options (got tcp_user_timeout="
            f"{get('tcp_user_timeout')}, socket_keepalive=False)"
        )


def validate_all(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate every known key of ``options``, then the relations between them.

    Missing settings count as their defaults in the relations. Unknown keys
    are returned unchanged: they are redis-py connection keyword arguments.

    :returns: a new dict with the same keys, known values normalised.
    :raises ConfigError: for the first bad value or relation.
    """
    result = {k: validate(k, v) if k in SETTINGS_BY_NAME else v
              for k, v in options.items()}
    _check_relations(result)
    return result


def _from_text(setting: Setting, text: str, where: str, shown: str) -> Any:
    # text is stripped; errors show what the user wrote (shown).
    if setting.kind == "int":
        if not _INT_RE.fullmatch(text):
            raise _fail(where, setting.expected(env=True), shown)
        return int(text)
    if setting.kind == "duration":
        match = _DURATION_RE.fullmatch(text)
        seconds = math.nan
        if match:
            unit = _UNITS[(match.group(2) or "s").lower()]
            seconds = float(Decimal(match.group(1)) * unit)
        if not math.isfinite(seconds):  # also catches 400 digits overflowing
            raise _fail(where, _DURATION_FORM, shown)
        return seconds
    if setting.kind == "bool":
        if text.lower() not in _TRUE | _FALSE:
            raise _fail(where, _BOOL_WORDS, shown)
        return text.lower() in _TRUE
    if setting.kind == "addresses":
        return parse_addresses(text, where=where)
    if setting.kind == "role":
        if text.lower() not in ("master", "replica"):
            raise _fail(where, setting.expected(env=True), shown)
        return text.lower()
    value = _from_python(setting.kind, text)
    if value is _INVALID:
        raise _fail(where, setting.expected(env=True), shown)
    return value


def parse(setting: Setting | str, text: str, *, where: str) -> Any:
    """Parse the text of an environment variable or URL query option, strictly.

    Integers are digits only; durations a number with an optional unit ``ms``,
    ``s``, ``m`` or ``h`` (``30``, ``1.5s``, ``500ms``, ``2m``); booleans
    ``1/true/yes/on`` or ``0/false/no/off``; ``none`` is None where allowed.
    Case is ignored, surrounding blanks stripped; an empty value is an error.

    :param where: the variable or option to name in errors.
    :raises ConfigError: e.g. ``GREENPOOL_IDLE_TIMEOUT must be a duration such
        as 30, 30s or 500ms (got '5 minutes')``.
    """
    setting = _setting(setting)
    stripped = text.strip()
    if setting.allow_none and stripped.lower() == "none":
        return None
    value = _from_text(setting, stripped, where, text)
    if not _in_bounds(setting, value):
        raise _fail(where, setting.expected(env=True), text)
    return value


@dataclass(frozen=True)
class Resolved:
    """What :func:`resolve` found: effective values and where each came from."""

    #: read-only: every setting's value, plus any non-setting keyword passed in
    #: ``overrides``, ready for ``**options``
    options: Mapping[str, Any]
    #: read-only: name -> ``"argument"``, ``"url"``, ``"environment"``, ``"default"``
    sources: Mapping[str, Source]
    #: the effective URL without greenpool's own query options, or None
    url: str | None

    def __repr__(self) -> str:
        given = {k: v for k, v in self.sources.items() if v != "default"}
        return f"Resolved(url={redact(self.url)!r}, sources={given!r})"


def _check_variables(environ: Mapping[str, str], prefix: str, known: set[str]) -> None:
    unknown = sorted(k for k in environ if k.startswith(prefix) and k not in known)
    # Compare what follows the prefix: the shared prefix alone would make
    # every name look close to every other.
    tails = {name[len(prefix):]: name for name in known if name.startswith(prefix)}
    items = []
    for variable in unknown:
        close = difflib.get_close_matches(variable[len(prefix):], sorted(tails), n=1)
        items.append(f"{variable} (did you mean {tails[close[0]]}?)" if close
                     else variable)
    if items:
        plural = "s" if len(items) > 1 else ""
        raise ConfigError(f"unknown environment variable{plural} {', '.join(items)}")


def _split_query(url: str) -> tuple[str, dict[str, Any]]:
    # Take the settings out of the query and leave the rest, byte for byte,
    # to redis-py's parse_url. Settings redis-py's parse_url types itself
    # (max_connections, socket_timeout ...) keep redis-py's meaning exactly:
    # its parser reads them, blank values are ignored, the first of several
    # wins. greenpool's own settings are parsed strictly: a blank, repeated
    # or malformed value is an error. String surgery, because urlunsplit()
    # turns unix:///path into unix:/path.
    rest, hash_mark, fragment = url.partition("#")
    base, _, query = rest.partition("?")
    ours: dict[str, Any] = {}
    kept, typed = [], []
    for piece in query.split("&") if query else ():
        key, _, value = piece.partition("=")
        key = unquote_plus(key)
        if key not in SETTINGS_BY_NAME or key == "url":
            kept.append(piece)
        elif key in URL_QUERY_ARGUMENT_PARSERS:
            typed.append(piece)
        elif key in ours:
            raise ConfigError(f"URL query option {key} is given more than once")
        else:
            ours[key] = parse(key, unquote_plus(value), where=f"URL query option {key}")
    if typed:
        for key, value in parse_url("redis://?" + "&".join(typed)).items():
            ours[key] = validate(key, value, where=f"URL query option {key}")
    return base + "?" * bool(kept) + "&".join(kept) + hash_mark + fragment, ours


def resolve(
    environ: Mapping[str, str] | None = None,
    *,
    prefix: str = "GREENPOOL_",
    url: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    ignore: Iterable[str] = (),
    read_url: bool = True,
) -> Resolved:
    """Find every setting's value: argument > URL query > environment > default.

    :param environ: the environment to read, ``os.environ`` by default.
    :param prefix: the variables' prefix; must not be empty.
    :param url: the Redis URL given explicitly; it wins over ``overrides["url"]``,
        which wins over ``GREENPOOL_URL``, then ``REDIS_URL``.
    :param overrides: keyword arguments given explicitly; a key present counts
        as given even when its value is None. Non-setting keys pass through.
    :param ignore: full variable names under ``prefix`` that belong to something
        else (test tooling, say) and are not reported as unknown.
    :param read_url: read ``GREENPOOL_URL`` and ``REDIS_URL``; pools built in
        code pass False: only :func:`greenpool.from_env` takes its server
        from the environment.
    :raises ConfigError: for a bad value or relation, or a variable under
        ``prefix`` that is no setting (naming the closest one).
    """
    if not prefix:
        raise ValueError("prefix must not be empty")
    environ = os.environ if environ is None else environ
    known = {prefix + name for name in (*(s.env for s in SETTINGS + TOPOLOGY_SETTINGS), *_NOT_SETTINGS)}
    _check_variables(environ, prefix, known | set(ignore))
    explicit = dict(overrides or {}, **({} if url is None else {"url": url}))

    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    sources: dict[str, Source] = dict.fromkeys(values, "default")
    for setting in SETTINGS:
        variable = prefix + setting.env
        if setting.name == "url" and not read_url:
            continue
        if setting.name == "url" and variable not in environ:
            variable = "REDIS_URL"
        if variable in environ:
            values[setting.name] = parse(setting, environ[variable], where=variable)
            sources[setting.name] = "environment"

    if "url" in explicit:
        values["url"], sources["url"] = validate("url", explicit["url"]), "argument"
    if values["url"] is not None:
        values["url"], query = _split_query(values["url"])
        for name, value in query.items():
            values[name], sources[name] = value, "url"
    for name, value in explicit.items():
        if name != "url":
            is_setting = name in SETTINGS_BY_NAME
            values[name] = validate(name, value) if is_setting else value
            sources[name] = "argument"

    _check_relations(values)
    return Resolved(types.MappingProxyType(values),
                    types.MappingProxyType(sources), values["url"])


def connection_kwargs(
    options: Mapping[str, Any], connection_class: type
) -> dict[str, Any]:
    """Return the redis-py connection keyword arguments that settings drive.

    TCP keepalive goes to :class:`redis.Connection` and its subclasses (TLS
    included) as ``socket_keepalive`` and ``socket_keepalive_options``, built by
    :func:`greenpool.keepalive.socket_options`, so greenpool's defaults apply
    on every redis-py version; Unix socket connections take no such argument.

    :param options: validated settings, as :func:`resolve` returns them.
    """
    kwargs = {name: options[name] for name in _FOR_REDIS}
    if issubclass(connection_class, redis.Connection):
        enabled = options["socket_keepalive"]
        kwargs["socket_keepalive"] = enabled
        # Always pass a mapping, even {}: left out, redis-py 8 substitutes its
        # own 30/5/3 for the options set to None (the OS default) here.
        kwargs["socket_keepalive_options"] = keepalive.socket_options(
            idle=options["keepalive_idle"],
            interval=options["keepalive_interval"],
            count=options["keepalive_count"],
            user_timeout=options["tcp_user_timeout"],
        ) if enabled else {}
    return kwargs


class _Default:
    """The default of a pool constructor's setting parameters (see :data:`DEFAULT`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFAULT"

    def __reduce__(self) -> str:
        return "DEFAULT"


#: "Not given": the setting's ``GREENPOOL_*`` variable applies, else its
#: default from :data:`SETTINGS`. (None cannot mean that: ``timeout=None``
#: waits for ever.)
DEFAULT: Any = _Default()

# redis-py's pools take these beside the connection's options; greenpool's
# hands them to redis-py's ConnectionPool.__init__ (client-side cache,
# maintenance notifications), which consumes them.
_POOL_KEYWORDS = frozenset(
    name
    for init in (redis.ConnectionPool.__init__,)
    for name in inspect.signature(init).parameters
    if name not in ("self", "connection_class", "max_connections", "connection_kwargs")
) | ({"cache", "cache_config"} if "cache_config" in inspect.signature(redis.Redis.__init__).parameters else set())
_NOT_SUPPORTED = {
    "queue_class": "greenpool queues waiters itself, oldest first; queue_class is an "
                   "option of redis-py's BlockingConnectionPool only",
}
_CONNECTION_BASES: tuple[type, ...] = tuple(
    getattr(redis.connection, name) for name in ("AbstractConnection", "CacheProxyConnection")
    if hasattr(redis.connection, name)
)


def connection_parameters(connection_class: type) -> frozenset[str] | None:
    """The keyword arguments *connection_class* accepts, or None if any may be.

    Follows ``__init__`` up the class's MRO while each passes ``**kwargs`` on
    (as redis-py's connection classes do) and stops at the first that takes
    no ``**kwargs``. None when every one does: then nothing can be checked.
    """
    names: set[str] = set()
    for klass in connection_class.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            parameters = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):
            return None
        names.update(p.name for p in parameters[1:]
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return frozenset(names)
    return None


def check_connection_class(connection_class: Any) -> None:
    """Refuse, by name, a *connection_class* that is not a redis-py connection class.

    A redis-py connection class is a subclass of redis-py's
    ``AbstractConnection``, or any class with its ``connect()`` and
    ``disconnect()`` methods: redis-py's pools take such stand-ins (its own
    tests use one), and so does greenpool. A string, an instance, a pool or
    a client class is refused here rather than at the first dial.

    :raises ConfigError: naming ``connection_class``, what is expected, and
        what was given.
    """
    if isinstance(connection_class, type) and (
        issubclass(connection_class, _CONNECTION_BASES)
        or all(callable(getattr(connection_class, m, None)) for m in ("connect", "disconnect"))
    ):
        return
    raise ConfigError(
        "connection_class must be a redis-py connection class such as "
        "redis.Connection, redis.SSLConnection or redis.UnixDomainSocketConnection, "
        f"or a class with their connect() and disconnect() methods (got {connection_class!r})"
    )


def _check_names(given: Mapping[str, str], connection_class: type) -> None:
    # given: keyword -> where it came from ("keyword argument", "URL query option").
    accepted = connection_parameters(connection_class)
    for name, where in given.items():
        if name in _NOT_SUPPORTED:
            raise ConfigError(f"{where} {name} is not supported: {_NOT_SUPPORTED[name]}")
        if accepted is None or name in accepted or name in _POOL_KEYWORDS:
            continue
        known = sorted({s.name for s in SETTINGS} - {"url"} | accepted)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(
            f"unknown {where} {name}{hint}: neither a greenpool setting nor a "
            f"parameter of {connection_class.__module__}.{connection_class.__qualname__}"
        )


@dataclass(frozen=True)
class Split:
    """What :func:`split` made of a pool's arguments: what goes where."""

    #: greenpool's settings, with their sources and the URL they came with
    resolved: Resolved
    #: the connection class: explicit, else the URL's scheme's, else the default
    connection_class: type
    #: read-only: the keyword arguments for *connection_class*: the caller's,
    #: the URL's, and the TCP keepalive options the settings drive
    connection_kwargs: Mapping[str, Any]


# None passed for these means "not set", as redis.Redis() and Celery pass it:
# greenpool's setting (or its default) applies.
_NONE_MEANS_UNSET = frozenset({"max_connections", "socket_keepalive", "socket_keepalive_options"})

#: Settings that, not set, are left to the connection class's own default
#: (which differs between redis-py versions) rather than passed.
_CONNECTION_DEFAULTS = ("socket_timeout",)


def split(
    kwargs: Mapping[str, Any],
    *,
    url: str | None = None,
    environ: Mapping[str, str] | None = None,
    prefix: str = "GREENPOOL_",
    url_from_env: bool = False,
    default_class: type = redis.Connection,
) -> Split:
    """Split a pool's arguments into greenpool settings and connection options.

    The one construction path: :class:`~greenpool.BlockingConnectionPool`,
    its ``from_url``, :func:`~greenpool.from_env`, and the Sentinel and
    Cluster pools all come through here, so each keyword means the same
    everywhere.

    - A keyword that is a setting is validated (a value of :data:`DEFAULT`
      means not given; so does None for ``max_connections``,
      ``socket_keepalive`` and ``socket_keepalive_options``, what
      ``redis.Redis()`` and Celery pass for "not set": the pool stays
      bounded and greenpool's keepalive applies).
    - Settings not given come from the URL's query, then the environment
      (``GREENPOOL_*``), then their defaults. The URL itself comes only from
      *url*, or from ``GREENPOOL_URL``/``REDIS_URL`` with *url_from_env*.
    - The URL's other parts mean exactly what redis-py's ``parse_url`` makes
      of them, and win over keywords as in redis-py's ``from_url``; an
      explicit ``connection_class`` wins over the URL's scheme.
    - Every remaining keyword and query option must be a parameter of the
      connection class (or one redis-py's pools take); anything else is an
      error naming it, with the closest known name.

    :raises ConfigError: for a bad value, an unknown name or a connection
        class that is not redis-py's.
    """
    given = {
        k: v for k, v in kwargs.items()
        if v is not DEFAULT and not (v is None and k in _NONE_MEANS_UNSET)
    }
    if "url" in given:
        raise ConfigError(
            "url is not a keyword argument of the pool: use "
            "BlockingConnectionPool.from_url(url, ...) or greenpool.from_env()"
        )
    connection_class = given.pop("connection_class", None)
    settings = {k: given.pop(k) for k in list(given) if k in SETTINGS_BY_NAME}
    resolved = resolve(environ, prefix=prefix, url=url, overrides=settings, read_url=url_from_env)
    from_url: dict[str, Any] = {}
    if resolved.url is not None:
        from_url = parse_url(resolved.url)
        url_class = from_url.pop("connection_class", None)
        connection_class = connection_class or url_class
    connection_class = connection_class or default_class
    check_connection_class(connection_class)
    where = dict.fromkeys(given, "keyword argument")
    where.update(dict.fromkeys(from_url, "URL query option"))
    for name in ("host", "port", "path", "db", "username", "password"):
        if name in from_url:
            where.pop(name)  # the URL's authority and path, not its query
    _check_names(where, connection_class)
    options = {**given, **from_url}
    driven = connection_kwargs(resolved.options, connection_class)
    for name in _CONNECTION_DEFAULTS:
        if resolved.sources[name] == "default":
            del driven[name]
    for key, value in driven.items():
        options.setdefault(key, value)  # the user's own mapping wins
    return Split(resolved, connection_class, types.MappingProxyType(options))


def _default_text(setting: Setting) -> str:
    if setting.name in _CONNECTION_DEFAULTS:
        return "redis-py's"
    value = setting.default
    if value is None or setting.kind == "bool":
        return str(value).lower()
    return f"{_number(value)}s" if setting.kind == "duration" else str(value)


def describe(prefix: str = "GREENPOOL_") -> list[tuple[str, str, str, str]]:
    """Return one row per setting: (variable, keyword, default, description)."""
    return [(prefix + s.env, s.name, _default_text(s), s.description)
            for s in SETTINGS + TOPOLOGY_SETTINGS]


def parameter_docs(indent: str = "    ") -> str:
    """The settings as ``:param:`` lines, for the pool classes' docstrings."""
    lines = []
    for setting in SETTINGS:
        if setting.name != "url":
            lines.append(f"{indent}:param {setting.name}: {setting.description} "
                         f"Default: ``{_default_text(setting)}``, variable "
                         f"``GREENPOOL_{setting.env}``.")
    return "\n".join(lines) + "\n"


def readme_table() -> str:
    """Return the settings as the RST list-table that README.rst includes."""
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 30 25 10 45", ""]
    rows = [("Variable", "Keyword", "Default", "Description")]
    rows += [(f"``{v}``", f"``{k}``", f"``{d}``", text) for v, k, d, text in describe()]
    for first, *rest in rows:
        lines.append(f"   * - {first}")
        lines.extend(f"     - {cell}" for cell in rest)
    return "\n".join(lines) + "\n"
