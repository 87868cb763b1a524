"""Side-by-side benchmarks of greenpool and redis-py's pools under gevent.

``python -m benchmarks.bench --help`` runs them; :mod:`benchmarks.bench` is
the harness, :mod:`benchmarks.scenarios` the workloads (one configuration per
fresh, monkey-patched process) and :mod:`benchmarks.report` the statistics,
the table, the JSON lines and the chart. This package imports nothing on
import, so ``python -m benchmarks.scenarios`` can monkey-patch first.
"""
