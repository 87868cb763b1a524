"""The harness: greenpool side by side with redis-py's pools, under gevent.

::

    python -m benchmarks.bench                      # everything: 225 runs, ~15 minutes
    python -m benchmarks.bench --quick              # a smoke run: 40 runs, under a minute
    python -m benchmarks.bench --scenarios contended --pools greenpool,pinned \\
        --json results.jsonl --chart contended.png

Each measurement runs in a fresh interpreter that monkey-patches first
(:mod:`benchmarks.scenarios`), so no run inherits another's connections,
greenlets or garbage. Within each repetition every configuration runs once
per pool, the pools one after the other (their order rotating from one
repetition to the next), so machine noise hits every pool alike; the report
(:mod:`benchmarks.report`) gives medians over the repetitions and ratios
taken within each repetition.

Output: JSON lines (a ``header`` with the versions and the machine, one
``measurement`` per run as it completes, then ``summary`` and ``target``
records and a ``footer``) to ``--json FILE`` or else stdout, and a readable
table to stdout, or to stderr when stdout carries the JSON. Progress goes
to stderr. The exit status is 0, or 1 if a run failed; a missed target is a
measurement, not a failure.

:func:`main` takes the argument list, so a command line elsewhere (``python
-m greenpool bench``) can call it. The package imports nothing outside the
standard library and ``greenpool._server`` until a worker runs, and names
its worker module relative to itself: moved to ``greenpool/bench/``, it works
unchanged (the worker becomes ``greenpool.bench.scenarios``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

from . import report

__all__ = ["main", "build_parser", "plan", "schedule", "freeze_code", "run_worker"]

#: The worker module, next to this one wherever the package lives.
WORKER = f"{__package__}.scenarios"
#: The packages the workers import, copied at the start of a run.
PACKAGES = tuple(dict.fromkeys(["greenpool", str(__package__).split(".")[0]]))

#: Defaults of a full run and of ``--quick``.
FULL: Dict[str, Any] = {
    "repeat": 5,
    "min_time": 0.2,
    "inner_repeat": 5,
    "cells": [(10, 8), (100, 8), (1000, 8), (10, 32), (100, 32), (1000, 32)],
    "budget": 10_000,
    "max_seconds": 60.0,
    "duration": 5.0,
}
QUICK: Dict[str, Any] = {
    "repeat": 2,
    "min_time": 0.01,
    "inner_repeat": 3,
    "cells": [(100, 8)],
    "budget": 500,
    "max_seconds": 15.0,
    "duration": 0.3,
}


def _names(kind: str, known: Sequence[str]) -> Any:
    def parse(text: str) -> List[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"{kind} must be a comma-separated list of {', '.join(known)} (got {text!r})"
            )
        return names

    return parse


def _cells(text: str) -> List[Tuple[int, int]]:
    cells = []
    for item in text.split(","):
        n, _, m = item.strip().partition("x")
        if not (n.isdigit() and m.isdigit() and int(n) > 0 and int(m) > 0):
            raise argparse.ArgumentTypeError(
                f"--cells must be NxM pairs such as 100x8,1000x32 (got {text!r})"
            )
        cells.append((int(n), int(m)))
    return cells


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__} (got {text!r})")
        return value

    return parse


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line; *prog* names the command in ``--help``."""
    parser = argparse.ArgumentParser(
        prog=prog or f"python -m {__package__}.bench",
        description="Benchmark greenpool against redis-py's pools under gevent.",
        epilog="Pools: " + "; ".join(f"{k}: {v}" for k, v in report.POOLS.items()),
    )
    add = parser.add_argument
    add(
        "--scenarios",
        type=_names("--scenarios", report.SCENARIOS),
        default=list(report.SCENARIOS),
        help="comma-separated, default all: %(default)s",
    )
    add(
        "--pools",
        type=_names("--pools", list(report.POOLS)),
        default=list(report.POOLS),
        help="comma-separated, default all",
    )
    add("--repeat", type=_positive(int), help="repetitions (default 5; --quick 2)")
    add("--quick", action="store_true", help="a smoke run for CI: few repetitions, small budgets")
    add("--url", help="use this redis server instead of starting one (it gets keys bench:*)")
    add("--json", metavar="FILE", help="write the JSON lines here instead of stdout")
    add("--chart", metavar="PNG", help="draw contended throughput and waits (needs matplotlib)")
    add("--cells", type=_cells, help="contended N x M cells, e.g. 100x8,1000x32 (default: all six)")
    add(
        "--budget",
        type=_positive(int),
        help="contended: commands per run (default 10000; --quick 500)",
    )
    add(
        "--duration",
        type=_positive(float),
        help="fairness: seconds per run (default 5; --quick 0.3)",
    )
    add("--iterations", type=_positive(int), help="micro: loop count (default: calibrated)")
    return parser


def plan(args: argparse.Namespace) -> List[Tuple[str, Dict[str, Any]]]:
    """The configurations to run: (scenario, params), in table order."""
    base = QUICK if args.quick else FULL
    every: Dict[str, List[Dict[str, Any]]] = {
        "micro": [
            {"min_time": base["min_time"], "inner_repeat": base["inner_repeat"], "iterations": args.iterations}
        ],
        "contended": [
            {"n": n, "m": m, "budget": args.budget or base["budget"], "value_size": 16, "timeout": 10.0,
             "max_seconds": base["max_seconds"]}
            for n, m in args.cells or base["cells"]
        ],
        "fairness": [{"n": 200, "m": 4, "timeout": 1.0, "duration": args.duration or base["duration"]}],
        "spike": [{"callers": 50, "warm": 5, "max_connections": 50, "timeout": 5.0}],
    }  # fmt: skip
    return [(scenario, params) for scenario in report.SCENARIOS if scenario in args.scenarios
            for params in every[scenario]]  # fmt: skip


def schedule(
    configs: Sequence[Tuple[str, Dict[str, Any]]], pools: Sequence[str], repeat: int
) -> Iterator[Tuple[int, str, Dict[str, Any], str]]:
    """Every run, interleaved: (rep, scenario, params, pool).

    Repetitions are outermost; in each, every configuration runs once per
    pool, back to back, starting one pool later at each repetition.
    """
    for rep in range(repeat):
        shift = rep % len(pools)
        order = list(pools[shift:]) + list(pools[:shift])
        for scenario, params in configs:
            for pool in order:
                yield rep, scenario, params, pool


def freeze_code(directory: str) -> List[str]:
    """Copy :data:`PACKAGES` into *directory*, where the workers import them from.

    A full run lasts minutes, and the pool is edited meanwhile: each worker
    would import whatever ``pool.py`` was on disk when it started, mixing
    versions in one table. A copy taken at the start measures one version.

    :returns: the directories copied.
    """
    copied = []
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"cannot find the {package!r} package to copy for the workers")
        source = Path(list(spec.submodule_search_locations)[0])
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(source, Path(directory, package), ignore=ignore)
        copied.append(str(source))
    return copied


def _worker_env(code: str) -> Dict[str, str]:
    env = dict(os.environ)
    # The developer's GREENPOOL_* settings would tune one pool of five.
    for name in list(env):
        if name.startswith("GREENPOOL_") and name != "GREENPOOL_REDIS_SERVER":
            del env[name]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (code, env.get("PYTHONPATH")) if p)
    return env


def _time_limit(scenario: str, params: Dict[str, Any]) -> float:
    """Seconds after which a worker is killed: a hang, never a slow run."""
    if scenario == "contended":
        return params["max_seconds"] + params["timeout"] + 60
    if scenario == "fairness":
        return params["duration"] + params["timeout"] + 60
    return 120.0


def run_worker(spec: Dict[str, Any], timeout: float, code: str) -> Dict[str, Any]:
    """Run one measurement in a new interpreter; its result, or ``{"error": ...}``.

    *code* is the directory :func:`freeze_code` filled; it is also the
    working directory, which ``python -m`` puts first on ``sys.path``.
    """
    command = [sys.executable, "-m", WORKER, json.dumps(spec)]
    try:
        done = subprocess.run(
            command,
            cwd=code,
            env=_worker_env(code),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"worker still running after {timeout:g} s; killed"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        return {"error": f"worker exited with status {done.returncode}: {tail}"}
    try:
        result: Dict[str, Any] = json.loads(lines[-1])
    except ValueError:
        return {"error": f"worker printed no JSON result (last line: {lines[-1][:200]!r})"}
    return result


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _progress(record: Dict[str, Any], index: int, total: int, seconds: float) -> str:
    params = record["params"]
    where = f" N={params['n']} M={params['m']}" if record["scenario"] == "contended" else ""
    label = (
        f"[{index:>3}/{total}] rep {record['rep'] + 1} {record['scenario']}{where} {record['pool']}"
    )
    if "error" in record:
        return f"{label}: FAILED {record['error'].splitlines()[0]}"
    metrics = record["metrics"]
    shown = {
        "micro": lambda: f"{metrics['ns_per_op']:,.0f} ns/op",
        "contended": lambda: f"{metrics['ops_per_s']:,.0f} ops/s",
        "fairness": lambda: f"jain {metrics['jain']:.3f}, {metrics['starved']} starved",
        "spike": lambda: f"{metrics['opened']} opened",
    }[record["scenario"]]()
    return f"{label}: {shown} ({seconds:.1f} s)"


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Run the benchmark; 0 if every run succeeded, 1 if any failed, 2 on bad usage.

    Targets that are missed do not change the status: they are measurements.
    """
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return int(exc.code or 0)
    import redis

    if redis.VERSION < (5, 0):
        # "pinned" shares each client's connection through the lock that
        # redis-py 5 gave single-connection clients; 4.x has none.
        print(f"{parser.prog}: error: the benchmark needs redis-py 5 or newer "
              f"(this is {redis.__version__})", file=sys.stderr)
        return 2
    repeat = args.repeat or (QUICK if args.quick else FULL)["repeat"]
    configs = plan(args)
    with ExitStack() as stack:
        if args.url:
            url, server = args.url, f"given by --url {_redacted(args.url)}"
        else:
            from greenpool._server import RedisServer

            started = stack.enter_context(RedisServer())
            url, server = started.url, f"started by the benchmark at {started.host}:{started.port}"
        code = stack.enter_context(tempfile.TemporaryDirectory(prefix="greenpool-bench-"))
        copied = freeze_code(code)
        out: IO[str] = stack.enter_context(open(args.json, "w")) if args.json else sys.stdout
        table_out = sys.stdout if args.json else sys.stderr

        def emit(record: Dict[str, Any]) -> None:
            out.write(report.json_line(record) + "\n")
            out.flush()

        environment = run_worker({"scenario": "probe", "url": url}, 60, code)
        if "error" in environment:
            sys.stderr.write(
                f"cannot benchmark: the probe of {_redacted(url)} failed: {environment['error']}\n"
            )
            return 1
        header = {
            "type": "header",
            "started_at": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%SZ"
            ),
            **environment,
            "server": server,
            "load_average": _load(),
            "repeat": repeat,
            "quick": args.quick,
            "scenarios": args.scenarios,
            "pools": args.pools,
            "worker": f"{sys.executable} -m {WORKER}",
            "code": f"copies of {', '.join(copied)} taken at the start",
            "argv": list(sys.argv[1:] if argv is None else argv),
        }
        emit(header)
        measurements = []
        t0 = time.monotonic()
        runs = list(schedule(configs, args.pools, repeat))
        for index, (rep, scenario, params, pool) in enumerate(runs, 1):
            spec = {"scenario": scenario, "pool": pool, "url": url, "params": params}
            began = time.monotonic()
            result = run_worker(spec, _time_limit(scenario, params), code)
            record = {
                "type": "measurement",
                "scenario": scenario,
                "pool": pool,
                "rep": rep,
                "params": params,
                **result,
            }
            emit(record)
            measurements.append(record)
            sys.stderr.write(_progress(record, index, len(runs), time.monotonic() - began) + "\n")
        summaries = report.summarise(measurements)
        targets = report.evaluate_targets(summaries)
        header["load_average_end"] = _load()
        footer = {
            "type": "footer",
            "runs": len(runs),
            "failed_runs": sum("error" in m for m in measurements),
            "seconds": round(time.monotonic() - t0, 1),
            "load_average": header["load_average_end"],
        }
        for row in [*summaries, *targets, footer]:
            emit(row)
        table_out.write("\n" + report.render_table(header, summaries, targets))
        table_out.flush()
    if args.chart:
        problem = report.draw_chart(summaries, args.chart)
        sys.stderr.write((problem or f"chart written to {args.chart}") + "\n")
    return 1 if any("error" in m for m in measurements) else 0


def _load() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
