"""tests/redispy_suite/run.py's deselection file: its format, sections and
categories are checked, so an entry cannot silently stop applying."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

HERE = pathlib.Path(__file__).parent / "redispy_suite"
_spec = importlib.util.spec_from_file_location("redispy_suite_run", HERE / "run.py")
assert _spec is not None and _spec.loader is not None
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


def _parse(tmp_path: pathlib.Path, text: str, swap: str = "default", server: int = 7) -> list:
    path = tmp_path / "deselected.txt"
    path.write_text(text)
    return [(e.target, e.category) for e in run.parse_deselected(str(path), swap, server)]


def test_sections_apply_by_swap_mode_and_server_version(tmp_path: pathlib.Path) -> None:
    text = (
        "tests/a.py::t  # outside: everywhere\n"
        "[swap=explicit]\n"
        "tests/b.py::t  # divergence: explicit only\n"
        "[server<7]\n"
        "tests/c.py::t  # outside: Redis 6 only\n"
        "[redis-py<5]\n"
        "tests/e.py::t  # divergence: redis-py 4 only\n"
        "[all]\n"
        "tests/d.py  # outside: everywhere again\n"
    )
    assert _parse(tmp_path, text) == [("tests/a.py::t", "outside"), ("tests/d.py", "outside")]
    assert [t for t, _ in _parse(tmp_path, text, swap="explicit")] == ["tests/a.py::t", "tests/b.py::t", "tests/d.py"]
    assert [t for t, _ in _parse(tmp_path, text, server=6)] == ["tests/a.py::t", "tests/c.py::t", "tests/d.py"]
    path = tmp_path / "deselected.txt"
    assert "tests/e.py::t" in [e.target for e in run.parse_deselected(str(path), "default", 7, 4)]


@pytest.mark.parametrize("line, message", [
    ("tests/a.py::t", "expected 'NODE-ID  # CATEGORY: reason'"),
    ("tests/a.py::t  # flaky: sometimes", "category must be one of"),
    ("[swap=sideways]", "unknown swap mode 'sideways'"),
])
def test_a_malformed_line_stops_the_run_naming_it(tmp_path: pathlib.Path, line: str, message: str) -> None:
    with pytest.raises(SystemExit, match=rf"deselected.txt:2: {message}"):
        _parse(tmp_path, f"# a comment\n{line}\n")


def test_the_committed_file_parses_with_a_reason_on_every_entry() -> None:
    """Every entry of the committed file, in every mode, has a category and a reason."""
    for swap in run.SWAPS:
        for server in (6, 7, 8):
            for client in (4, 8):
                for entry in run.parse_deselected(str(HERE / "deselected.txt"), swap, server, client):
                    assert entry.category in run.CATEGORIES and len(entry.reason) > 10, entry
