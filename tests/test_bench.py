"""The benchmark harness: its arithmetic, its plan, and a tiny smoke run.

No test here asserts on a measured time or rate: the machine is shared and
noisy. The smoke run checks that a run completes and reports every pool in
every scenario; the pure helpers are checked with hand-computed numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import redis
from redis.utils import HIREDIS_AVAILABLE

import greenpool
import greenpool.pool
from benchmarks import bench, report, scenarios

POOLS = list(report.POOLS)


# -- statistics ----------------------------------------------------------------


def test_median_of_odd_and_even_counts():
    """The median is the middle value, or the mean of the middle two."""
    assert report.median([3, 1, 2]) == 2
    assert report.median([4, 1, 3, 2]) == 2.5
    with pytest.raises(ValueError, match="at least one value"):
        report.median([])


def test_percentile_interpolates_like_numpy():
    """Percentiles interpolate linearly between the nearest ranks."""
    data = [4, 1, 3, 2]
    assert report.percentile(data, 0) == 1
    assert report.percentile(data, 50) == 2.5
    assert report.percentile(data, 90) == pytest.approx(3.7)
    assert report.percentile(data, 100) == 4
    assert report.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match=r"between 0 and 100 \(got 101\)"):
        report.percentile(data, 101)
    with pytest.raises(ValueError, match="at least one value"):
        report.percentile([], 50)


def test_jain_index():
    """Jain's index is 1 for equal shares and 1/n when one greenlet takes all."""
    assert report.jain_index([5, 5, 5, 5]) == 1.0
    assert report.jain_index([8, 0, 0, 0]) == 0.25
    assert report.jain_index([1, 2, 3]) == pytest.approx(36 / 42)
    assert report.jain_index([0, 0]) == 0.0
    with pytest.raises(ValueError, match="at least one greenlet"):
        report.jain_index([])


def test_gap_stats_counts_the_open_wait_and_the_starved():
    """The longest gap includes waiting at the end; a starved greenlet waited it all."""
    stats = report.gap_stats(0.0, 10.0, [[1.0, 3.0, 6.0], []])
    # Closed gaps 1, 2, 3: mean 2. The starved greenlet waited 10.
    assert stats == {"longest_gap": 10.0, "mean_gap": 2.0, "gap_ratio": 5.0}
    stats = report.gap_stats(0.0, 10.0, [[1.0, 3.0, 6.0]])
    assert stats["longest_gap"] == 4.0  # still waiting from 6 to 10
    even = report.gap_stats(0.0, 10.0, [[2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 3.0, 5.0, 7.0, 9.0]])
    assert even["longest_gap"] == 2.0
    assert even["mean_gap"] == pytest.approx(19 / 10)
    assert even["gap_ratio"] == pytest.approx(2.0 / 1.9)


def test_gap_stats_with_no_completion_and_bad_input():
    """No completion gives no mean; times out of order are refused."""
    assert report.gap_stats(0.0, 2.0, [[], []]) == {
        "longest_gap": 2.0,
        "mean_gap": None,
        "gap_ratio": None,
    }
    with pytest.raises(ValueError, match="ascending and within"):
        report.gap_stats(0.0, 10.0, [[3.0, 2.0]])
    with pytest.raises(ValueError, match="end >= start"):
        report.gap_stats(5.0, 1.0, [])


def test_ratios_are_taken_within_each_repetition():
    """Only repetitions both sides ran count; a time's ratio is inverted."""
    ops = {0: 100.0, 1: 200.0, 2: 300.0}
    reference = {0: 50.0, 1: 100.0, 3: 10.0}
    assert report.ratios_within_reps(ops, reference, higher_is_better=True) == [2.0, 2.0]
    ns = {0: 10.0, 1: 20.0}
    assert report.ratios_within_reps(ns, {0: 500.0, 1: 2000.0}, higher_is_better=False) == [
        50.0,
        100.0,
    ]
    assert report.ratios_within_reps({0: 1.0}, {0: 0.0}, higher_is_better=True) == []


def _measurement(
    scenario: str, pool: str, rep: int, params: Dict[str, Any], **metrics: Any
) -> Dict[str, Any]:
    return {
        "type": "measurement",
        "scenario": scenario,
        "pool": pool,
        "rep": rep,
        "params": params,
        "metrics": metrics,
    }


def test_summary_takes_the_median_of_ratios_not_the_ratio_of_medians():
    """vs pinned is the median of per-repetition ratios."""
    cell = {"n": 100, "m": 8}
    greenpool_ops = [10.0, 30.0, 20.0]
    pinned_ops = [20.0, 15.0, 40.0]  # ratios 0.5, 2.0, 0.5; medians 20 and 20
    records = [
        _measurement("contended", "greenpool", r, cell, ops_per_s=v)
        for r, v in enumerate(greenpool_ops)
    ]
    records += [
        _measurement("contended", "pinned", r, cell, ops_per_s=v) for r, v in enumerate(pinned_ops)
    ]
    records.append(
        {
            "type": "measurement",
            "scenario": "contended",
            "pool": "greenpool",
            "rep": 3,
            "params": cell,
            "error": "worker exited with status 1: boom",
        }
    )
    rows = {row["pool"]: row for row in report.summarise(records)}
    assert rows["greenpool"]["median"]["ops_per_s"] == 20.0
    assert rows["greenpool"]["worst"]["ops_per_s"] == 10.0
    assert rows["greenpool"]["vs"]["pinned"] == {
        "median": 0.5,
        "worst": 0.5,
        "per_rep": [0.5, 2.0, 0.5],
    }
    assert rows["greenpool"]["runs"] == 3 and rows["greenpool"]["failed_runs"] == 1
    assert "pinned" not in rows["pinned"]["vs"]


def test_targets_pass_fail_and_skip():
    """Targets read the median; a target whose data is missing is skipped."""
    micro = {"min_time": 0.2, "inner_repeat": 5, "iterations": None}
    fair = {"n": 200, "m": 4, "timeout": 1.0, "duration": 5.0}
    records = []
    for rep, (ours, theirs) in enumerate(
        [(800.0, 50_000.0), (900.0, 40_000.0), (1_200.0, 60_000.0)]
    ):
        records.append(_measurement("micro", "greenpool", rep, micro, ns_per_op=ours))
        records.append(_measurement("micro", "redis-blocking", rep, micro, ns_per_op=theirs))
    for rep, timeouts in enumerate([0, 0, 3]):
        records.append(
            _measurement(
                "fairness",
                "greenpool",
                rep,
                fair,
                ops_per_s=1.0,
                timeouts=timeouts,
                starved=1,
                jain=0.995,
                gap_ratio=2.0,
            )
        )
    results = {t["label"]: t for t in report.evaluate_targets(report.summarise(records))}
    assert len(results) == len(report.TARGETS)
    ns = results["micro: checkout+release ns"]
    assert (ns["measured"], ns["worst"], ns["status"]) == (900.0, 1_200.0, "PASS")
    speed = results["micro: speed vs redis-blocking"]
    assert speed["measured"] == pytest.approx(50.0) and speed["status"] == "PASS"  # 62.5, 44.4, 50
    assert results["fairness N=200 M=4: pool timeouts"]["status"] == "PASS"  # median 0, worst 3
    assert results["fairness N=200 M=4: pool timeouts"]["worst"] == 3
    assert results["fairness N=200 M=4: starved greenlets"]["status"] == "FAIL"
    assert results["contended N=100 M=8: vs pinned"]["status"] == "SKIP"
    assert results["spike 50 callers on 5 warm: opened"]["status"] == "SKIP"


def test_json_line_is_strict_json():
    """Non-finite numbers become null, so every line parses as strict JSON."""
    line = report.json_line({"a": float("inf"), "b": [float("nan"), 1.5]})
    assert json.loads(line) == {"a": None, "b": [None, 1.5]}


def test_chart_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    """A missing matplotlib skips the chart with a message naming the extra."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    rows = report.summarise(
        [_measurement("contended", "greenpool", 0, {"n": 1, "m": 1}, ops_per_s=1.0)]
    )
    message = report.draw_chart(rows, str(tmp_path / "out.png"))
    assert message is not None and "needs matplotlib" in message and "greenpool[chart]" in message
    assert not (tmp_path / "out.png").exists()
    assert "needs results of the contended scenario" in str(report.draw_chart([], "x.png"))


# -- the plan ------------------------------------------------------------------


def test_schedule_interleaves_pools_within_each_repetition():
    """Each repetition runs every configuration once per pool, back to back, rotating the order."""
    configs = [("micro", {"x": 1}), ("spike", {"y": 2})]
    pools = ["a", "b", "c"]
    runs = list(bench.schedule(configs, pools, 4))
    assert len(runs) == 4 * 2 * 3
    assert [pool for rep, scenario, _, pool in runs[:3]] == ["a", "b", "c"]
    assert [pool for rep, scenario, _, pool in runs[6:9]] == ["b", "c", "a"]
    for start in range(0, len(runs), 3):
        block = runs[start : start + 3]
        assert len({(rep, scenario) for rep, scenario, _, _ in block}) == 1
        assert sorted(pool for *_, pool in block) == pools


def test_quick_plan_covers_every_scenario():
    """--quick runs every scenario once, with the first contended cell the targets name."""
    args = bench.build_parser().parse_args(["--quick"])
    configs = bench.plan(args)
    assert [s for s, _ in configs] == ["micro", "contended", "fairness", "spike"]
    assert [(p["n"], p["m"]) for s, p in configs if s == "contended"] == [(100, 8)]
    fairness = dict(configs)["fairness"]
    assert (fairness["n"], fairness["m"], fairness["timeout"]) == (200, 4, 1.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--pools", "greenpool,nope"],
            "--pools must be a comma-separated list of greenpool, redis-blocking",
        ),
        (
            ["--scenarios", "macro"],
            "--scenarios must be a comma-separated list of micro, contended",
        ),
        (["--cells", "100by8"], "--cells must be NxM pairs such as 100x8,1000x32 (got '100by8')"),
        (["--repeat", "0"], "must be a positive int (got '0')"),
    ],
)
def test_bad_options_are_refused_by_name(argv, message, capsys):
    """A bad option exits with status 2 and says what was expected."""
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_worker_usage():
    """The worker wants exactly one JSON spec."""
    assert scenarios.main([]) == 2


# -- the pools as the issue describes them -------------------------------------


def test_subjects_are_built_as_documented(redis_url):
    """Each pool name builds the pool, bound and clients the report promises."""
    built = {name: scenarios.open_subject(name, redis_url, 3, 1.5) for name in POOLS}
    try:
        assert isinstance(built["greenpool"].pool, greenpool.BlockingConnectionPool)
        assert (built["greenpool"].pool.max_connections, built["greenpool"].pool.timeout) == (
            3,
            1.5,
        )
        assert isinstance(built["redis-blocking"].pool, redis.BlockingConnectionPool)
        assert built["redis-blocking"].pool.max_connections == 3
        assert type(built["redis-bounded"].pool) is redis.ConnectionPool
        assert built["redis-bounded"].pool.max_connections == 3
        assert built["redis-unbounded"].pool.max_connections == 2**31
        pinned = built["pinned"]
        assert pinned.pool is None and len(pinned.clients) == 3
        assert all(c.connection is not None for c in pinned.clients)  # dedicated, already open
        assert pinned.client(4) is pinned.clients[1]
    finally:
        for subject in built.values():
            subject.close()


def test_failures_are_classified():
    """Pool timeouts, 'Too many connections' and other errors are told apart."""
    assert scenarios.classify(greenpool.PoolTimeout("no connection")) == "timeouts"
    assert (
        scenarios.classify(redis.exceptions.ConnectionError("No connection available."))
        == "timeouts"
    )
    assert (
        scenarios.classify(redis.exceptions.ConnectionError("Too many connections")) == "rejections"
    )
    assert scenarios.classify(redis.exceptions.ConnectionError("Connection refused")) == "errors"


# -- a tiny end-to-end run -----------------------------------------------------

_METRICS = {
    "micro": {"ns_per_op", "ns_per_op_median", "iterations", "connections"},
    "contended": {
        "ops_per_s",
        "completed",
        "wait_p50",
        "wait_p99",
        "wait_max",
        "jain",
        "timeouts",
        "rejections",
        "errors",
        "connections",
        "truncated",
    },
    "fairness": {
        "ops_per_s",
        "timeouts",
        "rejections",
        "starved",
        "jain",
        "longest_gap",
        "mean_gap",
        "gap_ratio",
        "connections",
    },
    "spike": {"opened", "connections", "elapsed", "failures"},
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    if redis.VERSION < (5, 0):
        pytest.skip("the benchmark's pinned ceiling needs redis-py 5's single-connection lock")
    """One --quick run on tiny settings, every pool and scenario, repeat 1."""
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--quick",
        "--repeat",
        "1",
        "--cells",
        "100x8",
        "--budget",
        "200",
        "--duration",
        "0.3",
        "--iterations",
        "200",
        "--json",
        str(out / "run.jsonl"),
        "--chart",
        str(out / "chart.png"),
    ]
    capture = _Capture()
    status = capture.run(argv)
    lines = (out / "run.jsonl").read_text().splitlines()
    return {
        "status": status,
        "records": [json.loads(line) for line in lines],
        "out": out,
        **capture.text,
    }


class _Capture:
    """Runs bench.main with stdout and stderr captured (capsys is per test)."""

    def __init__(self) -> None:
        self.text: Dict[str, str] = {}

    def run(self, argv: List[str]) -> int:
        import io

        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        try:
            return bench.main(argv)
        finally:
            self.text = {"stdout": sys.stdout.getvalue(), "stderr": sys.stderr.getvalue()}
            sys.stdout, sys.stderr = saved


@pytest.mark.slow
@pytest.mark.timeout_seconds(150)
def test_smoke_run_completes_with_every_pool_and_scenario(smoke):
    """A quick run exits 0 and measures each pool in each scenario once."""
    assert smoke["status"] == 0, smoke["stderr"][-2000:]
    measurements = [r for r in smoke["records"] if r["type"] == "measurement"]
    assert sorted((m["scenario"], m["pool"]) for m in measurements) == sorted(
        (s, p) for s in report.SCENARIOS for p in POOLS
    )
    for record in measurements:
        assert "error" not in record, record
        assert set(record) >= {"scenario", "pool", "rep", "params", "metrics", "parser"}
        assert _METRICS[record["scenario"]] <= set(record["metrics"]), record
        assert ("Hiredis" in record["parser"]) == HIREDIS_AVAILABLE, record["parser"]
    contended = [m["metrics"] for m in measurements if m["scenario"] == "contended"]
    assert all(m["completed"] == 200 and m["wait_p50"] is not None for m in contended)


@pytest.mark.slow
@pytest.mark.timeout_seconds(150)
def test_smoke_run_header_names_the_environment(smoke):
    """The first JSON line records versions, parser, CPUs and the server."""
    header = smoke["records"][0]
    assert header["type"] == "header"
    assert header["redis_py"] == redis.__version__
    assert ("Hiredis" in header["parser"]) == HIREDIS_AVAILABLE and bool(header["hiredis"]) == HIREDIS_AVAILABLE
    assert header["gevent"] and header["python"] and header["cpu_count"] >= 1
    assert header["redis_server"].count(".") == 2 and header["monkey_patched"] is True
    assert header["server"].startswith("started by the benchmark")


@pytest.mark.slow
@pytest.mark.timeout_seconds(150)
def test_smoke_run_summaries_targets_and_table(smoke):
    """Summaries cover every pool; targets have a verdict; the table shows it all."""
    summaries = [r for r in smoke["records"] if r["type"] == "summary"]
    assert sorted((s["scenario"], s["pool"]) for s in summaries) == sorted(
        (s, p) for s in report.SCENARIOS for p in POOLS
    )
    targets = {t["label"]: t["status"] for t in smoke["records"] if t["type"] == "target"}
    assert len(targets) == len(report.TARGETS)
    assert targets["contended N=1000 M=32: vs pinned"] == "SKIP"  # not in --cells
    measured = [label for label, status in targets.items() if "N=1000" not in label]
    assert all(targets[label] in ("PASS", "FAIL") for label in measured)
    table = smoke["stdout"]
    for text in [
        "redis-server",
        "Parser",
        "targets",
        "micro:",
        "contended:",
        "fairness:",
        "spike:",
        *POOLS,
    ]:
        assert text in table
    assert "rep 1 spike pinned" in smoke["stderr"]


@pytest.mark.slow
@pytest.mark.timeout_seconds(150)
def test_smoke_run_chart(smoke):
    """With matplotlib the chart is a PNG; without it, a message says so."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "needs matplotlib" in smoke["stderr"]
        return
    assert (smoke["out"] / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parser_defaults_match_the_documented_ones():
    """A full run's defaults are those the README states."""
    args = bench.build_parser().parse_args([])
    assert isinstance(args, argparse.Namespace)
    assert (bench.FULL["repeat"], bench.FULL["budget"], bench.FULL["duration"]) == (5, 10_000, 5.0)
    assert len(bench.plan(args)) == 1 + 6 + 1 + 1


def test_code_is_frozen_for_the_workers(tmp_path):
    """The workers import a copy of greenpool and the benchmarks, without bytecode."""
    copied = bench.freeze_code(str(tmp_path))
    assert [Path(c).name for c in copied] == ["greenpool", "benchmarks"]
    assert (tmp_path / "greenpool" / "pool.py").read_bytes() == Path(
        greenpool.pool.__file__
    ).read_bytes()
    assert (tmp_path / "benchmarks" / "scenarios.py").exists()
    assert not list(tmp_path.rglob("__pycache__"))


@pytest.mark.skipif(redis.VERSION >= (5, 0), reason="only redis-py 4.x lacks the single-connection lock")
def test_old_redis_py_is_refused_with_one_line(capsys):
    """On redis-py 4.x the harness says it needs redis-py 5, and exits 2."""
    assert bench.main(["--quick"]) == 2
    assert "needs redis-py 5 or newer" in capsys.readouterr().err


def test_guard_cost_removes_only_the_thread_check_and_runs(redis_url, capsys):
    """benchmarks/guard_cost.py builds the shipped hot path minus the thread check, and runs."""
    from benchmarks import guard_cost

    unguarded = guard_cost.unguarded_pool_class()
    for name in ("get_connection", "release"):
        shipped = getattr(greenpool.BlockingConnectionPool, name).__code__
        variant = getattr(unguarded, name).__code__
        assert "_adopt_thread" in shipped.co_names and "_adopt_thread" not in variant.co_names
        assert set(variant.co_names) == set(shipped.co_names) - {"_adopt_thread", "_thread_ident", "_thread"}
    assert guard_cost.main(["--repeat", "1", "--iterations", "200", "--url", redis_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["greenpool", "greenpool,", "redis.BlockingConnectionPool"]


def test_readme_performance_figures_are_those_of_the_committed_run():
    """README.rst's greenpool figures are read off the run it cites (benchmarks/run-*.jsonl)."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.rst").read_text(encoding="utf-8")
    cited = re.findall(r"``benchmarks/(run-[\d-]+)\.txt``", readme)
    assert len(cited) == 1, cited
    summaries = {}
    for line in (root / "benchmarks" / f"{cited[0]}.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["type"] == "summary":
            cell = (record["params"].get("n"), record["params"].get("m"))
            summaries[record["scenario"], cell, record["pool"]] = record

    def figures(scenario, pool="greenpool", cell=(None, None)):
        record = summaries[scenario, cell, pool]
        return record["median"], {ref: vs["median"] for ref, vs in record["vs"].items()}

    median, vs = figures("micro")
    assert re.search(rf"greenpool +{median['ns_per_op']:,.0f} +{vs['redis-blocking']:.0f}x\n", readme)
    cells = []
    for cell in ((100, 8), (1000, 32)):
        median, vs = figures("contended", cell=cell)
        cells.append(f"{median['ops_per_s']:,.0f} \\({vs['pinned']:.2f}x, {vs['redis-blocking']:.2f}x\\)")
    assert re.search(r"greenpool +" + " +".join(cells) + "\n", readme)
    median, _ = figures("fairness", cell=(200, 4))
    fairness = f"{median['timeouts']:.0f} +{median['starved']:.0f} +{median['jain']:.3f} +{median['gap_ratio']:.1f}"
    assert re.search(rf"greenpool +{fairness}\n", readme)
    median, _ = figures("spike")
    assert re.search(rf"greenpool +{median['opened']:.0f}\n", readme)
