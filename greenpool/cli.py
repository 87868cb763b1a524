"""The ``greenpool`` command line: ``config``, ``check`` and ``demo``.

``python -m greenpool COMMAND`` or, once installed, ``greenpool COMMAND``.
A user's mistake (a bad option or environment variable, an unreachable
server) is reported as one line, ``greenpool: error: ...``, on stderr with a
non-zero status: 2 for bad options and settings, 1 when Redis cannot be
used, 130 on Ctrl-C. Never a traceback.

This module imports nothing but the standard library at the top: each
command imports what it needs when it runs, so that ``demo`` can
monkey-patch gevent before anything it runs opens a socket, and ``config``
and ``check`` never patch at all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
)

if TYPE_CHECKING:  # pragma: no cover
    from .config import Resolved, Setting

__all__ = ["main", "CommandError"]

PROG = "greenpool"
#: ``check`` and ``demo`` give up on a server that does not answer after
#: this many seconds, unless these settings are configured.
FAIL_FAST = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}
#: PINGs ``check`` times after connecting; it reports the median.
PINGS = 5
#: Settings ``check`` prints, as "the pool settings that matter".
POOL_SETTINGS = ("max_connections", "timeout", "max_waiters", "min_idle", "idle_timeout",
                 "max_lifetime", "health_check_interval", "keepalive_ping_interval")
TIMEOUT_SETTINGS = ("socket_timeout", "socket_connect_timeout")
KEEPALIVE_SETTINGS = ("keepalive_idle", "keepalive_interval", "keepalive_count",
                      "tcp_user_timeout")


class CommandError(Exception):
    """A failure reported as one line on stderr, with the exit status to return."""

    def __init__(self, message: str, status: int = 1) -> None:
        # Exception texts (redis-py's, the server's) may span lines: the
        # report is one line.
        super().__init__(" ".join(message.split()))
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, not usage plus a line."""

    def error(self, message: str) -> Any:  # argparse's signature says NoReturn
        raise CommandError(f"{message} (see '{self.prog} --help')", status=2)


# -- shared helpers --------------------------------------------------------


def _resolve(url: Optional[str]) -> "Resolved":
    """The settings from the environment and *url*, or a one-line error."""
    from . import config
    from .errors import ConfigError

    try:
        return config.resolve(url=url)
    except ConfigError as exc:
        raise CommandError(str(exc), status=2) from None


def _redact(url: str) -> str:
    """*url* without its password (see :func:`greenpool.config.redact`)."""
    from . import config

    return str(config.redact(url))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _show(setting: "Setting", value: Any) -> str:
    """A setting's value as the environment would spell it."""
    if value is None:
        return "none"
    if setting.kind == "bool":
        return "true" if value else "false"
    if setting.kind == "duration":
        return f"{_number(value)}s"
    if setting.kind == "url":
        return _redact(value)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Rows in columns two spaces apart; columns numbered in *right* align right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _fail_fast(resolved: "Resolved") -> Dict[str, Any]:
    """Short socket timeouts, for those not configured: a dead server fails fast.

    The defaults are for long-lived pools (socket_timeout redis-py's own, none before
    redis-py 8; socket_connect_timeout 10 s); ``check`` and the demo should answer
    sooner on a server that accepts connections but never answers.
    """
    return {name: seconds for name, seconds in FAIL_FAST.items()
            if resolved.sources[name] == "default"}


@contextlib.contextmanager
def _bad_url(resolved: "Resolved") -> Iterator[None]:
    """Report a URL that redis-py cannot parse (a port that is no number ...)."""
    try:
        yield
    except ValueError as exc:  # ConfigError is one too, but resolve() passed
        url = _redact(resolved.url) if resolved.url else "URL"
        raise CommandError(f"cannot parse {url}: {exc}", status=2) from None


def _target(pool: Any) -> str:
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']} db {kwargs.get('db', 0)}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)} db {kwargs.get('db', 0)}"


def _unreachable(pool: Any, exc: BaseException) -> CommandError:
    return CommandError(f"cannot use Redis at {_target(pool)}: {exc}", status=1)


# -- config ----------------------------------------------------------------


def _config(args: argparse.Namespace) -> int:
    from . import config

    resolved = _resolve(args.url)
    rows = []
    for setting in config.SETTINGS:
        variable = "GREENPOOL_" + setting.env
        source: str = resolved.sources[setting.name]
        if setting.name == "url" and source == "environment" and variable not in os.environ:
            source = "environment (REDIS_URL)"
        rows.append((variable, setting.name, source, _show(setting, resolved.options[setting.name])))
    print(_table(("VARIABLE", "KEYWORD", "SOURCE", "VALUE"), rows))
    return 0


# -- check -----------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    import redis

    from . import _redispy, config, keepalive
    from .env import from_env

    resolved = _resolve(args.url)
    with _bad_url(resolved):
        pool = from_env(url=args.url, **_fail_fast(resolved))
    client = redis.Redis(connection_pool=pool)
    clock = time.perf_counter
    try:
        start = clock()
        client.ping()  # opens the connection
        connect = clock() - start
        rtts = []
        for _ in range(PINGS):
            start = clock()
            client.ping()
            rtts.append(clock() - start)
        version = client.info("server").get("redis_version", "unknown")
        conn = pool.get_connection()
        try:
            sockets = _redispy.sockets_of(_redispy.raw_connection(conn))
            live = keepalive.read_options(sockets[0]) if sockets else None
        finally:
            pool.release(conn)
    except (redis.RedisError, OSError) as exc:
        raise _unreachable(pool, exc) from None
    finally:
        pool.close()

    options = pool.options
    by_name = config.SETTINGS_BY_NAME

    def settings(names: Sequence[str]) -> str:
        shown = []
        for name in names:
            source = pool.sources.get(name, "default")
            note = "" if source == "default" else f" ({source})"
            if name in _fail_fast(resolved):
                note = " (check's default)"
            shown.append(f"{name}={_show(by_name[name], options[name])}{note}")
        return ", ".join(shown)

    url = resolved.url
    print(f"{PROG} check: {_redact(url) if url else 'no URL configured, redis-py default'}")
    print(f"  server     Redis {version} at {_target(pool)}")
    print(f"  connect    {connect * 1000:.2f} ms (connection opened and first PING)")
    print(f"  ping       {statistics.median(rtts) * 1000:.2f} ms (median of {PINGS} round trips)")
    print(f"  pool       {settings(POOL_SETTINGS)}")
    print(f"  sockets    {settings(TIMEOUT_SETTINGS)}")
    for line in _keepalive_lines(options, live):
        print(f"  {line}")
    print("ok")
    return 0


def _keepalive_lines(options: Mapping[str, Any], live: Optional[Mapping[str, Any]]) -> List[str]:
    """Describe the keepalive options read back from the live socket."""
    if live is None or (live["keepalive_idle"] is None and not live["socket_keepalive"]):
        return ["keepalive  not applicable (not a TCP socket)"]
    if not live["socket_keepalive"]:
        return ["keepalive  off on the live socket (socket_keepalive=false)"]

    def show(name: str) -> str:
        value = live[name]
        if value is None:
            return "unsupported here"
        if name == "tcp_user_timeout" and value == 0:
            return "kernel default"
        return _number(value) + ("" if name == "keepalive_count" else "s")

    values = " ".join(f"{name}={show(name)}" for name in KEEPALIVE_SETTINGS)
    lines = [f"keepalive  on (read back from the live socket): {values}"]
    # The kernel holds whole units; greenpool rounds configured values up.
    differ = [name for name in KEEPALIVE_SETTINGS
              if options[name] is not None and live[name] is not None
              and abs(live[name] - options[name]) >= (1 if name != "tcp_user_timeout" else 0.001)]
    if options["socket_keepalive"] and differ:
        wanted = " ".join(f"{name}={_number(options[name])}" for name in differ)
        lines.append(f"warning    the socket differs from the configuration: {wanted}")
    return lines


# -- demo ------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    # The demo lives in its own module, imported only now (see its docstring).
    from ._demo_command import run

    return run(args)


# -- the parser ------------------------------------------------------------

#: The pools ``demo --only`` accepts: the keys of :data:`greenpool.demo.POOLS`,
#: repeated here so that parsing the options imports neither gevent nor redis.
DEMO_POOLS = ("greenpool", "redis", "redis-blocking")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="greenpool: a fair, bounded, kill-safe blocking Redis connection pool "
        "for gevent.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    url_help = "the Redis URL (redis://, rediss:// or unix://); default: GREENPOOL_URL, else REDIS_URL"

    sub = commands.add_parser(
        "config", help="print every setting, its value and where the value comes from",
        description="Print every setting: its environment variable, keyword, source "
        "(argument, url, environment or default) and effective value, as a pool built "
        "from this environment would get them. Passwords are shown as ***.",
    )
    sub.add_argument("--url", help=url_help)
    sub.set_defaults(run=_config)

    sub = commands.add_parser(
        "check", help="connect to Redis and report what the pool gets",
        description="Build the pool from the environment, connect, PING, and report "
        "the server version, the round-trip time, the pool settings and the TCP "
        "keepalive options read back from the live socket. Exit status 1 when Redis "
        "cannot be used. Unless configured, socket_connect_timeout is "
        f"{_number(FAIL_FAST['socket_connect_timeout'])} s and socket_timeout "
        f"{_number(FAIL_FAST['socket_timeout'])} s here, so that a dead server fails fast.",
    )
    sub.add_argument("--url", help=url_help)
    sub.set_defaults(run=_check)

    sub = commands.add_parser(
        "demo", help="run many greenlets over a small pool: greenpool against redis-py's pools",
        description="Run many greenlets over a small pool for a few seconds, doing short "
        "commands (GET, SET, INCR, a small pipeline), with greenpool's pool and then "
        "redis-py's ConnectionPool and BlockingConnectionPool under the same load, and "
        "compare them. Without --url, GREENPOOL_URL or REDIS_URL it runs an embedded "
        "redis-server (on PATH, or the one of pip install 'greenpool[demo]') and stops "
        "it at the end. Keys written are under greenpool:demo: and deleted at the end. "
        "Durations take the environment's form: 3, 3s, 500ms.",
    )
    sub.add_argument("--url", help=url_help + ", else an embedded redis-server")
    sub.add_argument("--greenlets", default="200", metavar="N",
                     help="greenlets running commands (default: %(default)s)")
    sub.add_argument("--max-connections", default="8", metavar="N",
                     help="max_connections of every pool (default: %(default)s)")
    sub.add_argument("--duration", default="3", metavar="SECONDS",
                     help="how long each pool runs (default: %(default)s)")
    sub.add_argument("--timeout", default="1", metavar="SECONDS",
                     help="how long a greenlet waits for a connection, in the blocking "
                     "pools (default: %(default)s)")
    sub.add_argument("--only", action="append", choices=DEMO_POOLS,
                     help="run only this pool (repeatable; default: all three)")
    sub.set_defaults(run=_demo)

    sub = commands.add_parser(
        "bench", add_help=False,
        help="the side-by-side benchmark (from a clone of the repository)",
        description="Run benchmarks/bench.py: greenpool against redis-py's pools and a "
        "no-pool ceiling. 'bench --help' lists its options.",
    )
    # main() hands everything after "bench" to the harness's own parser; this
    # entry only lists the command in --help.
    sub.set_defaults(run=lambda args: _bench([]))
    return parser


def _bench(argv: Sequence[str]) -> int:
    """Hand over to the benchmark harness, which lives beside the package."""
    if os.path.isfile(os.path.join("benchmarks", "bench.py")) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the console script does not put the cwd first
    try:
        from benchmarks import bench
    except ImportError:
        raise CommandError(
            "the benchmark is in the repository's benchmarks/ folder, which is not "
            "installed: run this from a clone of greenpool", status=2,
        ) from None
    return int(bench.main(list(argv), prog=f"{PROG} bench"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with *argv* (``sys.argv[1:]`` by default).

    :returns: the exit status: 0 on success, 1 when Redis cannot be used
        (or the output pipe was closed), 2 for a bad option or setting, 130
        when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])
        args = _parser().parse_args(argv)
        if not hasattr(args, "run"):
            raise CommandError(
                f"a command is required: config, check, demo or bench (see '{PROG} --help')",
                status=2,
            )
        status: int = args.run(args)
        sys.stdout.flush()  # here, so that a closed pipe is reported below
        return status
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except CommandError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`greenpool config | head -3`). Point stdout at
        # devnull so that the flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
