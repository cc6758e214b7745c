"""`prune` gives SQLite's freed pages back to the disk; `vacuum` converts an older file once (`space.py`)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from longhaul.models import TaskSpec, TaskStore

#: Big enough that 40 tasks fill about a megabyte: what is freed is plain in the file's size.
_PROMPT = "x" * 20_000


def _finished_tasks(store: TaskStore, count: int) -> None:
    for index in range(count):
        store.create_task(task_id=f"task-{index:03d}", thread_id="t", channel="c", provider="scripted", model="m",
                          spec=TaskSpec(prompt=_PROMPT))
    store.db.execute_sql("UPDATE \"task\" SET \"status\" = 'completed', \"completed_at\" = \"updated_at\"")


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def _old_file(path: Path) -> None:
    """A store file as longhaul made them before incremental auto-vacuum: auto_vacuum=NONE, then the schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA auto_vacuum = NONE")
        db.execute("CREATE TABLE placeholder (x)")  # the mode is fixed once a table exists
        db.execute("DROP TABLE placeholder")


def test_pruning_most_tasks_shrinks_the_sqlite_file(store, db_path: Path):
    _finished_tasks(store, 40)
    before = _file_bytes(db_path)

    deleted = store.prune(max_tasks=4)

    assert len(deleted) == 36
    assert _file_bytes(db_path) < before / 4, (before, _file_bytes(db_path))
    space = store.space()
    assert space.auto_vacuum == "incremental" and space.free_bytes == 0


def test_an_older_file_keeps_its_size_until_vacuumed_once_then_every_prune_shrinks_it(db_path: Path, db_url: str):
    _old_file(db_path)
    with TaskStore(db_url) as store:
        _finished_tasks(store, 40)
        store.prune(max_tasks=30)
        kept = store.space()
        assert kept.auto_vacuum == "none" and kept.free_bytes > 0

        vacuumed = store.vacuum()
        assert vacuumed.auto_vacuum == "incremental" and vacuumed.total_bytes < kept.total_bytes

        before = _file_bytes(db_path)
        store.prune(max_tasks=2)
        assert _file_bytes(db_path) < before * 0.4, (before, _file_bytes(db_path))


def test_longhaul_vacuum_and_prune_say_what_they_did(longhaul, db_path: Path, db_url: str):
    _old_file(db_path)
    with TaskStore(db_url) as store:
        _finished_tasks(store, 20)

    pruned = longhaul("prune", "--max-tasks", "2")
    vacuumed = longhaul("vacuum", "--json")

    assert pruned.returncode == 0, pruned.stderr
    assert "run `longhaul vacuum` once" in pruned.stderr
    report = json.loads(vacuumed.stdout)
    assert report["backend"] == "sqlite" and report["auto_vacuum"] == "incremental"
    assert report["after_bytes"] < report["before_bytes"]


@pytest.mark.backends("postgres")
def test_vacuum_on_postgresql_runs_and_reports_the_tables_size(store):
    _finished_tasks(store, 5)
    store.prune(max_tasks=1)

    space = store.vacuum()

    assert space.backend == "postgresql" and space.total_bytes > 0 and space.free_bytes == 0
