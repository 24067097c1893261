"""The size limits of issue #18, kept: no module over 500 lines, no class over 250, no
function over 80, outside tests and benchmarks (the layer contracts are `lint-imports`)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("streams", "processors", "sinks", "schemas", "loadcast")
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 500, 250, 80


def oversized() -> list[str]:
    found = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            text = path.read_text()
            rel = path.relative_to(REPO).as_posix()
            if (n := len(text.splitlines())) > MAX_MODULE:
                found.append(f"{rel}: {n} lines (module limit {MAX_MODULE})")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef):
                    limit = MAX_CLASS
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    limit = MAX_FUNCTION
                else:
                    continue
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    found.append(f"{rel}:{node.lineno} {node.name}: {n} lines (limit {limit})")
    return found


def test_no_module_class_or_function_over_its_size_limit() -> None:
    assert oversized() == [], "split by job:\n" + "\n".join(oversized())
