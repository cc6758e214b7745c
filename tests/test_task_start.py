"""A task's start: `TaskStore.start` claims the lease and hands back the record, rendering no SQL.

A thousand tasks admitted at once spend what each start costs a thousand
times (issue 16: admission of 500 tasks/s): the start of a new task is the
claim's statements alone, each rendered once per store, and the record it
hands back is the one `get` would read.
"""

from __future__ import annotations

import subprocess
import sys

import peewee
import pytest

from longhaul.models import Claimant, LeaseBook, TaskSpec, TaskStatus, TaskStore
from longhaul.models.locked_writes import PipelinedWrite

pytestmark = pytest.mark.backends("sqlite", "postgres")

WORKER = Claimant(owner="host-a:101:aaaa", host="host-a", pid=101)
LEASE_S = 30.0
#: The claim's statements: the held token (locked), the UPDATE, and on SQLite the row read back.
MOST_STATEMENTS_PER_START = 3


def create_queued(store: TaskStore, task_id: str = "task-1", thread_id: str = "thread-1") -> None:
    assert store.create_task(task_id=task_id, thread_id=thread_id, channel="c", provider="openai", model="m",
                             spec=TaskSpec(prompt=f"prompt of {task_id}"))


@pytest.fixture
def watched(store: TaskStore, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """What the store runs from here on: each statement's text, and each peewee query rendered to SQL.

    A peewee query is rendered when it is executed (`Database.execute`) or
    asked for its SQL (`BaseQuery.sql`); SQL rendered once per store is run
    as text (`Database.execute_sql`), or on PostgreSQL read on raw psycopg
    cursors by a pipelined write (`PipelinedWrite._read`).
    """
    seen: dict[str, list[str]] = {"statements": [], "rendered": []}
    execute_sql, execute, render = store.db.execute_sql, store.db.execute, peewee.BaseQuery.sql

    def counting_execute(sql: str, params=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        if sql.split()[0].upper() not in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"):
            seen["statements"].append(sql)
        return execute_sql(sql, params, *args, **kwargs)

    def counting_render(query):  # type: ignore[no-untyped-def]
        seen["rendered"].append(type(query).__name__)
        return render(query)

    def counting_query(query, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen["rendered"].append(type(query).__name__)
        return execute(query, *args, **kwargs)

    pipelined_read = PipelinedWrite._read

    def counting_pipelined_read(write, reads):  # type: ignore[no-untyped-def]
        seen["statements"].extend(sql for sql, _params in reads)
        return pipelined_read(write, reads)

    monkeypatch.setattr(PipelinedWrite, "_read", counting_pipelined_read)
    monkeypatch.setattr(store.db, "execute_sql", counting_execute)
    monkeypatch.setattr(store.db, "execute", counting_query)
    monkeypatch.setattr(peewee.BaseQuery, "sql", counting_render)
    return seen


def test_starting_a_new_task_is_the_claim_alone_with_no_sql_rendered(store, watched):
    create_queued(store)
    watched["statements"].clear()
    watched["rendered"].clear()

    claim = store.start("task-1", WORKER, lease_s=LEASE_S)

    assert claim is not None and claim.record is not None
    assert watched["rendered"] == []
    assert 1 <= len(watched["statements"]) <= MOST_STATEMENTS_PER_START, watched["statements"]
    assert claim.record.model_dump() == store.get("task-1", checkpoints=False).model_dump()
    assert (claim.record.status, claim.record.lease.owner, claim.resumed) == (TaskStatus.RUNNING, WORKER.owner, False)


def test_a_resumed_task_starts_from_its_stored_histories(store, make_snapshot, make_update):
    store.save_snapshot(make_snapshot(TaskStatus.RUNNING))
    first = LeaseBook(store).claim("task-1", WORKER, lease_s=LEASE_S)
    assert store.record_checkpoint(make_update(1), lease_token=first.token) is True
    LeaseBook(store).release("task-1", first.token)

    claim = store.start("task-1", WORKER, lease_s=LEASE_S)

    assert claim is not None and claim.resumed
    expected = store.get("task-1", checkpoints=False)
    assert claim.record.model_dump() == expected.model_dump()
    assert expected.execution_history and expected.last_step_index == 1


def test_a_claim_carries_the_first_step_boundary_as_its_transaction_read_it(store):
    create_queued(store)
    fresh = store.start("task-1", WORKER, lease_s=LEASE_S)
    assert fresh.first_boundary == store.step_boundary("task-1") == (None, False)

    assert store.request_cancel("task-1", reason="the user gave up") is TaskStatus.RUNNING  # a running task
    store.db.execute_sql(f'UPDATE "task" SET "steering" = {store.db.param} WHERE "task_id" = {store.db.param}',
                         ('["one more thing"]', "task-1"))
    LeaseBook(store).release("task-1", fresh.token)

    resumed = store.start("task-1", WORKER, lease_s=LEASE_S)

    assert resumed.first_boundary == store.step_boundary("task-1") == ("the user gave up", True)


def test_a_claim_says_whether_its_thread_has_a_story_before_the_task(store):
    create_queued(store, "task-1")
    first = store.start("task-1", WORKER, lease_s=LEASE_S)
    assert not first.story_before  # nothing before it on its thread: the run reads no story
    store.finish("task-1", TaskStatus.FAILED, last_error="out of ideas", lease_token=first.token)
    create_queued(store, "task-2")
    create_queued(store, "task-3", thread_id="thread-2")

    second, elsewhere = store.start("task-2", WORKER, lease_s=LEASE_S), store.start("task-3", WORKER, lease_s=LEASE_S)

    assert second.story_before and store.thread_story("thread-1", before_task_id="task-2").turns
    assert not elsewhere.story_before and not store.thread_story("thread-2", before_task_id="task-3").turns
    store.finish("task-2", TaskStatus.COMPLETED, final_response="two", lease_token=second.token)
    store.reset_for_rerun("task-1")  # keeps its row id: task-2 finished after it, not before

    rerun = store.start("task-1", WORKER, lease_s=LEASE_S)

    assert not rerun.story_before and not store.thread_story("thread-1", before_task_id="task-1").turns


def test_a_start_refused_by_a_live_lease_claims_nothing(store):
    create_queued(store)
    held = store.start("task-1", WORKER, lease_s=LEASE_S)

    assert store.start("task-1", WORKER, lease_s=LEASE_S) is None
    stolen = store.start("task-1", WORKER, lease_s=LEASE_S, steal_token=held.token)
    assert stolen is not None and stolen.took_over and stolen.token != held.token


def test_a_start_keeps_the_thread_rule(store):
    create_queued(store, "task-1")
    create_queued(store, "task-2")

    assert store.start("task-2", WORKER, lease_s=LEASE_S) is None  # task-1 arrived first on the thread
    assert store.start("task-1", WORKER, lease_s=LEASE_S) is not None


def test_a_record_that_cannot_be_read_leaves_the_claim_for_the_run_to_fail(store):
    create_queued(store)
    store.db.execute_sql(f'UPDATE "task" SET "spec" = {store.db.param} WHERE "task_id" = {store.db.param}',
                         ("{not json", "task-1"))

    claim = store.start("task-1", WORKER, lease_s=LEASE_S)

    assert claim is not None and claim.record is None  # the run's own `get` raises CorruptRecord and fails it
    assert LeaseBook(store).holds("task-1", claim.token)


def test_the_thread_story_a_new_task_reads_renders_no_sql(store, watched):
    create_queued(store, "task-1")
    claim = store.start("task-1", WORKER, lease_s=LEASE_S)
    store.finish("task-1", TaskStatus.COMPLETED, final_response="answer one", lease_token=claim.token)
    create_queued(store, "task-2")
    watched["rendered"].clear()

    story = store.thread_story("thread-1", before_task_id="task-2")

    assert watched["rendered"] == []
    assert [m.content for m in story.turns] == ["prompt of task-1", "answer one"]


@pytest.mark.sqlite_only("a check of the statement helper, not of a backend")
def test_a_prepared_statement_refuses_a_slot_that_did_not_render(store):
    from longhaul.models.statements import prepare

    Task = store.tables.Task

    with pytest.raises(ValueError, match="slot"):
        prepare(lambda slot: (slot("unused", str), Task.select().where(Task.task_id == "fixed"))[1])


@pytest.mark.sqlite_only("recovery's batching is the same on both backends")
def test_recovery_resends_the_tasks_of_a_dead_process_in_one_batch(make_runtime, monkeypatch):
    from longhaul.worker.identity import process_started_at
    from longhaul.worker.recovery import resend_interrupted

    rt = make_runtime()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    gone = Claimant(owner=f"{rt.claimant.host}:dead", host=rt.claimant.host, pid=int(dead.stdout),
                    pid_started_at=process_started_at(rt.claimant.pid))
    for index in range(5):
        create_queued(rt.store, f"task-{index}", thread_id=f"thread-{index}")
        assert rt.store.start(f"task-{index}", gone, lease_s=LEASE_S) is not None
    batches: list[list[str]] = []
    send_many = rt.send_many
    monkeypatch.setattr(rt, "send", lambda task_id: pytest.fail("recovery sent a task on its own"))
    monkeypatch.setattr(rt, "send_many", lambda task_ids: (batches.append(list(task_ids)), send_many(task_ids)))

    resent = resend_interrupted(rt)

    assert sorted(resent) == [f"task-{index}" for index in range(5)]
    assert [sorted(batch) for batch in batches] == [sorted(resent)]
    assert rt.broker.queues[rt.settings.queue_name].qsize() == 5
    assert all(rt.leases.holder(task_id).delivery_due_at is not None for task_id in resent)
