"""Task listings page by keyset (`paging.py`), and `show` reads only a task's newest checkpoints."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from longhaul.models import InvalidCursor, InvalidInput, TaskSpec, TaskStore
from longhaul.models.paging import Position, encode_cursor
from longhaul.models.tables import SCHEMA_VERSION

pytestmark = pytest.mark.backends("sqlite", "postgres")


def _store_tasks(store: TaskStore, count: int, clock) -> list[str]:
    """`count` tasks created one clock second apart, in groups of three that share their update time."""
    ids = []
    for index in range(count):
        task_id = f"task-{index:03d}"
        store.create_task(task_id=task_id, thread_id="t", channel="c", provider="scripted", model="m",
                          spec=TaskSpec(prompt=task_id))
        ids.append(task_id)
        if index % 3 == 2:
            clock.advance(1)
    return ids


def _all_pages(store: TaskStore, *, limit: int, order_by: str) -> list[list[str]]:
    pages, after = [], None
    while True:
        page = store.page_tasks(limit=limit, after=after, order_by=order_by)
        pages.append([task.task_id for task in page.tasks])
        after = page.next_cursor(limit)
        if after is None:
            return pages


@pytest.mark.parametrize("order_by", ["updated", "created"])
def test_paging_by_cursor_lists_every_task_once_newest_first_even_when_times_tie(clocked_store, clock, order_by):
    ids = _store_tasks(clocked_store, 10, clock)

    pages = _all_pages(clocked_store, limit=4, order_by=order_by)

    assert [len(page) for page in pages] == [4, 4, 2]
    # Ties in the time go by row id, newest first: the same order as one big page.
    assert [task_id for page in pages for task_id in page] == list(reversed(ids))
    assert [t.task_id for t in clocked_store.list_tasks(limit=100, order_by=order_by)] == list(reversed(ids))


def test_a_page_is_stable_while_newer_tasks_are_added(clocked_store, clock):
    _store_tasks(clocked_store, 6, clock)
    first = clocked_store.page_tasks(limit=3)

    clock.advance(1)
    clocked_store.create_task(task_id="newer", thread_id="t", channel="c", provider="scripted", model="m",
                              spec=TaskSpec(prompt="newer"))
    second = clocked_store.page_tasks(limit=3, after=first.next_cursor(3))

    assert [t.task_id for t in second.tasks] == ["task-002", "task-001", "task-000"]


def test_offset_still_pages_but_not_together_with_a_cursor(clocked_store, clock):
    ids = _store_tasks(clocked_store, 7, clock)
    assert [t.task_id for t in clocked_store.list_tasks(limit=3, offset=3)] == list(reversed(ids))[3:6]
    cursor = clocked_store.page_tasks(limit=3).cursors[-1]
    with pytest.raises(InvalidInput, match="offset and after"):
        clocked_store.list_tasks(limit=3, offset=3, after=cursor)


def test_an_altered_truncated_or_foreign_cursor_is_a_clear_error(clocked_store, clock):
    _store_tasks(clocked_store, 4, clock)
    cursor = clocked_store.page_tasks(limit=2).cursors[-1]
    payload, check = cursor.split(".")
    forged = encode_cursor(Position("updated", 1e12, 10**6)).split(".")[0] + "." + check  # new payload, old check
    flipped = payload[:-1] + ("A" if payload[-1] != "A" else "B") + "." + check
    for bad in (cursor[:-3], flipped, forged, "not-a-cursor", "", "a.b.c", "é.é"):
        with pytest.raises(InvalidCursor, match=r"after \(--after\).*not a cursor a task listing gave out"):
            clocked_store.page_tasks(after=bad)
    with pytest.raises(InvalidCursor, match="give the same --order-by"):
        clocked_store.page_tasks(after=cursor, order_by="created")


@pytest.mark.sqlite_only("SQLite's query plan")
def test_the_listing_reads_its_keys_from_the_index_without_sorting(store, db_path: Path):
    plans = []
    with sqlite3.connect(db_path) as db:
        for column in ("updated_at", "created_at"):
            plans.append(" ".join(row[3] for row in db.execute(
                f'EXPLAIN QUERY PLAN SELECT "id", "{column}" FROM "task" WHERE ("{column}", "id") < (?, ?) '
                f'ORDER BY "{column}" DESC, "id" DESC LIMIT 50', (1e12, 10))))
    assert "COVERING INDEX task_updated_at_id" in plans[0] and "TEMP B-TREE" not in plans[0], plans[0]
    assert "COVERING INDEX task_created_at_id" in plans[1] and "TEMP B-TREE" not in plans[1], plans[1]


@pytest.mark.sqlite_only("recreates a schema-6 SQLite file")
def test_a_schema_6_store_gets_the_listing_indexes_when_opened(db_path: Path, db_url: str):
    TaskStore(db_url).close_all()
    with sqlite3.connect(db_path) as db:
        db.execute('DROP INDEX "task_updated_at_id"')
        db.execute('DROP INDEX "task_created_at_id"')
        db.execute('UPDATE "schema_version" SET "version" = 6')

    with TaskStore(db_url) as store:
        assert store.schema_migration.from_version == 6 and store.schema_version() == SCHEMA_VERSION

    with sqlite3.connect(db_path) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"task_updated_at_id", "task_created_at_id"} <= names


def test_tasks_prints_the_next_pages_cursor_and_continues_after_it(longhaul, store):
    for index in range(3):
        store.create_task(task_id=f"cli-{index}", thread_id="t", channel="c", provider="scripted", model="m",
                          spec=TaskSpec(prompt="p"))

    first = longhaul("tasks", "--limit", "2", "--json")
    rows = json.loads(first.stdout)
    text = longhaul("tasks", "--limit", "2")
    rest = json.loads(longhaul("tasks", "--limit", "2", "--json", "--after", rows[-1]["cursor"]).stdout)

    assert [row["task_id"] for row in rows] == ["cli-2", "cli-1"]
    assert f"next page: --after {rows[-1]['cursor']}" in text.stderr
    assert [row["task_id"] for row in rest] == ["cli-0"]
    bad = longhaul("tasks", "--after", rows[-1]["cursor"][:-2])
    assert bad.returncode == 2 and "not a cursor a task listing gave out" in bad.stderr
    assert "Traceback" not in bad.stderr


# -- show ------------------------------------------------------------------------------------------------


def test_show_reads_only_the_newest_checkpoints_in_step_order_with_their_outputs(clocked_store, make_stepped_task):
    long_output = "a tool result long enough to be stored once, in its message, {}"
    task_id = make_stepped_task(steps=12, tool_output=lambda step, call: long_output.format(step))

    record = clocked_store.get(task_id, latest_checkpoints=3, histories=False)
    every = clocked_store.get(task_id)

    assert [cp.step_index for cp in record.checkpoints] == [10, 11, 12]
    assert record.checkpoints == every.checkpoints[-3:]  # outputs read back from the messages they point at
    assert record.checkpoints[-1].items[0].output == long_output.format(12)
    assert record.checkpoint_count == 12 and record.execution_history == [] and record.resumable_history == []
    assert clocked_store.get(task_id, latest_checkpoints=None, histories=False).checkpoints == every.checkpoints
    assert clocked_store.get(task_id, latest_checkpoints=0).checkpoints == []


def test_show_pages_checkpoints_with_a_default_of_ten(longhaul, clocked_store, make_stepped_task):
    task_id = make_stepped_task(steps=12)

    default = json.loads(longhaul("show", task_id, "--json").stdout)
    two = json.loads(longhaul("show", task_id, "--json", "--checkpoints", "2", "--no-histories").stdout)
    every = json.loads(longhaul("show", task_id, "--json", "--checkpoints", "all").stdout)
    text = longhaul("show", task_id, "--checkpoints", "1")
    bad = longhaul("show", task_id, "--checkpoints", "-1")

    assert [c["step_index"] for c in default["checkpoints"]] == list(range(3, 13))
    assert default["checkpoint_count"] == 12 and default["execution_history"]
    assert [c["step_index"] for c in two["checkpoints"]] == [11, 12] and two["execution_history"] == []
    assert len(every["checkpoints"]) == 12
    assert "step   12" in text.stdout and "step   11" not in text.stdout
    assert bad.returncode == 2 and "--checkpoints" in bad.stderr
