"""ruff over the repository and mypy (strict) over services/, run as part of the suite so CI enforces them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "ruff", "check", "services", "tests"],
    [sys.executable, "-m", "mypy"],
], ids=["ruff", "mypy-strict"])
def test_static_check_is_clean(command: list[str]) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command[2:])} found problems:\n{done.stdout}\n{done.stderr}"


CORE = ROOT / "services" / "consent_ledger" / "core"
IO_MODULES = {"asyncpg", "aiokafka", "faust", "fastavro", "os", "time", "socket", "subprocess", "pathlib", "io"}


def imported_modules(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_imports_nothing_but_the_core_and_the_standard_library() -> None:
    """The pure core has no I/O: no adapters, apps, settings, drivers, clock or environment."""
    problems = []
    for module in sorted(CORE.glob("*.py")):
        source = module.read_text()
        for name in sorted(imported_modules(source)):
            outside_core = name.startswith("consent_ledger") and not name.startswith("consent_ledger.core")
            if outside_core or name.split(".")[0] in IO_MODULES:
                problems.append(f"{module.name} imports {name}")
        if ".now(" in source or "utcnow(" in source:
            problems.append(f"{module.name} reads the clock")
    assert not problems, "the core must stay pure:\n" + "\n".join(problems)


def test_the_core_check_can_fail() -> None:
    assert "os" in imported_modules("import os\nfrom consent_ledger.adapters import x")
    assert "consent_ledger.adapters" in imported_modules("from consent_ledger.adapters import x")
