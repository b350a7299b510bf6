"""Rules of the code base that a reviewer would otherwise check by hand (see the README's Layout section)."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "hooklens").rglob("*.py"))
MAX_FUNCTION_LINES = 80


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_library_function_is_longer_than_80_lines():
    too_long = [
        f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
        for path in LIBRARY
        for fn in _functions(path)
        if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not too_long, "split these into named steps:\n" + "\n".join(too_long)


# History (which device measured what, in which results file, at which commit) belongs in docs/perf-log/;
# library comments state the rule instead.
_HISTORY = re.compile(
    r"benchmarks/results|perf-log|NOTES\.md|\w+\.log\b(?!\()|\bH[12]00\b|\bcommit [0-9a-f]{7,40}\b|\b20\d\d-\d\d-\d\d\b"
)


@pytest.mark.parametrize("suffixes", [(".py",), (".cpp", ".h")])
def test_library_comments_cite_no_results_files_device_logs_or_commits(suffixes):
    sources = [p for p in (ROOT / "hooklens").rglob("*") if p.suffix in suffixes]
    sources += [p for p in (ROOT / "csrc").rglob("*") if p.suffix in suffixes]
    assert sources
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _HISTORY.search(line)
    ]
    assert not hits, "move measurement history to docs/perf-log/:\n" + "\n".join(hits)


def test_history_pattern_catches_what_it_is_for():
    for cited in ("see benchmarks/results/x.json", "call3-bench.log", "on an H100", "at commit 5780f6b", "2026-11-22"):
        assert _HISTORY.search(cited), cited
    for rule in ("the kernels keep two pipeline stages", "hook_result [b, p, h, d]", "probs.log() * probs"):
        assert not _HISTORY.search(rule), rule


def test_kernels_layer_imports_nothing_else_from_hooklens():
    """`hooklens.kernels` is the design card's kernels layer: Triton code that the rest of hooklens calls, never
    the other way round (it stays inside the package so it cannot shadow the `kernels` package of transformers)."""
    outside = []
    for path in sorted((ROOT / "hooklens" / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            outside += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "hooklens"
                        and not n.startswith("hooklens.kernels")]
    assert not outside, outside


def test_triton_interpreter_is_switched_on_in_one_test_file():
    files = sorted(p.name for p in (ROOT / "tests").glob("*.py") if "TRITON_INTERPRET" in p.read_text()
                   and p.name != Path(__file__).name)
    assert files == ["conftest.py"]
