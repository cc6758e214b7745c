"""TaskStore: snapshots, checkpoints, append-only histories, reruns, leases.

The store's contract: every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from longhaul.models import (
    ChatMessage,
    Claimant,
    LeaseBook,
    LeaseLost,
    SchemaTooNew,
    StoreUnavailable,
    TaskNotFound,
    TaskSpec,
    TaskStatus,
    TaskStore,
)
from longhaul.models.tables import SCHEMA_VERSION

pytestmark = pytest.mark.backends("sqlite", "postgres")

TERMINAL_STATUSES = [status for status in TaskStatus if status.is_terminal]
WORKER_A = Claimant(owner="host-a:101:aaaa", host="host-a", pid=101)
WORKER_B = Claimant(owner="host-b:202:bbbb", host="host-b", pid=202)
LEASE_S = 30.0


def at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc)


def messages(count: int, *, start: int = 0, size_bytes: int = 40) -> list[ChatMessage]:
    """`count` alternating user/assistant messages whose content names their position."""
    return [
        ChatMessage(role="user" if n % 2 == 0 else "assistant", content=f"m{n}:".ljust(size_bytes, "x"))
        for n in range(start, start + count)
    ]


def message_ids(task_store: TaskStore, task_id: str) -> list[int]:
    """Primary keys of a task's execution-history rows, in history order."""
    cursor = task_store.db.execute_sql(
        'SELECT m."id" FROM "message" m JOIN "task" t ON m."task_id" = t."id" '
        f'WHERE t."task_id" = {task_store.db.param} AND m."history" = 0 ORDER BY m."position"',
        (task_id,),
    )
    return [row[0] for row in cursor]


def create_queued(task_store: TaskStore, task_id: str = "task-1") -> None:
    assert task_store.create_task(task_id=task_id, thread_id="thread-1", channel="telegram",
                                  provider="openai", model="gpt-test", spec=TaskSpec(prompt="do it"))


# -- the seed's three tests ----------------------------------------------------


def test_snapshots_and_checkpoints_persist(store, db_url, make_snapshot, make_update):
    store.save_snapshot(make_snapshot(TaskStatus.RUNNING))
    store.record_checkpoint(make_update(
        1,
        new_messages=[ChatMessage.assistant("<tool_call>{}</tool_call>")],
        checkpoint_note="Validated file edit; next confirm command output.",
    ))
    store.save_snapshot(make_snapshot(TaskStatus.COMPLETED, final_response="done"))

    with TaskStore(db_url) as reopened:
        record = reopened.load_by_thread_id("thread-1")

    assert record is not None
    assert record.status is TaskStatus.COMPLETED
    assert record.checkpoint_count == 1
    assert record.final_response == "done"
    assert [m.content for m in record.resumable_history] == ["hello", "working on it"]
    assert [cp.step_index for cp in record.checkpoints] == [1]
    assert record.checkpoints[0].items[0].tool_name == "shell"
    assert "latest confirmed step" in (record.latest_checkpoint_note or "")


def test_delete_by_thread_id_returns_the_count_and_removes_checkpoints_and_messages(
    store, make_snapshot, make_update, count_rows
):
    for task_id, thread_id in (("task-1", "thread-1"), ("task-2", "thread-1"), ("other", "thread-2")):
        store.save_snapshot(make_snapshot(task_id=task_id, thread_id=thread_id))
        store.record_checkpoint(make_update(1, task_id=task_id, thread_id=thread_id))
    assert count_rows(store, "checkpoint") == 3
    assert count_rows(store, "message") == 3 * (1 + 2 + 2)  # execution + resumable + checkpoint

    assert store.delete_by_thread_id("thread-1") == 2

    assert store.load_by_thread_id("thread-1") is None
    assert store.load("task-1") is None and store.load("task-2") is None
    # Only the other thread's rows are left: the deleted tasks took theirs with them.
    assert count_rows(store, "checkpoint") == count_rows(store, "checkpoint", task_id="other") == 1
    assert count_rows(store, "message") == count_rows(store, "message", task_id="other") == 5
    assert store.load("other").checkpoint_count == 1


def test_delete_by_an_unknown_thread_deletes_nothing(store, make_snapshot, count_rows):
    store.save_snapshot(make_snapshot())
    assert store.delete_by_thread_id("no-such-thread") == 0
    assert count_rows(store, "task") == 1


@pytest.mark.parametrize("terminal", TERMINAL_STATUSES, ids=str)
def test_a_running_snapshot_over_a_terminal_task_resets_stale_checkpoints(
    store, make_snapshot, make_update, count_rows, terminal
):
    store.record_checkpoint(make_update(1, checkpoint_note="old checkpoint"))
    store.record_checkpoint(make_update(2, checkpoint_note="old checkpoint"))
    store.save_snapshot(make_snapshot(terminal, final_response="done"))
    assert store.load("task-1").completed_at is not None

    store.save_snapshot(make_snapshot(TaskStatus.RUNNING, latest_checkpoint_note="resume from fresh turn"))

    record = store.load_by_thread_id("thread-1")
    assert record.status is TaskStatus.RUNNING
    assert record.checkpoint_count == 0
    assert record.checkpoints == []
    assert count_rows(store, "checkpoint", task_id="task-1") == 0
    assert record.latest_checkpoint_note == "resume from fresh turn"
    assert record.final_response is None
    assert record.completed_at is None
    # The rerun's histories start afresh from the snapshot.
    assert [m.content for m in record.execution_history] == ["hello"]
    # ...so its step 1 is new work, not a redelivery of the old run's step 1.
    assert store.record_checkpoint(make_update(1, checkpoint_note="new run")) is True
    assert store.latest_checkpoint("task-1").checkpoint_note == "new run"


def test_a_running_snapshot_over_a_running_task_keeps_its_checkpoints(store, make_snapshot, make_update):
    store.record_checkpoint(make_update(1))
    store.save_snapshot(make_snapshot(TaskStatus.RUNNING))

    record = store.load("task-1")
    assert record.checkpoint_count == 1
    assert [cp.step_index for cp in record.checkpoints] == [1]


def test_a_terminal_snapshot_over_a_terminal_task_keeps_its_checkpoints(store, make_snapshot, make_update):
    store.record_checkpoint(make_update(1))
    store.save_snapshot(make_snapshot(TaskStatus.COMPLETED, final_response="done"))
    store.save_snapshot(make_snapshot(TaskStatus.FAILED, last_error="late failure"))

    record = store.load("task-1")
    assert record.status is TaskStatus.FAILED
    assert record.checkpoint_count == 1
    assert len(record.checkpoints) == 1


def test_a_terminal_snapshot_sets_completed_at(clocked_store, clock, make_snapshot):
    clocked_store.save_snapshot(make_snapshot(TaskStatus.RUNNING))
    assert clocked_store.load("task-1").completed_at is None

    finished_at = clock.advance(12.5)
    clocked_store.save_snapshot(make_snapshot(TaskStatus.TIMED_OUT, last_error="time limit"))

    record = clocked_store.load("task-1")
    assert record.completed_at == at(finished_at)
    assert record.updated_at == at(finished_at)
    assert record.created_at == at(finished_at - 12.5)


def test_save_snapshot_upserts_a_single_row(store, make_snapshot, count_rows):
    store.save_snapshot(make_snapshot(channel="telegram"))
    store.save_snapshot(make_snapshot(channel="slack", last_error="retrying"))

    assert count_rows(store, "task") == 1
    record = store.load("task-1")
    assert (record.channel, record.last_error) == ("slack", "retrying")


def test_record_checkpoint_creates_a_missing_record(store, make_update):
    assert store.load("task-1") is None

    assert store.record_checkpoint(make_update(1)) is True

    record = store.load("task-1")
    assert record.status is TaskStatus.RUNNING
    assert (record.thread_id, record.channel, record.provider, record.model) == (
        "thread-1", "telegram", "openai", "gpt-test")
    assert record.checkpoint_count == 1
    assert record.latest_checkpoint_note == "after step 1"
    assert [m.content for m in record.execution_history] == ["step 1", "result 1"]
    assert record.execution_history[1].tool_call_id == "call-1"
    assert record.checkpoints[0].items[0].arguments == {"command": "echo 1"}


def test_record_checkpoint_counts_steps_and_marks_the_task_running(store, make_update):
    create_queued(store)
    assert store.load("task-1").status is TaskStatus.QUEUED

    for step in (1, 2, 3):
        store.record_checkpoint(make_update(step))

    record = store.load("task-1")
    assert record.status is TaskStatus.RUNNING
    assert record.checkpoint_count == 3
    assert record.message_count == 6
    assert record.last_step_index == 3
    assert record.spec == TaskSpec(prompt="do it")


def test_a_checkpoint_without_a_note_keeps_the_previous_note(store, make_update):
    store.record_checkpoint(make_update(1, checkpoint_note="first note"))
    store.record_checkpoint(make_update(2, checkpoint_note=None))

    record = store.load("task-1")
    assert record.latest_checkpoint_note == "first note"
    assert [cp.checkpoint_note for cp in record.checkpoints] == ["first note", None]


def test_duplicate_step_is_an_idempotent_repeat(store, make_update, count_rows):
    assert store.record_checkpoint(make_update(1, checkpoint_note="first write")) is True
    before = store.load("task-1")

    redelivered = make_update(1, checkpoint_note="second write",
                              new_messages=[ChatMessage.assistant("redelivered")])
    assert store.record_checkpoint(redelivered) is False

    after = store.load("task-1")
    assert count_rows(store, "checkpoint", task_id="task-1") == 1
    assert count_rows(store, "message", task_id="task-1") == 2
    assert after.checkpoint_count == 1
    assert after.execution_history == before.execution_history
    assert after.checkpoints == before.checkpoints  # the first write wins
    assert after.latest_checkpoint_note == "first write"


def test_a_checkpoint_that_fails_midway_writes_nothing(store, make_update, count_rows, refuse_messages):
    store.record_checkpoint(make_update(1))
    before = store.load("task-1")
    # Fail the message insert, which runs after the checkpoint row is written.
    refuse_messages(store, "boom")

    # The store owns the driver's error: it leaves as a longhaul error naming the driver's class and message.
    with pytest.raises(StoreUnavailable, match="IntegrityError: injected failure"):
        store.record_checkpoint(make_update(2, new_messages=[ChatMessage.assistant("ok"),
                                                             ChatMessage.assistant("boom")]))

    assert store.load("task-1") == before
    assert count_rows(store, "checkpoint", task_id="task-1") == 1
    assert count_rows(store, "message", task_id="task-1") == 2


def test_a_rerun_that_fails_midway_keeps_the_old_checkpoints(store, make_snapshot, make_update, refuse_messages):
    store.record_checkpoint(make_update(1))
    store.save_snapshot(make_snapshot(TaskStatus.COMPLETED, final_response="done"))
    before = store.load("task-1")
    refuse_messages(store, "boom")

    with pytest.raises(StoreUnavailable, match="IntegrityError: injected failure"):
        store.save_snapshot(make_snapshot(TaskStatus.RUNNING, execution_history=[ChatMessage.user("boom")]))

    assert store.load("task-1") == before


# -- append-only history -------------------------------------------------------


def test_execution_history_is_rebuilt_in_order_across_many_checkpoints(store, make_snapshot, make_update):
    store.save_snapshot(make_snapshot(execution_history=messages(3)))
    for step in range(1, 61):
        store.record_checkpoint(make_update(step, new_messages=messages(2, start=1 + 2 * step)))

    record = store.load("task-1")
    expected = messages(3) + [m for step in range(1, 61) for m in messages(2, start=1 + 2 * step)]
    assert record.execution_history == expected
    assert record.message_count == 123
    assert [cp.step_index for cp in record.checkpoints] == list(range(1, 61))


@pytest.mark.sqlite_only("counts the rows a write changed with sqlite3's total_changes")
def test_a_longer_snapshot_history_appends_only_the_tail(store, make_snapshot):
    store.save_snapshot(make_snapshot(execution_history=messages(3)))
    first_rows = message_ids(store, "task-1")
    changes_before = store.db.connection().total_changes

    store.save_snapshot(make_snapshot(execution_history=messages(5)))

    # Two new message rows plus the task row; the three stored rows are untouched.
    assert store.db.connection().total_changes - changes_before == 2 + 1
    assert message_ids(store, "task-1")[:3] == first_rows
    assert store.load("task-1").execution_history == messages(5)


def test_a_shorter_snapshot_history_replaces_the_stored_one(store, make_snapshot, count_rows):
    store.save_snapshot(make_snapshot(execution_history=messages(5)))

    replacement = [ChatMessage.user("start over"), ChatMessage.assistant("ok")]
    store.save_snapshot(make_snapshot(execution_history=replacement))

    record = store.load("task-1")
    assert record.execution_history == replacement
    assert record.message_count == 2
    assert count_rows(store, "message", task_id="task-1") == 2 + 2  # execution + resumable


@pytest.mark.sqlite_only("counts rows changed and statements run with sqlite3's total_changes and trace callback")
def test_a_checkpoint_writes_only_what_is_new_whatever_the_history_length(store, make_update):
    def cost_of_next_checkpoint(task_id: str, prior_messages: int) -> tuple[int, int]:
        """(rows changed, SQL statements run) by one checkpoint adding 2 messages."""
        store.record_checkpoint(make_update(1, task_id=task_id, new_messages=messages(prior_messages)))
        connection = store.db.connection()
        statements: list[str] = []
        connection.set_trace_callback(statements.append)
        changes_before = connection.total_changes
        try:
            store.record_checkpoint(make_update(2, task_id=task_id, new_messages=messages(2, start=prior_messages)))
        finally:
            connection.set_trace_callback(None)
        assert store.load(task_id).message_count == prior_messages + 2
        return connection.total_changes - changes_before, len(statements)

    short_changes, short_statements = cost_of_next_checkpoint("short", 10)
    long_changes, long_statements = cost_of_next_checkpoint("long", 5_000)

    # 2 new messages + 1 checkpoint + 1 task row update: never a rewrite of the history.
    assert short_changes == long_changes == 2 + 1 + 1
    assert short_statements == long_statements


# -- reads ---------------------------------------------------------------------


def test_loading_an_unknown_task_gives_none_and_get_raises_task_not_found(store):
    assert store.load("nope") is None
    with pytest.raises(TaskNotFound) as raised:
        store.get("nope")
    assert raised.value.task_id == "nope"


def test_load_by_thread_id_returns_the_most_recently_updated_task(clocked_store, clock, make_snapshot,
                                                                   make_update):
    clocked_store.save_snapshot(make_snapshot(task_id="older"))
    clock.advance(1)
    clocked_store.save_snapshot(make_snapshot(task_id="newer"))
    clock.advance(1)
    clocked_store.save_snapshot(make_snapshot(task_id="elsewhere", thread_id="thread-2"))
    assert clocked_store.load_by_thread_id("thread-1").task_id == "newer"

    clock.advance(1)
    clocked_store.record_checkpoint(make_update(1, task_id="older"))

    assert clocked_store.load_by_thread_id("thread-1").task_id == "older"
    assert clocked_store.load_by_thread_id("thread-2").task_id == "elsewhere"
    assert clocked_store.load_by_thread_id("thread-3") is None


def test_load_by_thread_id_can_exclude_the_asking_task(clocked_store, clock, make_snapshot):
    clocked_store.save_snapshot(make_snapshot(task_id="previous"))
    clock.advance(1)
    clocked_store.save_snapshot(make_snapshot(task_id="asking"))

    assert clocked_store.load_by_thread_id("thread-1", exclude_task_id="asking").task_id == "previous"
    assert clocked_store.load_by_thread_id("thread-1", exclude_task_id="previous").task_id == "asking"


@pytest.fixture
def listed_store(clocked_store, clock, make_snapshot):
    """Five tasks, one second apart: t0..t4 over two threads and three statuses."""
    plan = [
        ("t0", "thread-a", TaskStatus.COMPLETED),
        ("t1", "thread-b", TaskStatus.RUNNING),
        ("t2", "thread-a", TaskStatus.RUNNING),
        ("t3", "thread-b", TaskStatus.FAILED),
        ("t4", "thread-a", TaskStatus.COMPLETED),
    ]
    for task_id, thread_id, status in plan:
        clocked_store.save_snapshot(make_snapshot(status, task_id=task_id, thread_id=thread_id))
        clock.advance(1)
    return clocked_store


def ids(summaries) -> list[str]:
    return [summary.task_id for summary in summaries]


def test_list_tasks_lists_newest_first_and_filters_by_status_and_thread(listed_store):
    assert ids(listed_store.list_tasks()) == ["t4", "t3", "t2", "t1", "t0"]
    assert ids(listed_store.list_tasks(status=TaskStatus.COMPLETED)) == ["t4", "t0"]
    assert ids(listed_store.list_tasks(status="running")) == ["t2", "t1"]
    assert ids(listed_store.list_tasks(thread_id="thread-b")) == ["t3", "t1"]
    assert ids(listed_store.list_tasks(status="running", thread_id="thread-a")) == ["t2"]
    assert listed_store.list_tasks(status=TaskStatus.CANCELLED) == []
    summary = listed_store.list_tasks(thread_id="thread-b", limit=1)[0]
    assert (summary.status, summary.message_count, summary.lease) == (TaskStatus.FAILED, 1, None)


def test_list_tasks_pages_with_limit_and_offset(listed_store):
    assert ids(listed_store.list_tasks(limit=2)) == ["t4", "t3"]
    assert ids(listed_store.list_tasks(limit=2, offset=2)) == ["t2", "t1"]
    assert ids(listed_store.list_tasks(limit=2, offset=4)) == ["t0"]
    assert listed_store.list_tasks(limit=0) == []


def test_list_tasks_orders_by_update_or_by_creation(listed_store, clock, make_snapshot):
    clock.advance(1)
    listed_store.save_snapshot(make_snapshot(TaskStatus.COMPLETED, task_id="t1", thread_id="thread-b"))

    assert ids(listed_store.list_tasks(order_by="updated")) == ["t1", "t4", "t3", "t2", "t0"]
    assert ids(listed_store.list_tasks(order_by="created")) == ["t4", "t3", "t2", "t1", "t0"]


@pytest.mark.parametrize("arguments", [dict(limit=-1), dict(offset=-1), dict(order_by="name"),
                                       dict(status="paused")])
def test_list_tasks_rejects_bad_arguments(store, arguments):
    with pytest.raises(ValueError):
        store.list_tasks(**arguments)


def test_latest_checkpoint_is_the_one_with_the_highest_step_index(store, make_update):
    for step in (1, 3, 2):
        store.record_checkpoint(make_update(step))

    latest = store.latest_checkpoint("task-1")
    assert latest.step_index == 3
    assert latest.checkpoint_note == "after step 3"
    assert [cp.step_index for cp in store.load("task-1").checkpoints] == [1, 2, 3]


def test_latest_checkpoint_is_none_without_checkpoints(store, make_snapshot):
    store.save_snapshot(make_snapshot())
    assert store.latest_checkpoint("task-1") is None
    assert store.latest_checkpoint("no-such-task") is None


# -- finishing and cancelling --------------------------------------------------


def test_finish_moves_a_task_to_a_terminal_status_with_its_last_messages(clocked_store, clock, make_update):
    create_queued(clocked_store)
    claim = LeaseBook(clocked_store).claim("task-1", WORKER_A, lease_s=LEASE_S)
    clocked_store.record_checkpoint(make_update(1), lease_token=claim.token)
    finished_at = clock.advance(5)

    clocked_store.finish("task-1", TaskStatus.COMPLETED, final_response="all done",
                         new_messages=[ChatMessage.assistant("all done")],
                         resumable_messages=[ChatMessage.user("do it"), ChatMessage.assistant("all done")],
                         lease_token=claim.token)

    record = clocked_store.load("task-1")
    assert record.status is TaskStatus.COMPLETED
    assert record.final_response == "all done"
    assert record.completed_at == at(finished_at)
    assert [m.content for m in record.execution_history] == ["step 1", "result 1", "all done"]
    assert [m.content for m in record.resumable_history] == ["do it", "all done"]
    assert record.lease is None  # released
    assert record.checkpoint_count == 1
    assert clocked_store.task_end_counts() == {("completed", "openai"): 1}


def test_finish_refuses_a_status_that_is_not_terminal(store, make_update):
    store.record_checkpoint(make_update(1))
    with pytest.raises(ValueError, match="terminal"):
        store.finish("task-1", TaskStatus.RUNNING)
    assert store.load("task-1").status is TaskStatus.RUNNING


def test_finishing_an_unknown_task_raises_task_not_found(store):
    with pytest.raises(TaskNotFound):
        store.finish("nope", TaskStatus.FAILED, last_error="boom")


def test_request_cancel_cancels_a_queued_task_at_once(clocked_store, clock):
    create_queued(clocked_store)
    cancelled_at = clock.advance(3)

    assert clocked_store.request_cancel("task-1") is TaskStatus.CANCELLED

    record = clocked_store.load("task-1")
    assert record.status is TaskStatus.CANCELLED
    assert record.completed_at == at(cancelled_at)
    assert record.last_error == "cancelled before it ran"
    assert LeaseBook(clocked_store).claim("task-1", WORKER_A, lease_s=LEASE_S) is None


def test_request_cancel_of_a_leased_task_asks_its_worker_to_stop(clocked_store):
    create_queued(clocked_store)
    LeaseBook(clocked_store).claim("task-1", WORKER_A, lease_s=LEASE_S)
    assert clocked_store.is_cancel_requested("task-1") is False

    assert clocked_store.request_cancel("task-1") is TaskStatus.RUNNING

    assert clocked_store.is_cancel_requested("task-1") is True
    assert clocked_store.load("task-1").status is TaskStatus.RUNNING


def test_request_cancel_of_a_task_whose_lease_expired_cancels_it_at_once(clocked_store, clock):
    create_queued(clocked_store)
    LeaseBook(clocked_store).claim("task-1", WORKER_A, lease_s=LEASE_S)
    clock.advance(LEASE_S + 1)

    assert clocked_store.request_cancel("task-1") is TaskStatus.CANCELLED
    assert clocked_store.load("task-1").lease is None
    # Counted as it ended, though no worker wrote it (longhaul_tasks_total reads this).
    assert clocked_store.task_end_counts() == {("cancelled", "openai"): 1}


def test_request_cancel_leaves_a_finished_task_alone(store, make_snapshot):
    store.save_snapshot(make_snapshot(TaskStatus.COMPLETED, final_response="done"))
    before = store.load("task-1")

    assert store.request_cancel("task-1") is TaskStatus.COMPLETED
    assert store.load("task-1") == before
    with pytest.raises(TaskNotFound):
        store.request_cancel("nope")


def test_create_task_stores_a_queued_task_once(store):
    create_queued(store)
    assert store.create_task(task_id="task-1", thread_id="elsewhere", channel="c", provider="p",
                             model="m", spec=TaskSpec(prompt="other")) is False

    record = store.load("task-1")
    assert (record.status, record.thread_id) == (TaskStatus.QUEUED, "thread-1")
    assert store.task_spec("task-1") == TaskSpec(prompt="do it")


# -- schema --------------------------------------------------------------------


def test_schema_creation_is_idempotent(db_url, make_update, count_rows):
    with TaskStore(db_url) as first:
        first.record_checkpoint(make_update(1))
        assert first.schema_version() == SCHEMA_VERSION

    with TaskStore(db_url) as second, TaskStore(db_url) as third:
        assert second.schema_version() == third.schema_version() == SCHEMA_VERSION
        assert count_rows(second, "schema_version") == 1
        assert second.load("task-1").checkpoint_count == 1


def test_a_database_from_a_newer_longhaul_is_refused(db_url):
    with TaskStore(db_url) as current:
        current.db.execute_sql(
            f'INSERT INTO "schema_version" ("version", "applied_at") VALUES ({current.db.param}, 0)',
            (SCHEMA_VERSION + 1,))

    with pytest.raises(SchemaTooNew) as raised:
        TaskStore(db_url)
    assert (raised.value.found, raised.value.supported) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    assert "upgrade longhaul" in str(raised.value)


# -- lease fencing -------------------------------------------------------------


@pytest.fixture
def leased(clocked_store, make_update):
    """task-1 claimed by worker A, with one checkpoint; returns (store, LeaseBook, claim)."""
    create_queued(clocked_store)
    book = LeaseBook(clocked_store)
    claim = book.claim("task-1", WORKER_A, lease_s=LEASE_S)
    assert claim is not None
    assert clocked_store.record_checkpoint(make_update(1), lease_token=claim.token) is True
    return clocked_store, book, claim


@pytest.mark.sqlite_only("proves nothing was written with sqlite3's total_changes")
def test_a_checkpoint_with_a_wrong_lease_token_raises_lease_lost_and_writes_nothing(leased, make_update):
    store, _book, _claim = leased
    before = store.load("task-1")
    changes_before = store.db.connection().total_changes

    with pytest.raises(LeaseLost) as raised:
        store.record_checkpoint(make_update(2), lease_token="wrong")

    assert raised.value.task_id == "task-1"
    assert store.db.connection().total_changes == changes_before
    assert store.load("task-1") == before


def test_a_checkpoint_under_a_lease_for_a_missing_task_raises_lease_lost(store, make_update, count_rows):
    with pytest.raises(LeaseLost):
        store.record_checkpoint(make_update(1, task_id="ghost"), lease_token="any")
    assert count_rows(store, "task") == 0


@pytest.mark.parametrize("write", ["save_snapshot", "finish", "append_messages"])
def test_other_writes_with_a_wrong_lease_token_write_nothing(leased, make_snapshot, write):
    store, _book, _claim = leased
    before = store.load("task-1")
    calls = {
        "save_snapshot": lambda: store.save_snapshot(make_snapshot(TaskStatus.COMPLETED), lease_token="wrong"),
        "finish": lambda: store.finish("task-1", TaskStatus.COMPLETED, lease_token="wrong"),
        "append_messages": lambda: store.append_messages("task-1", [ChatMessage.user("x")], lease_token="wrong"),
    }

    with pytest.raises(LeaseLost):
        calls[write]()
    assert store.load("task-1") == before


def test_a_worker_whose_lease_was_taken_over_cannot_checkpoint(leased, clock, make_update):
    store, book, old = leased
    clock.advance(LEASE_S + 1)
    new = book.claim("task-1", WORKER_B, lease_s=LEASE_S)
    assert new is not None

    with pytest.raises(LeaseLost):
        store.record_checkpoint(make_update(2), lease_token=old.token)
    assert store.record_checkpoint(make_update(2), lease_token=new.token) is True
    assert store.load("task-1").checkpoint_count == 2


def test_a_checkpoint_under_a_lease_can_renew_it(leased, clock, make_update):
    store, _book, claim = leased
    renewed_until = clock.advance(10) + LEASE_S

    store.record_checkpoint(make_update(2), lease_token=claim.token, lease_expires_at=renewed_until)

    assert store.load("task-1").lease.expires_at == at(renewed_until)


def test_a_terminal_snapshot_from_the_lease_holder_releases_the_lease(leased, make_snapshot):
    store, book, claim = leased

    store.save_snapshot(make_snapshot(TaskStatus.FAILED, last_error="gave up"), lease_token=claim.token)

    record = store.load("task-1")
    assert (record.status, record.lease) == (TaskStatus.FAILED, None)
    assert not book.holds("task-1", claim.token)


def test_a_claim_is_refused_while_a_live_lease_exists(leased, clock):
    store, book, claim = leased
    clock.advance(LEASE_S - 1)

    assert book.claim("task-1", WORKER_B, lease_s=LEASE_S) is None

    lease = store.load("task-1").lease
    assert (lease.owner, lease.host, lease.pid) == (WORKER_A.owner, "host-a", 101)
    assert lease.expires_at == at(claim.expires_at)
    assert book.holds("task-1", claim.token)


def test_a_claim_succeeds_once_the_lease_expires(leased, clock):
    store, book, old = leased
    clock.advance(LEASE_S)

    new = book.claim("task-1", WORKER_B, lease_s=LEASE_S)

    assert new is not None and new.token != old.token
    assert (old.took_over, new.took_over) == (False, True)  # longhaul_lease_takeovers_total counts the second
    assert new.expires_at == clock() + LEASE_S
    assert new.resumed is True  # it had a checkpoint
    assert store.load("task-1").lease.owner == WORKER_B.owner
    assert not book.holds("task-1", old.token)


def test_a_claim_of_an_already_running_task_counts_as_a_recovery(clocked_store, clock):
    create_queued(clocked_store)
    book = LeaseBook(clocked_store)

    first = book.claim("task-1", WORKER_A, lease_s=LEASE_S)
    assert (first.recovery_count, first.resumed) == (0, False)

    clock.advance(LEASE_S + 1)
    second = book.claim("task-1", WORKER_B, lease_s=LEASE_S)
    clock.advance(LEASE_S + 1)
    third = book.claim("task-1", WORKER_A, lease_s=LEASE_S)

    assert (second.recovery_count, second.resumed) == (1, True)
    assert third.recovery_count == 2
    assert clocked_store.load("task-1").recovery_count == 2


def test_a_steal_token_takes_over_a_live_lease(leased):
    store, book, old = leased

    assert book.claim("task-1", WORKER_B, lease_s=LEASE_S, steal_token="not-the-holder") is None
    new = book.claim("task-1", WORKER_B, lease_s=LEASE_S, steal_token=old.token)

    assert new is not None
    assert store.load("task-1").lease.owner == WORKER_B.owner
    assert not book.holds("task-1", old.token)


def test_renew_extends_only_the_leases_still_held(leased, clock, make_snapshot):
    store, book, claim = leased
    store.save_snapshot(make_snapshot(TaskStatus.RUNNING, task_id="task-2"))
    other = book.claim("task-2", WORKER_B, lease_s=LEASE_S)
    now = clock.advance(20)

    assert book.renew([claim.token, "lost-token"], lease_s=LEASE_S) == 1

    assert store.load("task-1").lease.expires_at == at(now + LEASE_S)
    assert store.load("task-2").lease.expires_at == at(other.expires_at)  # not ours: untouched
    assert book.renew([claim.token, other.token], lease_s=LEASE_S) == 2
    assert book.renew([], lease_s=LEASE_S) == 0


def test_release_frees_the_task_for_an_immediate_claim(leased):
    store, book, claim = leased

    assert book.release("task-1", "not-the-holder") is False
    assert book.release("task-1", claim.token) is True

    record = store.load("task-1")
    assert (record.status, record.lease) == (TaskStatus.RUNNING, None)
    assert book.claim("task-1", WORKER_B, lease_s=LEASE_S) is not None


@pytest.mark.parametrize("terminal", TERMINAL_STATUSES, ids=str)
def test_a_finished_task_cannot_be_claimed(clocked_store, make_snapshot, terminal):
    clocked_store.save_snapshot(make_snapshot(terminal))
    book = LeaseBook(clocked_store)

    assert book.claim("task-1", WORKER_A, lease_s=LEASE_S) is None
    assert book.claim("no-such-task", WORKER_A, lease_s=LEASE_S) is None
    assert clocked_store.load("task-1").status is terminal
