"""Mutation testing of greenpool's core modules: how many planted bugs do
the tests catch?

::

    python tests/mutate.py greenpool/core.py [--tests 'tests/test_core_stateful.py ...']
                           [--jobs 2] [--limit N] [--list]

Each mutant changes one thing in one function of the module (a comparison
flipped, ``and``/``or`` swapped, a ``not`` dropped, ``+=`` turned into
``-=``, a constant changed, a statement removed, a returned value replaced
by ``None``), made on the syntax tree so every mutant is valid Python. For
each, the module in a throwaway copy of the tree is replaced and the chosen
tests run (``-x``, a time limit); a failing run kills the mutant. The score
is killed / (all - reviewed equivalent), where ``tests/mutants-reviewed.txt``
lists, with a reason each, the mutants that cannot change behaviour.

``check()`` and ``__repr__`` are not mutated: they are how tests observe,
not behaviour. The default test sets per module are in :data:`TESTS`.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Set, Tuple

REPO = Path(__file__).resolve().parent.parent
REVIEWED = REPO / "tests" / "mutants-reviewed.txt"

#: The tests run against each mutant of a module: those that exercise it.
TESTS = {
    "greenpool/core.py": [
        "tests/test_core_stateful.py", "tests/test_maintenance_plan.py", "tests/test_waiters.py",
        "tests/test_blocking.py", "tests/test_killsafe.py", "tests/test_pinned_behaviours.py",
        "tests/test_generations.py", "tests/test_maintenance.py",
    ],
    "greenpool/maintenance.py": [
        "tests/test_maintenance_plan.py", "tests/test_maintenance.py",
        "tests/test_pinned_behaviours.py", "tests/test_lifecycle_core.py",
        "tests/test_core_stateful.py",
    ],
    "greenpool/_dial.py": [
        "tests/test_killsafe.py", "tests/test_blocking.py", "tests/test_pinned_behaviours.py",
        "tests/test_generations.py", "tests/test_tls.py", "tests/test_blackhole.py",
        "tests/test_recovery.py", "tests/test_dial.py",
    ],
}

SKIPPED_FUNCTIONS = {"check", "__repr__"}

_COMPARE_SWAPS = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In,
}


@dataclass(frozen=True)
class Mutant:
    number: int
    line: int
    function: str
    what: str

    @property
    def key(self) -> str:
        """How tests/mutants-reviewed.txt names it: function, line offset, what."""
        return f"{self.function}: {self.what}"


class _Mutator(ast.NodeTransformer):
    """Visits the tree; numbers every mutation point; applies number *target*."""

    def __init__(self, target: Optional[int]) -> None:
        self.target = target
        self.count = 0
        self.points: List[Tuple[int, str, str]] = []
        self.function = "<module>"
        self.klass = ""
        self.name = ""

    def _point(self, node: ast.AST, what: str) -> bool:
        if self.function == "<module>" or self.name in SKIPPED_FUNCTIONS:
            return False
        number = self.count
        self.count += 1
        self.points.append((getattr(node, "lineno", 0), self.function, what))
        return number == self.target

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        outer, self.klass = self.klass, node.name
        self.generic_visit(node)
        self.klass = outer
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        outer = self.function
        self.function = f"{self.klass}.{node.name}" if self.klass else node.name
        self.name = node.name
        # The docstring is not code.
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            node.body = body[:1] + self._statements(body[1:])
        else:
            node.body = self._statements(body)
        for child in node.body:
            self.visit(child)
        self.function = outer
        self.name = outer.rsplit(".", 1)[-1]
        return node

    def _statements(self, statements: List[ast.stmt]) -> List[ast.stmt]:
        out = []
        for statement in statements:
            removable = isinstance(statement, (ast.Expr, ast.Assign, ast.AugAssign, ast.Delete))
            if removable and self._point(statement, f"remove `{ast.unparse(statement)[:60]}`"):
                out.append(ast.copy_location(ast.Pass(), statement))
            else:
                out.append(statement)
        return out

    def generic_visit(self, node: ast.AST) -> ast.AST:
        # Statement lists inside if/while/for/try/with bodies get removals too.
        for field in ("body", "orelse", "finalbody"):
            value = getattr(node, field, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt) \
                    and not isinstance(node, ast.FunctionDef):
                setattr(node, field, self._statements(value))
        return super().generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            swap = _COMPARE_SWAPS.get(type(op))
            if swap and self._point(node, f"{type(op).__name__}->{swap.__name__} in "
                                          f"`{ast.unparse(node)[:60]}`"):
                node.ops[i] = swap()
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        other = ast.Or if isinstance(node.op, ast.And) else ast.And
        if self._point(node, f"{type(node.op).__name__}->{other.__name__} in "
                             f"`{ast.unparse(node)[:60]}`"):
            node.op = other()
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and self._point(node, f"drop not in `{ast.unparse(node)[:60]}`"):
            return node.operand
        return node

    def _swap_sign(self, node: ast.AST) -> None:
        """``+`` <-> ``-`` in a BinOp or an AugAssign."""
        op = node.op  # type: ignore[attr-defined]
        if isinstance(op, (ast.Add, ast.Sub)):
            other = ast.Sub if isinstance(op, ast.Add) else ast.Add
            if self._point(node, f"{type(op).__name__}->{other.__name__} in "
                                 f"`{ast.unparse(node)[:60]}`"):
                node.op = other()  # type: ignore[attr-defined]

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        self._swap_sign(node)
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        self._swap_sign(node)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        if isinstance(value, bool):
            if self._point(node, f"{value}->{not value}"):
                return ast.copy_location(ast.Constant(not value), node)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if self._point(node, f"{value}->{value + 1}"):
                return ast.copy_location(ast.Constant(value + 1), node)
        return node

    def visit_Return(self, node: ast.Return) -> ast.AST:
        self.generic_visit(node)
        if node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None
        ) and self._point(node, f"return None for `{ast.unparse(node)[:60]}`"):
            node.value = ast.Constant(None)
        return node


def mutants(source: str) -> List[Mutant]:
    mutator = _Mutator(None)
    mutator.visit(ast.parse(source))
    return [Mutant(i, line, fn, what) for i, (line, fn, what) in enumerate(mutator.points)]


def mutated(source: str, number: int) -> str:
    tree = ast.parse(source)
    mutator = _Mutator(number)
    tree = mutator.visit(copy.deepcopy(tree))
    ast.fix_missing_locations(tree)
    return ast.unparse(tree)


def reviewed() -> Set[str]:
    """Keys of mutants reviewed as equivalent (``module | key  # reason``)."""
    if not REVIEWED.exists():
        return set()
    keys = set()
    for line in REVIEWED.read_text().splitlines():
        line = line.split("  # ", 1)[0].strip()
        if line and not line.startswith("#"):
            keys.add(line)
    return keys


def _copy_tree(into: Path) -> None:
    for part in ("greenpool", "tests", "setup.cfg", "tox.ini", "pyproject.toml", "setup.py"):
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, into / part, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, into / part)


def _run(module: str, source: str, mutant: Mutant, tests: List[str], timeout: float) -> bool:
    """Whether the tests kill *mutant* (run in a fresh copy of the tree)."""
    with tempfile.TemporaryDirectory(prefix="greenpool-mutant-") as tmp:
        root = Path(tmp)
        _copy_tree(root)
        (root / module).write_text(mutated(source, mutant.number))
        env = dict(os.environ, PYTHONPATH=str(root), GREENPOOL_HYPOTHESIS_EXAMPLES="300",
                   PYTHONDONTWRITEBYTECODE="1")
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                 "-p", "no:randomly", *tests],
                cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return True  # a mutant that hangs the tests is caught too
        return result.returncode != 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="e.g. greenpool/core.py")
    parser.add_argument("--tests", help="space-separated test files (default: TESTS[module])")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--limit", type=int, help="only the first N mutants")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant run")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args(argv)
    source = (REPO / args.module).read_text()
    tests = args.tests.split() if args.tests else TESTS[args.module]
    found = mutants(source)[: args.limit]
    if args.list:
        for m in found:
            print(f"{m.number:4d} line {m.line:4d} {m.key}")
        return 0
    skip = reviewed()
    todo = [m for m in found if f"{args.module} | {m.key}" not in skip]
    print(f"{args.module}: {len(found)} mutants, {len(found) - len(todo)} reviewed equivalent, "
          f"running {len(todo)} against {len(tests)} test files", flush=True)
    survivors = []
    killed = 0
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(_run, args.module, source, m, tests, args.timeout): m for m in todo}
        for future in concurrent.futures.as_completed(futures):
            m = futures[future]
            if future.result():
                killed += 1
            else:
                survivors.append(m)
                print(f"SURVIVED line {m.line}: {m.key}", flush=True)
    score = killed / len(todo) if todo else 1.0
    print(f"{args.module}: killed {killed} of {len(todo)} non-equivalent mutants "
          f"({score:.1%}); {len(survivors)} survived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
