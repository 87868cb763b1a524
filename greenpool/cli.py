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
import shutil
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
    TextIO,
    Tuple,
)

if TYPE_CHECKING:  # pragma: no cover
    from .config import Resolved, Setting
    from .demo import Progress, Result

__all__ = ["main", "CommandError"]

PROG = "greenpool"
#: ``check`` and ``demo`` give up on a server that does not answer after
#: this many seconds, unless these settings are configured.
FAIL_FAST = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}
#: PINGs ``check`` times after connecting; it reports the median.
PINGS = 5
#: How often the demo's progress line is refreshed: in place on a terminal,
#: as new lines otherwise (a log should not fill up).
TTY_INTERVAL, PLAIN_INTERVAL = 0.2, 1.0
#: The longest pool name in the demo, so progress lines align.
LABEL_WIDTH = len("greenpool.BlockingConnectionPool")
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
    """*url* without its password (in the authority or a ``password=`` option)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hostport}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key == "password" for key, _ in pairs):
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # untouched, so unix:///path keeps its three slashes
    return urlunsplit(parts._replace(netloc=netloc, query=query))


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

    The defaults are for long-lived pools (socket_timeout waits for ever,
    socket_connect_timeout 10 s); ``check`` and the demo should answer
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

    from . import config, keepalive
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
            # redis-py's client-side cache wraps the connection in a proxy.
            sock = getattr(conn, "_conn", conn)._sock
            live = keepalive.read_options(sock) if sock is not None else None
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


def _patch_gevent() -> None:
    """Monkey-patch this process for the demo, once."""
    from gevent import monkey

    if monkey.is_module_patched("socket"):
        return
    # Nothing has imported redis or ssl yet: greenpool/__init__.py and this
    # module import them lazily, for this moment.
    monkey.patch_all()


class _ProgressLine:
    """The demo's live progress: one line redrawn on a terminal, lines otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = TTY_INTERVAL if self.tty else PLAIN_INTERVAL
        self.drawn = False

    def __call__(self, p: "Progress") -> None:
        p99 = "-" if p.wait_p99 is None else f"{p.wait_p99 * 1000:.1f} ms"
        text = (f"{p.label:<{LABEL_WIDTH}}  {p.elapsed:.1f}/{_number(p.duration)} s  "
                f"{p.operations:,} ops  {p.ops_per_second:,.0f} ops/s  "
                f"in use {p.in_use}/{p.max_connections}  waiting {p.waiting}  wait p99 {p99}  "
                f"errors {p.errors:,}")
        if self.tty:
            # A line longer than the terminal would wrap, and \r only goes
            # back to the start of its last row: cut it instead.
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + text[:width] + "\x1b[K")  # erase the old line's rest
            self.drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        """Keep the last line drawn on a terminal, and start a new one."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _summary(results: Sequence["Result"]) -> str:
    header = ("pool", "operations", "ops/s", "errors/timeouts", "starved", "fairness", "wait p99")
    rows = [(r.label, f"{r.operations:,}", f"{r.ops_per_second:,.0f}", f"{r.errors:,}",
             f"{r.starved}/{r.greenlets}", f"{r.fairness:.2f}", _ms(r.wait_p99))
            for r in results]
    lines = [_table(header, rows, right=range(1, len(header)))]
    for r in results:
        for kind, count in r.error_counts.items():
            lines.append(f"  {r.label}: {count:,} x {kind}: {r.error_examples[kind]}")
    lines += [
        "",
        "starved: greenlets that completed no command. fairness: Jain's index over the",
        "commands each greenlet completed (1.00: all did as many; k/n: only k of n did any).",
        "wait p99: 99th percentile of the time to get a connection, failures included.",
    ]
    return "\n".join(lines)


def _demo(args: argparse.Namespace) -> int:
    _patch_gevent()
    from . import demo

    options = _demo_options(args)
    resolved = _resolve(args.url)
    kinds = list(dict.fromkeys(args.only or demo.POOLS))
    with _interrupt_main_on_signals(), _redis_for_demo(args.url, resolved) as (url, where):
        version = _demo_probe(url, resolved)
        print(f"{PROG} demo: {options['greenlets']} greenlets share "
              f"{options['max_connections']} connections, {_number(options['duration'])} s "
              f"per pool, pool timeout {_show_timeout(options['timeout'])}")
        print(f"Redis {version} at {where}", flush=True)  # before the wait, even in a pipe
        progress = _ProgressLine(sys.stderr)
        results = []
        for kind in kinds:
            pool = demo.build_pool(kind, url, max_connections=options["max_connections"],
                                   timeout=options["timeout"])
            try:
                results.append(demo.run_pool(
                    pool, greenlets=options["greenlets"], duration=options["duration"],
                    label=demo.POOLS[kind], on_progress=progress, interval=progress.interval,
                ))
            finally:
                progress.end()
                demo.close_pool(pool)
        _delete_demo_keys(resolved.url or url)
    print()
    print(_summary(results))
    return 0


@contextlib.contextmanager
def _interrupt_main_on_signals() -> Iterator[None]:
    """Deliver Ctrl-C (and SIGTERM) to the main greenlet only, while inside.

    Python raises KeyboardInterrupt in whichever greenlet runs when the signal
    lands, which under load is a worker: it would die with a traceback and
    the main greenlet would go on. Here the signal is turned into
    KeyboardInterrupt (SIGINT) or SystemExit(143) (SIGTERM) raised in the main
    greenlet, which then stops the load, closes the pools and stops the
    embedded server on its way out. A signal that the process was started
    ignoring (``nohup``, ``&`` in a script) stays ignored.
    """
    import signal

    import gevent

    main = gevent.getcurrent()
    handlers = [
        gevent.signal_handler(signum, gevent.kill, main, exception)
        for signum, exception in ((signal.SIGINT, KeyboardInterrupt),
                                  (signal.SIGTERM, SystemExit(128 + signal.SIGTERM)))
        if signal.getsignal(signum) is not signal.SIG_IGN
    ]
    try:
        yield
    finally:
        for handler in handlers:
            handler.cancel()


@contextlib.contextmanager
def _redis_for_demo(url: Optional[str], resolved: "Resolved") -> Iterator[Tuple[str, str]]:
    """The configured Redis, else an embedded redis-server stopped on the way out.

    :returns: the URL to use, and how to show it.
    """
    from ._server import ENV_VAR, RedisServer, find_redis_server

    if resolved.url is not None:
        # The URL as given, with greenpool's query options if any: they apply
        # to greenpool's pool (demo.build_pool strips them for redis-py's).
        given = url or os.environ.get("GREENPOOL_URL", os.environ.get("REDIS_URL", ""))
        yield given, _redact(given)
        return
    try:
        binary = find_redis_server()
    except RuntimeError as exc:
        if os.environ.get(ENV_VAR):
            raise CommandError(str(exc)) from None
        raise CommandError(
            "the demo needs a redis-server and found none on PATH: run "
            "pip install 'greenpool[demo]' (it installs one), or pass --url redis://HOST:PORT"
        ) from None
    server = RedisServer(binary=binary)
    try:
        try:
            server.start()
        except RuntimeError as exc:  # its message goes on with the server's log
            raise CommandError(str(exc).splitlines()[0]) from None
        yield server.url, f"{server.url} (an embedded redis-server, stopped at the end)"
    finally:
        server.stop()


def _delete_demo_keys(url: str) -> None:
    import redis

    from . import demo

    client = redis.Redis.from_url(url, **FAIL_FAST)
    try:
        demo.delete_keys(client)
    finally:
        # redis-py 4.6's close() would keep the connection open.
        client.connection_pool.disconnect()


def _demo_options(args: argparse.Namespace) -> Mapping[str, Any]:
    """Parse the demo's numbers as the environment's values are parsed."""
    from . import config
    from .errors import ConfigError

    table = {
        "greenlets": config.Setting("greenlets", "", "int", 200, "", minimum=1),
        "max_connections": config.SETTINGS_BY_NAME["max_connections"],
        "duration": config.Setting("duration", "", "duration", 3.0, "", minimum=0,
                                   exclusive_minimum=True),
        "timeout": config.SETTINGS_BY_NAME["timeout"],
    }
    try:
        return {name: config.parse(setting, getattr(args, name),
                                   where="--" + name.replace("_", "-"))
                for name, setting in table.items()}
    except ConfigError as exc:
        raise CommandError(str(exc), status=2) from None


def _show_timeout(timeout: Optional[float]) -> str:
    return "none (waits for ever)" if timeout is None else f"{_number(timeout)} s"


def _demo_probe(url: str, resolved: "Resolved") -> str:
    """Check that *url* answers, before any load; return the server's version."""
    import redis

    from .pool import BlockingConnectionPool

    with _bad_url(resolved):
        pool = BlockingConnectionPool.from_url(url, max_connections=1, **_fail_fast(resolved))
    try:
        return str(redis.Redis(connection_pool=pool).info("server").get("redis_version"))
    except (redis.RedisError, OSError) as exc:
        raise _unreachable(pool, exc) from None
    finally:
        pool.close()


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
