"""One import name: longhaul installs as `longhaul` only, and a user's own `models`/`worker` never interfere.

The repository's top-level folders `models/` and `worker/` ship as
`longhaul.models` and `longhaul.worker`. Every test here runs in a folder
outside the repository, as a user's application would.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from longhaul.worker.testing import WorkerProcess, wait_until

REPO = Path(__file__).resolve().parents[1]
#: Where longhaul's own code lives (plus the code that drives it).
SOURCE_FOLDERS = ("longhaul", "models", "worker", "tests", "bench")


def _outside_env(**extra: str) -> dict[str, str]:
    """An environment with nothing pointing into the repository: only what is installed can be imported."""
    env = {key: value for key, value in os.environ.items()
           if key != "PYTHONPATH" and not key.startswith("LONGHAUL_") and key != "REDIS_URL"}
    env.update(extra)
    return env


def _bare_imports(path: Path) -> list[str]:
    """Lines of `path` that import `models` or `worker` by their folder names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] in {"models", "worker"}]
    return found


def test_nothing_imports_the_folders_by_their_own_names():
    offenders = [line for folder in SOURCE_FOLDERS for path in sorted((REPO / folder).rglob("*.py"))
                 for line in _bare_imports(path)]
    assert offenders == []


def test_the_bare_import_check_catches_a_bare_import():
    # The check above must be able to fail: a file with bare imports is reported, line by line.
    planted = REPO / "tests" / "_planted_bare_import.py"
    planted.write_text("import os\nimport models\nfrom worker.api import enqueue\nfrom longhaul import worker\n")
    try:
        assert _bare_imports(planted) == ["tests/_planted_bare_import.py:2: models",
                                          "tests/_planted_bare_import.py:3: worker.api"]
    finally:
        planted.unlink()


@pytest.mark.parametrize("name", ["models", "worker"])
def test_the_folders_cannot_be_imported_from_outside_the_repository(name, tmp_path):
    result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, env=_outside_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"No module named '{name}'" in result.stderr


def test_the_face_and_its_packages_import_from_outside_the_repository(tmp_path):
    script = ("import longhaul, longhaul.models, longhaul.worker, longhaul.worker.actors\n"
              "print(longhaul.models.TaskStore is longhaul.TaskStore)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_outside_env(
        LONGHAUL_DATABASE_URL=str(tmp_path / "tasks.db")), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_a_wheel_holds_only_the_longhaul_package(tmp_path):
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("longhaul", "models", "worker"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300,
                           env=_outside_env())
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("longhaul-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"longhaul", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    for module in ("longhaul/__init__.py", "longhaul/models/store.py", "longhaul/worker/actors.py",
                   "longhaul/worker/providers/openai.py", "longhaul/worker/tools/files.py",
                   "longhaul/py.typed", "longhaul/models/py.typed", "longhaul/worker/py.typed",
                   # The dashboard's files are package data: without them `longhaul dashboard` serves nothing.
                   "longhaul/worker/dashboard/templates/task.html", "longhaul/worker/dashboard/static/htmx.min.js",
                   "longhaul/worker/tools/ask_user.py"):
        assert module in names, module


# -- a user's application with its own models and worker modules ------------------------------------

#: What a user's application folder holds besides its script: modules named like longhaul's folders.
#: Each writes a marker when imported, so a test sees whether longhaul's processes imported them.
USER_LAYOUTS = {
    "modules": {"models.py": "MARKER = 'user models'\n", "worker.py": "MARKER = 'user worker'\n"},
    "packages": {"models/__init__.py": "MARKER = 'user models'\n", "worker/__init__.py": "MARKER = 'user worker'\n"},
}


def _user_app(folder: Path, layout: str) -> Path:
    for relative, source in USER_LAYOUTS[layout].items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("import os, pathlib\n"
                        "pathlib.Path(os.environ['USER_MODULE_LOG']).open('a').write(__name__ + '\\n')\n" + source)
    return folder


@pytest.mark.parametrize("layout", sorted(USER_LAYOUTS))
def test_a_user_script_with_its_own_models_and_worker_runs_a_task(layout, tmp_path):
    app = _user_app(tmp_path / "app", layout)
    (app / "job.py").write_text(
        "import models, worker\n"
        "assert models.MARKER == 'user models' and worker.MARKER == 'user worker'\n"
        "import longhaul\n"
        "record = longhaul.run_inline('count', steps=3)\n"
        "assert models.MARKER == 'user models' and worker.MARKER == 'user worker'\n"
        "print(record.status.value, record.last_step_index)\n")
    log = tmp_path / "imports.log"
    result = subprocess.run([sys.executable, "job.py"], cwd=app, capture_output=True, text=True, timeout=120,
                            env=_outside_env(LONGHAUL_DATABASE_URL=str(tmp_path / "tasks.db"),
                                             USER_MODULE_LOG=str(log)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["completed", "3"]
    assert sorted(log.read_text().split()) == ["models", "worker"]  # imported once each, by the script only


@pytest.mark.redis
@pytest.mark.parametrize("entry", ["longhaul worker", "dramatiq longhaul.worker.actors"])
def test_workers_started_in_a_user_folder_with_its_own_models_and_worker_run_tasks(entry, tmp_path, redis_server):
    app = _user_app(tmp_path / "app", "packages")
    log = tmp_path / "imports.log"
    env = _outside_env(LONGHAUL_DATABASE_URL=str(tmp_path / "tasks.db"), LONGHAUL_REDIS_URL=redis_server.url,
                       USER_MODULE_LOG=str(log), LONGHAUL_LOG_LEVEL="INFO")
    argv = ([sys.executable, "-c", "from longhaul.worker.cli import main; main()", "worker",
             "--processes", "1", "--threads", "2"] if entry == "longhaul worker" else None)
    worker = WorkerProcess(env, processes=1, threads=2, log_path=tmp_path / "worker.log", cwd=app, argv=argv)
    worker.start()
    try:
        enqueued = subprocess.run([sys.executable, "-c", "from longhaul.worker.cli import main; main()",
                                   "enqueue", "count", "--steps", "3", "--task-id", "user-folder"],
                                  cwd=app, env=env, capture_output=True, text=True, timeout=60)
        assert enqueued.returncode == 0, enqueued.stderr
        shown: dict[str, str] = {}

        def completed() -> bool:
            out = subprocess.run([sys.executable, "-c", "from longhaul.worker.cli import main; main()",
                                  "show", "user-folder", "--json"], cwd=app, env=env, capture_output=True,
                                 text=True, timeout=60)
            shown["out"] = out.stdout + out.stderr
            return '"status": "completed"' in out.stdout

        try:
            wait_until(completed, timeout_s=60, what="the task to complete")
        except AssertionError:
            raise AssertionError(f"{shown}\n{worker.log()}") from None
    finally:
        worker.kill()
    assert "Traceback" not in worker.log()
    assert not log.exists(), log.read_text()  # no longhaul process imported the user's modules
