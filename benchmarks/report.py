"""What a benchmark run measured: statistics, targets, JSON lines, table, chart.

Pure functions of the measurements, with no dependency beyond the standard
library (matplotlib is imported only by :func:`draw_chart`), so both the
harness and the monkey-patched workers import this module, and the tests
check its arithmetic without running anything.

Every measurement is one run of one pool in one configuration (a scenario
and its parameters) in one repetition. A summary groups a configuration's
runs of one pool: the median of each metric over the repetitions, the worst
repetition, and the "speed vs" ratios to ``pinned`` and ``redis-blocking``,
each taken between runs of the *same* repetition (which ran back to back,
so machine noise hit both alike) and then reduced to their median.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "POOLS",
    "SCENARIOS",
    "REFERENCES",
    "TARGETS",
    "Target",
    "median",
    "percentile",
    "jain_index",
    "gap_stats",
    "ratios_within_reps",
    "config_key",
    "summarise",
    "evaluate_targets",
    "json_line",
    "render_table",
    "draw_chart",
]

#: The pools compared, in table order, with what each one is.
POOLS: Dict[str, str] = {
    "greenpool": "greenpool.BlockingConnectionPool(max_connections=M)",
    "redis-blocking": "redis.BlockingConnectionPool(max_connections=M)",
    "redis-bounded": "redis.ConnectionPool(max_connections=M): raises 'Too many connections'",
    "redis-unbounded": "redis.ConnectionPool(max_connections=2**31): opens one per caller",
    "pinned": "M redis.Redis(single_connection_client=True); greenlet i uses client i % M",
}

#: The scenarios, in run and table order.
SCENARIOS: Tuple[str, ...] = ("micro", "contended", "fairness", "spike")

#: The pools every other one is compared with ("speed vs" columns).
REFERENCES: Tuple[str, ...] = ("pinned", "redis-blocking")

#: Per scenario, the metric the "speed vs" ratios compare.
_PRIMARY: Dict[str, str] = {"micro": "ns_per_op", "contended": "ops_per_s", "fairness": "ops_per_s"}

#: Metrics where a larger value is better; for every other one, smaller is.
_HIGHER_IS_BETTER = frozenset({"ops_per_s", "jain", "completions", "completions_min"})


# -- statistics ----------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    """The median of *values*; the mean of the middle two for an even count."""
    data = list(values)
    if not data:
        raise ValueError("median() needs at least one value (got none)")
    return float(statistics.median(data))


def percentile(values: Iterable[float], q: float) -> float:
    """The *q*-th percentile (0 to 100) of *values*, interpolating linearly.

    The same definition as numpy's default: rank ``q/100 * (n - 1)`` in the
    sorted data, between the two nearest values.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be between 0 and 100 (got {q!r})")
    data = sorted(values)
    if not data:
        raise ValueError("percentile() needs at least one value (got none)")
    rank = q / 100 * (len(data) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def jain_index(counts: Sequence[float]) -> float:
    """Jain's fairness index of per-greenlet completions: 1.0 when all are equal.

    ``(sum x)^2 / (n * sum x^2)``; it falls towards ``1/n`` as one greenlet
    takes everything. No completions at all counts as 0.0: nothing was shared.
    """
    if not counts:
        raise ValueError("jain_index() needs at least one greenlet's count (got none)")
    squares = math.fsum(x * x for x in counts)
    if squares == 0:
        return 0.0
    return math.fsum(counts) ** 2 / (len(counts) * squares)


def gap_stats(start: float, end: float, completions: Sequence[Sequence[float]]) -> Dict[str, Any]:
    """The longest and the mean time a greenlet waited between completions.

    *completions* holds, per greenlet, the ascending times its operations
    completed, all within ``[start, end]``. A gap is the time from the start
    or a completion to the greenlet's next completion; the mean is over all
    such gaps of all greenlets. The longest also counts the time a greenlet
    was still waiting at *end*, so one that never completed waited
    ``end - start``.

    :returns: ``longest_gap``, ``mean_gap`` (``None`` if nothing completed)
        and ``gap_ratio`` = longest / mean (``None`` likewise).
    """
    if end < start:
        raise ValueError(f"gap_stats() needs end >= start (got start={start}, end={end})")
    total = 0.0
    count = 0
    longest = 0.0
    for times in completions:
        previous = start
        for moment in times:
            if not previous <= moment <= end:
                raise ValueError(
                    f"completion times must be ascending and within [{start}, {end}] "
                    f"(got {moment} after {previous})"
                )
            gap = moment - previous
            total += gap
            count += 1
            longest = max(longest, gap)
            previous = moment
        longest = max(longest, end - previous)
    mean = total / count if count else None
    ratio = longest / mean if mean else None
    return {"longest_gap": longest, "mean_gap": mean, "gap_ratio": ratio}


def ratios_within_reps(
    values: Mapping[int, float], reference: Mapping[int, float], *, higher_is_better: bool
) -> List[float]:
    """Per repetition, how many times better *values* is than *reference*.

    Both map a repetition number to a metric. Only repetitions present in
    both, with a non-zero denominator, give a ratio; a ratio above 1 means
    better: ``value / reference`` for a throughput, ``reference / value``
    for a time.
    """
    ratios = []
    for rep in sorted(set(values) & set(reference)):
        top, bottom = (
            (values[rep], reference[rep]) if higher_is_better else (reference[rep], values[rep])
        )
        if bottom:
            ratios.append(top / bottom)
    return ratios


# -- summaries and targets -----------------------------------------------------


def config_key(scenario: str, params: Mapping[str, Any]) -> Tuple[str, str]:
    """A hashable key for one configuration: the scenario and its parameters."""
    return scenario, json.dumps(params, sort_keys=True)


def _worst(metric: str, values: Sequence[float]) -> float:
    return min(values) if metric in _HIGHER_IS_BETTER else max(values)


def summarise(measurements: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One summary per configuration and pool, in scenario and pool order.

    :param measurements: ``type == "measurement"`` records; a run that failed
        has an ``error`` and no ``metrics`` and only counts in ``failed_runs``.
    """
    groups: Dict[Tuple[str, str], Dict[str, List[Mapping[str, Any]]]] = {}
    for record in measurements:
        key = config_key(record["scenario"], record["params"])
        groups.setdefault(key, {}).setdefault(record["pool"], []).append(record)
    summaries = []
    ordered = sorted(groups, key=_config_order)
    for key in ordered:
        scenario, _ = key
        by_pool = groups[key]
        primary = _PRIMARY.get(scenario)
        per_rep = {
            pool: {r["rep"]: r["metrics"][primary] for r in runs if "metrics" in r}
            for pool, runs in by_pool.items()
            if primary is not None
        }
        for pool in sorted(by_pool, key=_pool_order):
            runs = by_pool[pool]
            good = [r for r in runs if "metrics" in r]
            row: Dict[str, Any] = {
                "type": "summary",
                "scenario": scenario,
                "params": dict(runs[0]["params"]),
                "pool": pool,
                "runs": len(good),
                "failed_runs": len(runs) - len(good),
                "errors": [r["error"] for r in runs if "error" in r],
                "median": {},
                "worst": {},
                "vs": {},
            }
            for metric in sorted({m for r in good for m in r["metrics"]}):
                values = [r["metrics"][metric] for r in good]
                if values and all(_is_number(v) for v in values) and None not in values:
                    row["median"][metric] = median(values)
                    row["worst"][metric] = _worst(metric, values)
                elif values and all(isinstance(v, bool) for v in values):
                    row["median"][metric] = sum(values)  # how many runs had it
            if primary is not None:
                for reference in REFERENCES:
                    if reference == pool or reference not in per_rep or pool not in per_rep:
                        continue
                    ratios = ratios_within_reps(
                        per_rep[pool],
                        per_rep[reference],
                        higher_is_better=primary in _HIGHER_IS_BETTER,
                    )
                    if ratios:
                        row["vs"][reference] = {
                            "median": median(ratios),
                            "worst": min(ratios),
                            "per_rep": ratios,
                        }
            summaries.append(row)
    return summaries


def _config_order(key: Tuple[str, str]) -> Tuple[int, int, int, str]:
    params = json.loads(key[1])
    return (SCENARIOS.index(key[0]), params.get("n", 0), params.get("m", 0), key[1])


def _pool_order(pool: str) -> Tuple[int, str]:
    names = list(POOLS)
    return (names.index(pool) if pool in names else len(names), pool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Target:
    """A goal the issue sets for greenpool, checked on the median."""

    label: str
    scenario: str
    #: Parameters the configuration must have (a subset of its params).
    match: Mapping[str, Any]
    #: A metric name, or ``vs:<pool>`` for the speed ratio to that pool.
    metric: str
    op: str  # "<=" or ">="
    threshold: float

    def passes(self, value: float) -> bool:
        """Whether *value* meets the target."""
        return value <= self.threshold if self.op == "<=" else value >= self.threshold


#: The issue's targets for greenpool. "Far fewer connections than callers"
#: in the spike is read as at most a fifth of them.
TARGETS: Tuple[Target, ...] = (
    Target("micro: checkout+release ns", "micro", {}, "ns_per_op", "<=", 1000),
    Target("micro: speed vs redis-blocking", "micro", {}, "vs:redis-blocking", ">=", 50),
    *(
        Target(
            f"contended N={n} M={m}: vs {ref}",
            "contended",
            {"n": n, "m": m},
            f"vs:{ref}",
            ">=",
            goal,
        )
        for ref, goal in (("pinned", 0.9), ("redis-blocking", 1.8))
        for n, m in ((100, 8), (1000, 32))
    ),
    *(
        Target(f"fairness N=200 M=4: {label}", "fairness", {"n": 200, "m": 4}, metric, op, goal)
        for label, metric, op, goal in (
            ("pool timeouts", "timeouts", "<=", 0),
            ("starved greenlets", "starved", "<=", 0),
            ("Jain's index", "jain", ">=", 0.99),
            ("longest gap / mean gap", "gap_ratio", "<=", 3),
        )
    ),
    Target("spike 50 callers on 5 warm: opened", "spike", {"callers": 50}, "opened", "<=", 10),
)


def evaluate_targets(
    summaries: Iterable[Mapping[str, Any]],
    pool: str = "greenpool",
    targets: Sequence[Target] = TARGETS,
) -> List[Dict[str, Any]]:
    """Check each target against *pool*'s summary: PASS, FAIL or SKIP.

    SKIP means the configuration, the pool or the reference pool of a ratio
    was not measured (filtered out, or every run failed).
    """
    rows = []
    candidates = [s for s in summaries if s["pool"] == pool]
    for target in targets:
        measured = worst = None
        for summary in candidates:
            params = summary["params"]
            if summary["scenario"] != target.scenario:
                continue
            if any(params.get(k) != v for k, v in target.match.items()):
                continue
            if target.metric.startswith("vs:"):
                ratio = summary["vs"].get(target.metric[3:])
                if ratio is not None:
                    measured, worst = ratio["median"], ratio["worst"]
            elif target.metric in summary["median"]:
                measured = summary["median"][target.metric]
                worst = summary["worst"][target.metric]
            break
        if measured is None:
            status = "SKIP"
        else:
            status = "PASS" if target.passes(measured) else "FAIL"
        rows.append(
            {
                "type": "target",
                "label": target.label,
                "pool": pool,
                "metric": target.metric,
                "op": target.op,
                "threshold": target.threshold,
                "measured": measured,
                "worst": worst,
                "status": status,
            }
        )
    return rows


def json_line(record: Mapping[str, Any]) -> str:
    """*record* as one line of strict JSON (NaN and infinities become null)."""
    return json.dumps(_finite(record), sort_keys=False, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- the table -----------------------------------------------------------------


def _num(value: Any, digits: int = 3) -> str:
    """A number for the table: counts as integers, others to *digits* figures."""
    if value is None:
        return "-"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}"


def _fixed(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(row: Mapping[str, Any], reference: str) -> str:
    ratio = row["vs"].get(reference)
    return "-" if ratio is None else f"{ratio['median']:.2f}x"


def _grid(headings: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> List[str]:
    """Columns sized to fit; the first *left* columns left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in [headings, *rows]) for i in range(len(headings))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  " + "  ".join(parts).rstrip()

    return [line(headings), "  " + "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)]


_Cell = Callable[[Mapping[str, Any]], str]


def _med(metric: str, scale: float = 1.0, fmt: Callable[[Any], str] = _num) -> _Cell:
    def cell(row: Mapping[str, Any]) -> str:
        value = row["median"].get(metric)
        return fmt(None if value is None else value * scale)

    return cell


def _worst_cell(metric: str) -> _Cell:
    return lambda row: _num(row["worst"].get(metric))


def _vs(reference: str) -> _Cell:
    return lambda row: _ratio(row, reference)


def _param(name: str) -> _Cell:
    return lambda row: str(row["params"][name])


def _pool(row: Mapping[str, Any]) -> str:
    return str(row["pool"])


def _runs(row: Mapping[str, Any]) -> str:
    return f"{row['runs']}" + (f" ({row['failed_runs']} failed)" if row["failed_runs"] else "")


#: Per scenario: its title (from its parameters) and its columns.
_SECTIONS: Dict[str, Tuple[Callable[[Mapping[str, Any]], str], List[Tuple[str, _Cell]]]] = {
    "micro": (
        lambda p: "micro: pool.release(pool.get_connection()) in a loop, one greenlet, warm pool; "
        f"best of {p['inner_repeat']} timings per process (pinned: its lock only)",
        [("pool", _pool), ("ns/op", _med("ns_per_op")), ("worst", _worst_cell("ns_per_op")),
         ("speed vs pinned", _vs("pinned")), ("vs redis-blocking", _vs("redis-blocking")),
         ("runs", _runs)],
    ),
    "contended": (
        lambda p: f"contended: N greenlets, M connections, GET/SET of {p['value_size']}-byte values, "
        f"{p['budget']:,} commands; wait = time to get a connection (pinned: its lock)",
        [("N", _param("n")), ("M", _param("m")), ("pool", _pool), ("ops/s", _med("ops_per_s")),
         ("worst", _worst_cell("ops_per_s")), ("vs pinned", _vs("pinned")),
         ("vs redis-bl", _vs("redis-blocking")), ("wait p50 us", _med("wait_p50", 1e6)),
         ("p99 us", _med("wait_p99", 1e6)), ("max us", _med("wait_max", 1e6)),
         ("timeouts", _med("timeouts")), ("too many", _med("rejections")),
         ("conns", _med("connections")), ("jain", _med("jain", fmt=_fixed)), ("runs", _runs)],
    ),
    "fairness": (
        lambda p: f"fairness: N={p['n']} greenlets loop on GET for {p['duration']:g} s, "
        f"M={p['m']} connections, pool timeout {p['timeout']:g} s",
        [("pool", _pool), ("ops/s", _med("ops_per_s")), ("timeouts", _med("timeouts")),
         ("too many", _med("rejections")), ("starved", _med("starved")),
         ("jain", _med("jain", fmt=_fixed)), ("longest gap ms", _med("longest_gap", 1e3)),
         ("mean gap ms", _med("mean_gap", 1e3)), ("longest/mean", _med("gap_ratio")),
         ("conns", _med("connections")), ("runs", _runs)],
    ),
    "spike": (
        lambda p: f"spike: {p['callers']} callers at once, one GET each, on {p['warm']} warm "
        f"connections, max_connections {p['max_connections']}",
        [("pool", _pool), ("opened", _med("opened")), ("worst", _worst_cell("opened")),
         ("conns", _med("connections")), ("ms to serve all", _med("elapsed", 1e3)),
         ("failures", _med("failures")), ("runs", _runs)],
    ),
}  # fmt: skip


def _section(scenario: str, rows: Sequence[Mapping[str, Any]]) -> List[str]:
    title, columns = _SECTIONS[scenario]
    body = [[cell(row) for _, cell in columns] for row in rows]
    left = 3 if scenario == "contended" else 1
    return [title(rows[0]["params"]), *_grid([h for h, _ in columns], body, left)]


def _load(values: Optional[Sequence[float]]) -> str:
    return "unknown" if not values else " ".join(f"{v:.2f}" for v in values)


def render_table(
    header: Mapping[str, Any],
    summaries: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
) -> str:
    """The readable report: the environment, one section per scenario, the targets."""
    lines = [
        f"greenpool benchmark, {header.get('started_at', '')}: repeat {header.get('repeat')}"
        f"{' (quick)' if header.get('quick') else ''}, pools interleaved in each repetition, "
        "each run in a fresh monkey-patched process;",
        "  medians over repetitions; 'vs' = median of per-repetition ratios (>1: better than the reference)",
        f"  Python {header.get('python')} | redis-py {header.get('redis_py')}, parser {header.get('parser')} "
        f"(hiredis {header.get('hiredis') or 'not installed'}), RESP{header.get('protocol')} | "
        f"gevent {header.get('gevent')} | greenpool {header.get('greenpool')} "
        f"(pool.py sha1 {header.get('greenpool_pool_sha1')})",
        f"  redis-server {header.get('redis_server')} ({header.get('server')}) | "
        f"{header.get('cpu_count')} CPUs | {header.get('platform')}",
        f"  load average (1, 5, 15 min) at start {_load(header.get('load_average'))}, "
        f"at end {_load(header.get('load_average_end'))}",
    ]
    by_scenario: Dict[str, List[Mapping[str, Any]]] = {}
    for row in summaries:
        by_scenario.setdefault(row["scenario"], []).append(row)
    for scenario, rows in by_scenario.items():
        lines.append("")
        lines.extend(_section(scenario, rows))
    errors = [(r["scenario"], r["pool"], e) for r in summaries for e in r["errors"]]
    if errors:
        lines += ["", "failed runs:"]
        lines += [
            f"  {scenario} {pool}: {error.splitlines()[-1] if error else ''}"
            for scenario, pool, error in errors
        ]
    if targets:
        lines += [
            "",
            f"targets ({targets[0]['pool']}, on the median; worst repetition for information)",
        ]
        body = [
            [
                t["label"],
                f"{t['op']} {_num(t['threshold'])}",
                _num(t["measured"], 5),
                _num(t["worst"], 5),
                t["status"],
            ]
            for t in targets
        ]
        lines += _grid(["target", "goal", "median", "worst", "result"], body)
    return "\n".join(lines) + "\n"


# -- the chart -----------------------------------------------------------------


def draw_chart(summaries: Sequence[Mapping[str, Any]], path: str) -> Optional[str]:
    """Draw contended throughput and wait percentiles per pool into *path* (PNG).

    :returns: ``None`` when drawn, else why not (matplotlib missing, or no
        contended results); the caller prints it.
    """
    rows = [r for r in summaries if r["scenario"] == "contended" and r["median"]]
    if not rows:
        return f"chart skipped: --chart {path} needs results of the contended scenario"
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            f"chart skipped: --chart {path} needs matplotlib "
            "(pip install 'greenpool[chart]' or pip install matplotlib)"
        )
    cells = sorted({(r["params"]["n"], r["params"]["m"]) for r in rows})
    pools = sorted({r["pool"] for r in rows}, key=_pool_order)
    panels = [
        ("ops_per_s", "throughput (ops/s)", 1.0, False),
        ("wait_p50", "wait p50 (us)", 1e6, True),
        ("wait_p99", "wait p99 (us)", 1e6, True),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    width = 0.8 / len(pools)
    index = {(r["pool"], r["params"]["n"], r["params"]["m"]): r["median"] for r in rows}
    for axis, (metric, label, scale, log) in zip(axes, panels):
        for i, pool in enumerate(pools):
            values = [index.get((pool, n, m), {}).get(metric) for n, m in cells]
            heights = [0 if v is None else v * scale for v in values]
            axis.bar([c + i * width for c in range(len(cells))], heights, width, label=pool)
        axis.set_xticks([c + 0.4 - width / 2 for c in range(len(cells))])
        axis.set_xticklabels([f"N={n}\nM={m}" for n, m in cells])
        axis.set_title(label)
        if log:
            axis.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(pools))
    figure.suptitle("contended: N greenlets share M connections (medians)")
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None
