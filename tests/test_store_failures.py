"""The store owns its failures: driver errors leave it as longhaul errors, and one lease check fences every write.

Runs on SQLite and on PostgreSQL; the lock tests hold a real writer lock
(SQLite: a second connection's ``BEGIN IMMEDIATE``; PostgreSQL: a second
session's row lock with a statement timeout on the store's side).
"""

from __future__ import annotations

import ast
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from longhaul.models import (
    ChatMessage,
    Claimant,
    InvalidInput,
    LeaseBook,
    LeaseLost,
    LeaseRow,
    LonghaulError,
    StoreUnavailable,
    TaskSpec,
    TaskStatus,
    TaskStore,
    UnstorableValue,
    Usage,
)
from longhaul.models.traces import TraceWriter
from longhaul.worker.identity import holder_is_dead, process_started_at
from longhaul.worker.testing import wait_until

pytestmark = pytest.mark.backends("sqlite", "postgres")

REPO = Path(__file__).resolve().parent.parent
WORKER = Claimant(owner="host-a:101:aaaa", host="host-a", pid=101)


@pytest.fixture
def sqlite_writer_lock(db_url: str) -> Iterator[Callable[[], None]]:
    """``hold()`` takes SQLite's write lock from a second connection until the test ends."""
    held: list[sqlite3.Connection] = []

    def hold() -> None:
        path = db_url[len("sqlite:///"):]
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        held.append(conn)

    yield hold
    for conn in held:
        conn.execute("ROLLBACK")
        conn.close()


def _queued(task_store: TaskStore, task_id: str = "task-1") -> None:
    assert task_store.create_task(task_id=task_id, thread_id="thread-1", channel="telegram", provider="openai",
                                  model="gpt-test", spec=TaskSpec(prompt="do it"))


# -- driver errors become longhaul errors ------------------------------------------


@pytest.mark.sqlite_only("holds SQLite's file lock from a second connection")
def test_a_checkpoint_behind_a_held_write_lock_is_store_unavailable_naming_the_task(
    db_url, make_update, sqlite_writer_lock
):
    with TaskStore(db_url, busy_timeout_ms=50) as task_store:
        task_store.record_checkpoint(make_update(1))
        sqlite_writer_lock()

        with pytest.raises(StoreUnavailable) as raised:
            task_store.record_checkpoint(make_update(2))

        assert raised.value.task_id == "task-1"
        assert "OperationalError: database is locked" in str(raised.value)
        assert "resumes from its latest checkpoint" in str(raised.value)
        assert isinstance(raised.value, LonghaulError)


@pytest.mark.sqlite_only("holds SQLite's file lock from a second connection")
def test_lease_operations_behind_a_held_write_lock_are_store_unavailable(db_url, sqlite_writer_lock):
    with TaskStore(db_url, busy_timeout_ms=50) as task_store:
        _queued(task_store)
        sqlite_writer_lock()

        with pytest.raises(StoreUnavailable, match="database is locked") as raised:
            LeaseBook(task_store).claim("task-1", WORKER, lease_s=30)
        assert raised.value.task_id == "task-1"
        with pytest.raises(StoreUnavailable, match="database is locked") as raised:
            LeaseBook(task_store).renew(["some-token"], lease_s=30)
        assert raised.value.task_id is None
        assert "nothing was written" in str(raised.value)


def test_a_session_killed_mid_call_is_store_unavailable_and_the_next_call_works(backend, store, make_update,
                                                                                request):
    store.record_checkpoint(make_update(1))
    if backend == "postgres":
        server = request.getfixturevalue("postgres_server")
        backend_pid = store.db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
        with pytest.raises(StoreUnavailable) as raised, store.db.atomic():
            store.db.execute_sql("SELECT 1")
            server.execute(f"SELECT pg_terminate_backend({backend_pid})")  # mid-transaction: not repeated
            store.summary("task-1")
    else:
        store.db.connection().close()  # the driver's connection goes away under peewee
        with pytest.raises(StoreUnavailable) as raised:
            store.summary("task-1")

    assert raised.value.task_id == "task-1"
    store.close()
    assert store.summary("task-1").checkpoint_count == 1
    assert store.record_checkpoint(make_update(2)) is True


def test_a_number_the_backend_cannot_hold_is_invalid_input_and_writes_nothing(store, make_update):
    store.record_checkpoint(make_update(1))
    before = store.load("task-1")

    with pytest.raises(UnstorableValue) as raised:  # beyond a 64-bit integer column on either backend
        store.record_checkpoint(make_update(2), usage=Usage(input_tokens=2**64))

    assert isinstance(raised.value, InvalidInput)
    assert raised.value.task_id == "task-1"
    assert "cannot hold a value given" in str(raised.value)
    assert store.load("task-1") == before
    assert store.record_checkpoint(make_update(2), usage=Usage(input_tokens=5)) is True
    assert store.summary("task-1").usage.input_tokens == 5


# -- one lease check fences every write ----------------------------------------------


def _writes(task_store: TaskStore, make_update: Callable[..., Any], make_snapshot: Callable[..., Any],
            token: str) -> dict[str, Callable[[], object]]:
    """Every write a lease holder makes, each with `token` as its fence."""
    writer = TraceWriter(agent="openai", model="gpt-test", job_type="agent_task",
                         next_sequence=task_store.next_trace_sequence("task-1"), started_at=0.0)
    writer.emit("error", {"kind": "stale"})
    return {
        "record_checkpoint": lambda: task_store.record_checkpoint(make_update(2), lease_token=token),
        "save_snapshot": lambda: task_store.save_snapshot(make_snapshot(), lease_token=token),
        "append_messages": lambda: task_store.append_messages("task-1", [ChatMessage.user("x")], lease_token=token),
        "append_histories": lambda: task_store.append_histories("task-1", execution=[ChatMessage.user("x")],
                                                                resumable=[ChatMessage.user("x")], lease_token=token),
        "finish": lambda: task_store.finish("task-1", TaskStatus.COMPLETED, lease_token=token),
        "append_traces": lambda: task_store.append_traces("task-1", writer.take(), lease_token=token),
    }


@pytest.mark.parametrize("write", ["record_checkpoint", "save_snapshot", "append_messages", "append_histories",
                                   "finish", "append_traces"])
def test_every_fenced_write_refuses_a_token_that_lost_the_lease_and_writes_nothing(
    write, store, make_update, make_snapshot
):
    _queued(store)
    claim = LeaseBook(store).claim("task-1", WORKER, lease_s=30)
    assert claim is not None
    store.record_checkpoint(make_update(1), lease_token=claim.token)
    before = (store.load("task-1"), store.traces("task-1"))

    with pytest.raises(LeaseLost):
        _writes(store, make_update, make_snapshot, "a-token-that-never-held-it")[write]()
    assert (store.load("task-1"), store.traces("task-1")) == before

    _writes(store, make_update, make_snapshot, claim.token)[write]()  # the holder's own write goes through
    assert store.load("task-1") != before[0] or store.traces("task-1") != before[1]


def test_opening_histories_appends_both_in_one_fenced_transaction(store):
    _queued(store)
    claim = LeaseBook(store).claim("task-1", WORKER, lease_s=30)
    assert claim is not None
    turns, prompt = [ChatMessage.user("earlier"), ChatMessage.assistant("reply")], ChatMessage.user("now")

    store.append_histories("task-1", execution=[*turns, ChatMessage.system("note"), prompt],
                           resumable=[*turns, prompt], lease_token=claim.token)
    store.append_histories("task-1", execution=[ChatMessage.user("more")], lease_token=claim.token)

    record = store.get("task-1")
    assert [m.content for m in record.execution_history] == ["earlier", "reply", "note", "now", "more"]
    assert [m.content for m in record.resumable_history] == ["earlier", "reply", "now"]
    assert record.message_count == 5


# -- a rerun has its own path ----------------------------------------------------------


def test_a_rerun_queues_the_task_from_step_one_with_its_spec_and_old_traces(store, make_update):
    _queued(store)
    claim = LeaseBook(store).claim("task-1", WORKER, lease_s=30)
    assert claim is not None
    writer = TraceWriter(agent="openai", model="gpt-test", job_type="agent_task", next_sequence=0, started_at=0.0)
    writer.emit("tool_call_completed", {"step": 1, "output": "result 1 " * 10})
    store.record_checkpoint(make_update(1, new_messages=[ChatMessage(role="tool", content="result 1 " * 10)]),
                            lease_token=claim.token, traces=writer.take())
    store.finish("task-1", TaskStatus.FAILED, last_error="boom", final_response="partial", lease_token=claim.token)
    traces_before = store.traces("task-1")

    store.reset_for_rerun("task-1")

    record = store.get("task-1")
    assert record.status is TaskStatus.QUEUED
    assert (record.checkpoint_count, record.message_count, record.last_step_index) == (0, 0, 0)
    assert (record.execution_history, record.resumable_history, record.checkpoints) == ([], [], [])
    assert (record.final_response, record.last_error, record.completed_at, record.started_at) == (None,) * 4
    assert record.latest_checkpoint_note is None and record.lease is None
    assert record.spec == TaskSpec(prompt="do it")
    assert store.traces("task-1") == traces_before  # text the deleted messages held is kept in the events
    assert LeaseBook(store).claim("task-1", WORKER, lease_s=30).resumed is False  # a fresh start, not a recovery


# -- the worker side ---------------------------------------------------------------------


def test_a_lease_holder_is_dead_only_on_this_host_and_when_its_own_process_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started_at = process_started_at(child.pid)
        assert started_at is not None

        def row(**changes: Any) -> LeaseRow:
            fields: dict[str, Any] = dict(task_id="t", status=TaskStatus.RUNNING, token="tok", host="here",
                                          pid=child.pid, pid_started_at=started_at, expires_at=None,
                                          delivery_due_at=None)
            fields.update(changes)
            return LeaseRow(**fields)

        assert not holder_is_dead(row(), host="here")
        assert holder_is_dead(row(pid_started_at=started_at - 100), host="here")  # the pid was recycled
        child.kill()
        child.wait(timeout=10)
        wait_until(lambda: process_started_at(child.pid) is None, timeout_s=10, what="the killed child to be reaped")
        assert holder_is_dead(row(), host="here")
        assert not holder_is_dead(row(), host="elsewhere")  # another host's lease waits for expiry
        assert not holder_is_dead(row(token=None), host="here")  # nobody holds the lease
        assert not holder_is_dead(row(pid=None), host="here")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


def test_nothing_in_worker_imports_peewee_or_opens_a_store_transaction():
    found = []
    for path in sorted((REPO / "worker").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: import {name}" for name in names if name.split(".")[0] in ("peewee", "playhouse")]
            if isinstance(node, ast.Attribute) and node.attr in ("atomic", "transaction", "execute_sql"):
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert found == []


def test_a_read_snapshot_sees_one_state_while_another_store_commits(store, make_update, db_url):
    store.record_checkpoint(make_update(1))
    with TaskStore(db_url) as other:
        with store.read_snapshot():
            first = store.summary("task-1").checkpoint_count
            other.record_checkpoint(make_update(2))
            assert store.summary("task-1").checkpoint_count == first == 1
        assert store.summary("task-1").checkpoint_count == 2
