"""Size limits of the layout (issue 17): no module in server/ or client/ over 450 lines, no function outside
bench/ and tests/ over 70 lines.

The modules and functions still over the limit are listed with their size today: the list may only shrink and
its sizes only fall, so the limits hold for everything new and every split is kept. When an entry gets under
the limit the test says to delete it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE_LINES = 450
FUNCTION_LINES = 70

# Over the limit (none left since issue 17). Never add to these.
LONG_MODULES: dict[str, int] = {}
LONG_FUNCTIONS: dict[str, int] = {}


def _module_sizes() -> dict[str, int]:
    out = {}
    for pkg in ("server", "client"):
        for p in sorted((ROOT / pkg).glob("*.py")):
            out[f"{pkg}/{p.name}"] = len(p.read_text().splitlines())
    return out


def _function_sizes() -> dict[str, int]:
    out: dict[str, int] = {}
    for pkg in ("common", "transport", "server", "client", "fedquic", "testkit"):  # all but bench/ and tests/
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    key = f"{rel}:{node.name}"
                    out[key] = max(out.get(key, 0), node.end_lineno - node.lineno + 1)  # type: ignore[operator]
    return out


def _check(sizes: dict[str, int], limit: int, known: dict[str, int], what: str) -> None:
    over = {k: n for k, n in sizes.items() if n > limit}
    new = {k: n for k, n in over.items() if k not in known}
    grown = {k: (known[k], n) for k, n in over.items() if k in known and n > known[k]}
    fixed = sorted(k for k in known if sizes.get(k, 0) <= limit)
    assert not new, f"{what} over {limit} lines: {new}"
    assert not grown, f"{what} that grew past their recorded size (recorded, now): {grown}"
    assert not fixed, f"now within {limit} lines, delete from the list in {__file__}: {fixed}"


def test_modules_within_450_lines() -> None:
    _check(_module_sizes(), MODULE_LINES, LONG_MODULES, "modules in server/ and client/")


def test_functions_within_70_lines() -> None:
    _check(_function_sizes(), FUNCTION_LINES, LONG_FUNCTIONS, "functions")
