"""longhaul's modules import each other without a cycle, read from their source.

The graph holds every ``import``/``from ... import`` in a module, at module
level and inside functions alike (a lazy import is still a dependency), with
relative imports resolved against the importing package. A cycle means two
modules that each need the other: a part that reaches back up the ladder.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Each shipped package and the folder its source lives in (see pyproject's package-dir).
PACKAGE_DIRS = {"longhaul": ROOT / "longhaul", "longhaul.models": ROOT / "models", "longhaul.worker": ROOT / "worker"}


def module_files() -> dict[str, Path]:
    """Every longhaul module's dotted name and its source file."""
    files: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            if ".venv" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The longhaul modules `name` imports anywhere in its source (each `from pkg import mod` counted as mod)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle in `graph` as a list of modules (first repeated last), or [] when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: fully explored
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_graph_sees_lazy_relative_and_type_checking_imports() -> None:
    graph = import_graph()
    assert "longhaul.worker.redis_broker" in graph["longhaul.worker.broker"]  # inside a function, relative
    assert "longhaul.worker.context" in graph["longhaul.worker.loop"]  # relative, at module level
    assert "longhaul.worker.api" in graph["longhaul"]  # absolute, under `if TYPE_CHECKING:`
    assert "longhaul.models.errors" in graph["longhaul.worker.errors"] or "longhaul.models" in graph[
        "longhaul.worker.errors"]


def test_find_cycle_reports_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_longhauls_modules_import_each_other_without_a_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_importing_the_cli_loads_no_database_driver_broker_or_http_client():
    """`longhaul --help`, `tasks`, `show` on SQLite never need psycopg, Dramatiq, redis-py or httpx (issue 16)."""
    heavy = ["psycopg", "dramatiq", "redis", "httpx", "pydantic_settings"]
    code = ("import sys, longhaul.worker.cli; "
            f"print([name for name in {heavy!r} if name in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout


def test_sqlite_commands_that_only_read_never_import_psycopg(tmp_path: Path):
    code = ("import os, sys; os.environ['LONGHAUL_DATABASE_URL'] = sys.argv[1]\n"
            "from longhaul.worker import admin\n"
            "admin.list_tasks(); admin.store_space()\n"
            "print('psycopg' in sys.modules, 'dramatiq' in sys.modules)")
    env = {key: value for key, value in os.environ.items() if not key.startswith("LONGHAUL_")}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tasks.db")], capture_output=True, text=True,
                          check=True, timeout=60, env=env, cwd=tmp_path)
    assert done.stdout.split() == ["False", "False"], done.stdout + done.stderr
