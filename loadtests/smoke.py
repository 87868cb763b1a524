"""A bounded smoke run of greenpool under locust and gunicorn's gevent workers.

    python loadtests/smoke.py

Starts a throwaway redis-server, then, with far more locust users than
pool connections:

1. locust with ``locustfile.py`` (RedisUser) straight against Redis;
2. gunicorn (gevent workers) serving ``app.py``, without and then with
   ``--preload``, each under locust with ``locustfile_http.py``.

It fails (exit status 1) on any locust failure, any "Traceback" in any log,
a worker's pool that built in the master (its pid in the client name), a
worker that never used Redis or never closed its pool, or any process
holding more than its ``max_connections`` Redis connections at any moment
(``CLIENT LIST`` sampled every 50 ms from a separate connection, grouped by
client name: the app appends its pid to ``GREENPOOL_CLIENT_NAME``). It prints
request counts, failures and peak connections per process. It takes about
half a minute; every wait is bounded and every process it starts is stopped.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from greenpool._server import RedisServer, free_port  # noqa: E402

USERS = 50
RUN_TIME = "5s"
MAX_CONNECTIONS = 4
WORKERS = 2
# Generous: this run checks correctness under contention, not latency, and
# the machine may be busy; a PoolTimeout would be a failure.
POOL_TIMEOUT = "10s"
SAMPLE_EVERY = 0.05
LOCUST_LIMIT = 40.0  # seconds, start to exit, for one locust run
START_LIMIT = 20.0  # seconds for gunicorn to boot its workers
STOP_LIMIT = 15.0  # seconds for a process to exit after SIGTERM


class Failed(Exception):
    """The smoke run found a problem."""


def _environment(client_name: Optional[str]) -> Dict[str, str]:
    """The environment of a child: ours without GREENPOOL_*, then the run's pool settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GREENPOOL_") or k == "GREENPOOL_REDIS_SERVER"}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
    )
    if client_name is not None:
        env.update(
            GREENPOOL_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
            GREENPOOL_TIMEOUT=POOL_TIMEOUT,
            GREENPOOL_CLIENT_NAME=client_name,
        )
    return env


def _start(args: Sequence[str], env: Dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        # A session of its own, so a stuck process and its children can be
        # killed as a group.
        return subprocess.Popen(list(args), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop *proc* with *sig*, then kill its whole group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_LIMIT)
        except subprocess.TimeoutExpired:
            print(f"  pid {proc.pid} ignored the signal for {STOP_LIMIT:.0f} s: killing it")
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group, if any
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(5)


class Sampler:
    """Peak connections per client name (with a given prefix), from CLIENT LIST."""

    def __init__(self, admin: redis.Redis, prefix: str) -> None:
        self.admin = admin
        self.prefix = prefix
        self.peaks: Counter[str] = Counter()
        self.samples = 0
        self.log = ""  # locust's output, once it has exited

    def sample(self) -> None:
        now = Counter(info["name"] for info in self.admin.client_list()
                      if info.get("name", "").startswith(self.prefix))
        for name, count in now.items():
            self.peaks[name] = max(self.peaks[name], count)
        self.samples += 1


def _run_locust(name: str, locustfile: str, host: str, env: Dict[str, str], tmp: Path,
                sampler: Sampler) -> Dict[str, int]:
    """Run locust headless while sampling; return request and failure counts."""
    csv_prefix = tmp / name
    log = tmp / f"{name}-locust.log"
    args = [sys.executable, "-m", "locust", "-f", str(HERE / locustfile), "--headless",
            "-u", str(USERS), "-r", str(USERS), "-t", RUN_TIME, "--stop-timeout", "2",
            "--host", host, "--only-summary", "--csv", str(csv_prefix)]
    proc = _start(args, env, log)
    deadline = time.monotonic() + LOCUST_LIMIT
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise Failed(f"{name}: locust still running after {LOCUST_LIMIT:.0f} s")
            sampler.sample()
            time.sleep(SAMPLE_EVERY)
    finally:
        _stop(proc, signal.SIGINT)
    counts = _read_stats(Path(f"{csv_prefix}_stats.csv"), name)
    counts["exit"] = proc.returncode
    _check_log(log, name)
    sampler.log = log.read_text(errors="replace")
    return counts


def _read_stats(path: Path, name: str) -> Dict[str, int]:
    if not path.exists():
        raise Failed(f"{name}: locust wrote no {path.name}")
    counts: Dict[str, int] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            label = "total" if row["Name"] == "Aggregated" else f"{row['Type']} {row['Name']}"
            counts[label] = int(row["Request Count"])
            counts[f"{label} failures"] = int(row["Failure Count"])
    if "total" not in counts:
        raise Failed(f"{name}: {path.name} has no Aggregated row")
    return counts


def _check_log(log: Path, name: str) -> None:
    text = log.read_text(errors="replace")
    if "Traceback" in text:
        at = text.index("Traceback")
        raise Failed(f"{name}: a Traceback in {log.name}:\n{text[max(0, at - 500):at + 2500]}")


def _report(name: str, counts: Dict[str, int], sampler: Sampler) -> None:
    print(f"{name}: {counts['total']} requests, {counts['total failures']} failures, "
          f"locust exit status {counts['exit']}")
    for label, value in counts.items():
        if label not in ("total", "total failures", "exit") and not label.endswith("failures"):
            print(f"  {label:34} {value:7d} requests {counts[label + ' failures']:4d} failures")
    peaks = ", ".join(f"{client}={peak}" for client, peak in sorted(sampler.peaks.items()))
    print(f"  peak connections per process (max {MAX_CONNECTIONS}, {sampler.samples} samples): "
          f"{peaks or 'none seen'}")


def _check(name: str, counts: Dict[str, int], sampler: Sampler) -> List[str]:
    problems = []
    if counts["total failures"] or counts["exit"] != 0:
        problems.append(f"{name}: {counts['total failures']} failures, "
                        f"locust exit status {counts['exit']}")
    if counts["total"] == 0:
        problems.append(f"{name}: no requests")
    for client, peak in sampler.peaks.items():
        if peak > MAX_CONNECTIONS:
            problems.append(f"{name}: {client} held {peak} connections, "
                            f"more than max_connections={MAX_CONNECTIONS}")
    return problems


def _wait_for_workers(proc: subprocess.Popen[bytes], port: int, log: Path) -> List[int]:
    """Wait until gunicorn listens and every worker built its pool; return their pids."""
    deadline = time.monotonic() + START_LIMIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failed(f"gunicorn exited with status {proc.returncode}:\n{log.read_text()}")
        pids = _pids(log, "built")
        if len(pids) >= WORKERS:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return pids
        time.sleep(0.1)
    raise Failed(f"gunicorn workers not ready within {START_LIMIT:.0f} s:\n{log.read_text()}")


def _pids(log: Path, verb: str) -> List[int]:
    # Lines written by loadtests/gunicorn.conf.py's hooks.
    marker = "greenpool: worker "
    pids = []
    for line in log.read_text(errors="replace").splitlines():
        if marker in line and f" {verb} " in line:
            pids.append(int(line.split(marker, 1)[1].split()[0]))
    return pids


def _run_gunicorn(name: str, preload: bool, server: RedisServer, admin: redis.Redis,
                  tmp: Path) -> List[str]:
    client_name = f"smoke-{name}"
    env = _environment(client_name)
    env.update(GREENPOOL_URL=server.url, WEB_CONCURRENCY=str(WORKERS))
    port = free_port()
    env["GUNICORN_BIND"] = f"127.0.0.1:{port}"
    log = tmp / f"{name}-gunicorn.log"
    args = [sys.executable, "-m", "gunicorn", "-c", str(HERE / "gunicorn.conf.py"),
            *(["--preload"] if preload else []), "loadtests.app:application"]
    proc = _start(args, env, log)
    sampler = Sampler(admin, client_name + "-")
    try:
        workers = _wait_for_workers(proc, port, log)
        counts = _run_locust(name, "locustfile_http.py", f"http://127.0.0.1:{port}",
                             _environment(None), tmp, sampler)
    finally:
        _stop(proc)
    _check_log(log, f"{name} (gunicorn)")
    _report(f"{name} ({WORKERS} gevent workers, pids {workers}, master {proc.pid})",
            counts, sampler)
    problems = _check(name, counts, sampler)
    seen = {int(client.rsplit("-", 1)[1]) for client in sampler.peaks}
    if proc.pid in seen:
        problems.append(f"{name}: the master (pid {proc.pid}) opened Redis connections")
    if set(workers) - seen:
        problems.append(f"{name}: workers {sorted(set(workers) - seen)} never used Redis")
    for line in log.read_text(errors="replace").splitlines():
        if "greenpool: worker " in line and " closed pool " in line:
            print("  " + line.split("] ", 3)[-1])
    if sorted(_pids(log, "closed")) != sorted(workers):
        problems.append(f"{name}: pools closed at worker exit: {_pids(log, 'closed')}, "
                        f"expected {workers}")
    return problems


def _run_redis_user(server: RedisServer, admin: redis.Redis, tmp: Path) -> List[str]:
    name = "redisuser"
    client_name = f"smoke-{name}-{os.getpid()}"
    sampler = Sampler(admin, client_name)
    counts = _run_locust(name, "locustfile.py", server.url, _environment(client_name), tmp,
                         sampler)
    _report(f"{name} (one locust process, one pool)", counts, sampler)
    for line in sampler.log.splitlines():
        if "(test stopped, pool closed)" in line:
            print("  " + line.split("greenpool.locust: ", 1)[-1])
    problems = _check(name, counts, sampler)
    if not sampler.peaks:
        problems.append(f"{name}: no connection named {client_name} was seen")
    if "(test stopped, pool closed)" not in sampler.log:
        problems.append(f"{name}: RedisUser's pool was not closed at test stop")
    return problems


def main() -> int:
    started = time.monotonic()
    problems: List[str] = []
    admin: Optional[redis.Redis] = None
    with tempfile.TemporaryDirectory(prefix="greenpool-smoke-") as tmp_dir, \
            RedisServer() as server:
        tmp = Path(tmp_dir)
        admin = redis.Redis(host=server.host, port=server.port, socket_timeout=5,
                            client_name="smoke-admin")
        try:
            problems += _run_redis_user(server, admin, tmp)
            problems += _run_gunicorn("plain", False, server, admin, tmp)
            problems += _run_gunicorn("preload", True, server, admin, tmp)
        except Failed as exc:
            problems.append(str(exc))
        finally:
            admin.close()
            admin.connection_pool.disconnect()
    print(f"smoke run took {time.monotonic() - started:.1f} s")
    if problems:
        print("FAILED:\n- " + "\n- ".join(problems))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
