"""The ``demo`` command: the project's main job, run by ``greenpool demo``.

It monkey-patches the process (before anything imports redis or ssl), finds
Redis (the configured URL, else an embedded redis-server it starts and
stops), checks that it answers, runs the load of :mod:`greenpool.demo` on
greenpool's pool and on redis-py's two pools in turn with a live progress
line, deletes its keys and prints the comparison.

:mod:`greenpool.cli` parses the options and imports this module only when
the command runs, so that ``config`` and ``check`` never patch; errors are
raised as :class:`~greenpool.cli.CommandError` and reported there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence, TextIO, Tuple

from .cli import (
    FAIL_FAST,
    PROG,
    CommandError,
    _bad_url,
    _fail_fast,
    _number,
    _redact,
    _resolve,
    _table,
    _unreachable,
)

if TYPE_CHECKING:  # pragma: no cover
    from .config import Resolved
    from .demo import Progress, Result

__all__ = ["run"]

#: How often the progress line is refreshed: in place on a terminal, as new
#: lines otherwise (a log should not fill up).
TTY_INTERVAL, PLAIN_INTERVAL = 0.2, 1.0
#: The longest pool name in the demo, so progress lines align.
LABEL_WIDTH = len("greenpool.BlockingConnectionPool")


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


def run(args: argparse.Namespace) -> int:
    """Run ``greenpool demo`` with its parsed *args*; return the exit status."""
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
