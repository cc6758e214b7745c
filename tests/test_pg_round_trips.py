"""PostgreSQL step writes in two round trips (`models/locked_writes.py`), counted from libpq's trace of the wire.

Each test holds this thread's pooled connection open around the calls, so
every statement they send goes over the one connection the trace watches.
What the pipelined transaction must keep (the lease fence, a repeated step,
a sequence clash, a refused statement, a dead connection) is tested on both
backends in test_store*.py, test_journal.py and test_database.py; here,
what only a pipeline can get wrong.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest

from longhaul.models import ChatMessage, StoreUnavailable, TaskStore, ToolCall
from longhaul.worker.testing import RoundTrips, wait_until

pytestmark = pytest.mark.backends("postgres")

#: What one step write may cost: BEGIN with the locked reads, then the writes with COMMIT.
STEP_WRITE_ROUND_TRIPS = 2


def round_trips(store: TaskStore, call: Callable[[], Any]) -> int:
    """The round trips `call` makes on this thread's connection (held open, so store calls use it)."""
    store.db.connect(reuse_if_open=True)
    with RoundTrips(store.db.connection()) as trips:
        call()
    return trips.count


def an_answer(step: int, calls: int) -> ChatMessage:
    return ChatMessage.assistant(f"step {step}", tool_calls=[ToolCall(id=f"c{step}-{n}", name="shell",
                                                                      arguments={"n": n}) for n in range(calls)])


def a_result(step: int, call: int) -> ChatMessage:
    return ChatMessage(role="tool", content=f"result {step}.{call}", tool_call_id=f"c{step}-{call}", name="shell")


def test_a_checkpoint_is_two_round_trips(store, make_update):
    store.record_checkpoint(make_update(1))  # the task exists: the common case

    assert round_trips(store, lambda: store.record_checkpoint(make_update(2))) == STEP_WRITE_ROUND_TRIPS
    assert store.summary("task-1").checkpoint_count == 2


def test_a_repeated_step_is_two_round_trips_and_writes_nothing(store, make_update, count_rows):
    store.record_checkpoint(make_update(1))
    results: list[bool] = []

    assert round_trips(store, lambda: results.append(store.record_checkpoint(make_update(1)))) <= 2
    assert results == [False]
    assert count_rows(store, "message", task_id="task-1") == 2


def test_a_journaled_step_is_two_round_trips_per_write(store, make_update):
    store.record_checkpoint(make_update(1))
    answer, first, second = an_answer(2, 2), a_result(2, 0), a_result(2, 1)
    opened: list[Any] = []

    trips = {
        "answer": round_trips(store, lambda: opened.append(store.journal_answer("task-1", 2, answer))),
        "result": round_trips(store, lambda: opened.append(store.journal_result(opened[0], 0, first))),
        "checkpoint": round_trips(store, lambda: store.complete_step(
            make_update(2, new_messages=[answer, first, second]), journal=opened[1], lease_token=None)),
    }

    assert trips == {"answer": STEP_WRITE_ROUND_TRIPS, "result": STEP_WRITE_ROUND_TRIPS,
                     "checkpoint": STEP_WRITE_ROUND_TRIPS}
    assert store.get("task-1").execution_history[-3:] == [answer, first, second]
    assert store.open_step("task-1") is None


def test_a_claim_is_two_round_trips_and_a_refused_one_changes_nothing(store):
    """The locked read and the UPDATE ... RETURNING go together, then the sync: four round trips before."""
    from longhaul.models import Claimant, TaskSpec

    worker, other = (Claimant(owner=f"{name}:1:x", host=name, pid=1) for name in ("host-a", "host-b"))
    assert store.create_task(task_id="queued", thread_id="t", channel="c", provider="p", model="m",
                             spec=TaskSpec(prompt="go"))
    claims: list[Any] = []

    assert round_trips(store, lambda: claims.append(store.start("queued", worker, lease_s=30))) == 2
    assert claims[0] is not None and claims[0].record.lease.owner == worker.owner and not claims[0].took_over
    assert round_trips(store, lambda: claims.append(store.start("queued", other, lease_s=30))) == 2
    assert claims[1] is None  # the live lease stands
    held = store.summary("queued")
    assert (held.status.value, held.lease.owner) == ("running", worker.owner)
    assert store.db.connection().pgconn.transaction_status == 0  # idle: the refused claim's transaction ended


def test_a_new_task_s_opening_histories_are_two_round_trips_with_their_traces(store):
    """The second write of a start (`TaskRun._open_histories`): six round trips before, statement by statement."""
    from longhaul.models import Claimant, TaskSpec
    from longhaul.models.traces import TraceWriter

    assert store.create_task(task_id="new", thread_id="t", channel="c", provider="p", model="m",
                             spec=TaskSpec(prompt="go"))
    claim = store.start("new", Claimant(owner="host-a:1:x", host="host-a", pid=1), lease_s=30)
    tracer = TraceWriter(agent="p", model="m", job_type="agent_task", next_sequence=claim.trace_next_sequence,
                         started_at=0.0, clock=store.clock)
    tracer.emit("session_started", {"prompt": "go"})
    opening = [ChatMessage.system("be brief"), ChatMessage.user("go")]

    assert round_trips(store, lambda: store.append_histories(
        "new", execution=opening, resumable=opening[1:], lease_token=claim.token, traces=tracer.take())) == 2
    record = store.get("new")
    assert (record.execution_history, record.resumable_history) == (opening, opening[1:])
    assert [event.event_type for event in store.traces("new")] == ["session_started"]
    assert store.db.connection().pgconn.transaction_status == 0  # committed by the sync, nothing left open


def test_a_call_borrowing_its_connection_from_the_pool_sends_no_ping(store, make_update):
    store.record_checkpoint(make_update(1))
    store.db.connect(reuse_if_open=True)
    conn = store.db.connection()
    store.db.close()  # back to the pool: the calls below borrow it (the only one there) and give it back

    with RoundTrips(conn) as trips:
        store.summary("task-1")
        store.record_checkpoint(make_update(2))

    assert trips.count == 1 + STEP_WRITE_ROUND_TRIPS  # a SELECT 1 at each checkout was a round trip per call
    assert store.db.is_closed()  # given back


def test_a_refused_write_rolls_back_and_leaves_the_connection_idle(store, make_update, refuse_messages):
    store.record_checkpoint(make_update(1))
    refuse_messages(store, "boom")
    store.db.connect(reuse_if_open=True)
    conn = store.db.connection()

    # The trigger fails the message insert, which is only answered at the commit's sync.
    with pytest.raises(StoreUnavailable, match="IntegrityError: injected failure"):
        store.record_checkpoint(make_update(2, new_messages=[ChatMessage.assistant("boom")]))

    from psycopg.pq import PipelineStatus, TransactionStatus

    assert conn.pgconn.transaction_status == TransactionStatus.IDLE  # rolled back, not left aborted
    assert conn.pgconn.pipeline_status == PipelineStatus.OFF
    assert not store.db.in_transaction()
    assert store.db.connection() is conn  # kept, usable: the next write goes through it
    assert store.record_checkpoint(make_update(2)) is True
    assert store.summary("task-1").checkpoint_count == 2


def test_a_step_committed_while_its_repeat_waited_for_the_row_lock_is_found(store, db_url, make_update, count_rows):
    # Another writer holds the task row locked and stores step 2; the repeat, waiting on the lock, must then
    # see that step. A check inside the locking statement would not: it reads the snapshot from before the wait.
    import psycopg

    store.record_checkpoint(make_update(1))
    results: list[bool] = []
    with psycopg.connect(db_url, autocommit=True) as other:
        other.execute("BEGIN")
        other.execute('SELECT 1 FROM "task" WHERE "task_id" = %s FOR UPDATE', ("task-1",))
        repeat = threading.Thread(target=lambda: results.append(store.record_checkpoint(make_update(2))))
        repeat.start()
        wait_until(lambda: _waiting_for_a_lock(other), timeout_s=30, what="the repeat to wait for the row lock")
        other.execute('INSERT INTO "checkpoint" ("task_id", "step_index", "checkpoint_note", "items", "created_at") '
                      'SELECT "id", 2, %s, %s, 0 FROM "task" WHERE "task_id" = %s', ("the other's", "[]", "task-1"))
        other.execute("COMMIT")
        repeat.join(timeout=30)

    assert results == [False]  # a repeat: a no-op, its messages not written
    assert count_rows(store, "checkpoint", task_id="task-1") == 2
    assert count_rows(store, "message", task_id="task-1") == 2


def _waiting_for_a_lock(conn: Any) -> bool:
    (count,) = conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND datname = current_database()").fetchone()
    return int(count) > 0


# -- what the pipelined write may never lose: the fence, the repeat, a refusal after a write sent early ---------


def _lease(store: TaskStore, token: str) -> None:
    """Give task-1 a lease held by `token` (as a claim would), for the fenced writes below."""
    store.db.execute_sql('UPDATE "task" SET "lease_token" = %s, "lease_expires_at" = %s WHERE "task_id" = %s',
                         (token, 4_000_000_000.0, "task-1"))


def _stored(store: TaskStore, count_rows: Callable[..., int]) -> tuple[Any, ...]:
    """Everything a step write could change: its rows, and the task row's counters and times."""
    row = store.db.execute_sql(
        'SELECT "checkpoint_count", "execution_count", "turn_count", "trace_next_sequence", "updated_at", '
        '"lease_expires_at" FROM "task" WHERE "task_id" = %s', ("task-1",)).fetchone()
    return (*row, *(count_rows(store, table, task_id="task-1") for table in ("checkpoint", "message", "trace_batch")))


def _assert_connection_idle(store: TaskStore) -> None:
    from psycopg.pq import PipelineStatus, TransactionStatus

    conn = store.db.connection()
    assert (conn.pgconn.transaction_status, conn.pgconn.pipeline_status) == (TransactionStatus.IDLE,
                                                                             PipelineStatus.OFF)
    assert not store.db.in_transaction()


def test_step_writes_under_a_lost_lease_are_refused_and_write_nothing(store, make_update, count_rows):
    # The writes are held until the sync that commits them: a refusal decided on the reads must send none.
    from longhaul.models import LeaseLost

    store.record_checkpoint(make_update(1))
    _lease(store, "held")
    opened = store.journal_answer("task-1", 2, an_answer(2, 1), lease_token="held")
    before = _stored(store, count_rows)

    refused = {
        "checkpoint": lambda: store.record_checkpoint(make_update(3), lease_token="stale", lease_s=60),
        "answer": lambda: store.journal_answer("task-1", 3, an_answer(3, 1), lease_token="stale", lease_s=60),
        "result": lambda: store.journal_result(opened, 0, a_result(2, 0), lease_token="stale"),
    }
    for write, call in refused.items():
        store.db.connect(reuse_if_open=True)
        with pytest.raises(LeaseLost):
            call()
        _assert_connection_idle(store)
        assert _stored(store, count_rows) == before, write

    assert store.journal_result(opened, 0, a_result(2, 0), lease_token="held").is_complete  # the holder still can


def test_a_repeated_step_changes_nothing_on_the_task_row(store, make_update, count_rows):
    store.record_checkpoint(make_update(1))
    _lease(store, "held")
    before = _stored(store, count_rows)

    assert store.record_checkpoint(make_update(1), lease_token="held", lease_s=60) is False

    assert _stored(store, count_rows) == before  # not even the lease renewal: a no-op
    _assert_connection_idle(store)


def test_a_new_task_whose_checkpoint_is_refused_after_its_row_was_written_is_not_created(
        store, make_update, count_rows, monkeypatch):
    # A missing task's row is written ahead of the decisions (`LockedWrite.execute_now`); a refusal after it
    # must roll it back, not leave it for the commit's sync.
    from longhaul.models import TraceSequenceClash
    from longhaul.models.trace_store import TraceStore

    def clash(task_id: str, traces: Any, next_sequence: int) -> None:
        raise TraceSequenceClash(task_id, 0, next_sequence)

    monkeypatch.setattr(TraceStore, "check_sequence", staticmethod(clash))
    store.db.connect(reuse_if_open=True)

    with pytest.raises(TraceSequenceClash):
        store.record_checkpoint(make_update(1))

    _assert_connection_idle(store)
    assert count_rows(store, "task") == 0
    monkeypatch.undo()
    assert store.record_checkpoint(make_update(1)) is True  # and the task is created when nothing refuses
    assert count_rows(store, "task") == 1


# -- a lease holder's step writes after its first: one round trip, fenced on what its row holds -----------------

HELD = dict(lease_token="held", lease_s=60)


def _a_step(store: TaskStore, index: int, *, calls: int = 1, traces: Any = None) -> tuple[Any, Any]:
    """Step `index` as the step loop writes it under the lease "held": the answer, then the checkpoint."""
    answer = an_answer(index, calls)
    opened = store.journal_answer("task-1", index, answer, **HELD)
    results = [a_result(index, call) for call in range(calls)]
    update = make_update_for(index, [answer, *results])
    return opened, store.complete_step(update, journal=opened, traces=traces, **HELD)


def make_update_for(index: int, messages: list[ChatMessage]) -> Any:
    from longhaul.models import CheckpointUpdate

    return CheckpointUpdate(task_id="task-1", thread_id="thread-1", channel="cli", provider="scripted", model="m",
                            step_index=index, new_messages=messages, checkpoint_note=f"after step {index}")


@pytest.fixture
def leased(store, make_update):
    """task-1 with one stored step, leased to "held", and one step written under that lease (the row learnt)."""
    store.record_checkpoint(make_update(1))
    _lease(store, "held")
    _a_step(store, 2)
    return store


def _history(store: TaskStore) -> list[ChatMessage]:
    return store.get("task-1").execution_history


def _answered(store: TaskStore, index: int) -> tuple[ChatMessage, Any]:
    """Step `index`'s answer (one tool call), journaled under the lease "held": the answer and its open step."""
    answer = an_answer(index, 1)
    return answer, store.journal_answer("task-1", index, answer, **HELD)


def _assert_nothing_written_since(store: TaskStore, count_rows: Callable[..., int], before: tuple[Any, ...]) -> None:
    assert _stored(store, count_rows) == before
    _assert_connection_idle(store)


def test_a_lease_holder_s_next_step_writes_are_one_round_trip_each(leased):
    store = leased
    answer = an_answer(3, 1)
    opened: list[Any] = []

    trips = {
        "answer": round_trips(store, lambda: opened.append(store.journal_answer("task-1", 3, answer, **HELD))),
        "checkpoint": round_trips(store, lambda: opened.append(store.complete_step(
            make_update_for(3, [answer, a_result(3, 0)]), journal=opened[0], **HELD))),
    }

    assert trips == {"answer": 1, "checkpoint": 1}
    assert opened[1] == (None, False)  # the step boundary came back with the write
    assert _history(store)[-4:] == [an_answer(2, 1), a_result(2, 0), answer, a_result(3, 0)]
    summary = store.summary("task-1")
    assert (summary.checkpoint_count, summary.turn_count) == (3, 3)
    assert store.open_step("task-1") is None
    _assert_connection_idle(store)


def test_a_write_by_someone_else_between_steps_fails_the_fence_and_the_step_is_written_after_it(leased, db_url):
    # Another store (another process) appends to the history: the presumed positions are taken, so the fenced
    # write must write nothing, and the locked write put the step after what the other wrote.
    store = leased
    other = TaskStore(db_url)
    try:
        other.append_histories("task-1", execution=[ChatMessage.user("from elsewhere")], lease_token="held")
    finally:
        other.close()

    answer = an_answer(3, 1)
    trips = round_trips(store, lambda: store.journal_answer("task-1", 3, answer, **HELD))

    assert trips == 1 + STEP_WRITE_ROUND_TRIPS  # the fenced statement, then the locked write
    assert _history(store)[-3:] == [a_result(2, 0), ChatMessage.user("from elsewhere"), answer]
    opened = store.open_step("task-1")
    store.complete_step(make_update_for(3, [answer, a_result(3, 0)]), journal=opened, **HELD)  # learns it again
    assert _history(store)[-1] == a_result(3, 0)
    assert round_trips(store, lambda: _a_step(store, 4)) == 2  # and presumes again from there
    assert _history(store)[-2:] == [an_answer(4, 1), a_result(4, 0)]


def test_a_lease_taken_over_between_steps_refuses_the_presumed_write_and_writes_nothing(leased, count_rows):
    from longhaul.models import LeaseLost

    store = leased
    _lease(store, "the new holder's")  # a takeover: the row's token changed behind this store's back
    before = _stored(store, count_rows)

    with pytest.raises(LeaseLost):
        _answered(store, 3)

    _assert_nothing_written_since(store, count_rows, before)


def test_a_step_stored_by_a_presumed_write_is_not_stored_twice(leased, count_rows):
    store = leased
    answer, opened = _answered(store, 3)
    update = make_update_for(3, [answer, a_result(3, 0)])
    store.complete_step(update, journal=opened, **HELD)
    before = _stored(store, count_rows)

    assert store.record_checkpoint(update, journal=opened, **HELD) is False  # the step was stored: a no-op

    _assert_nothing_written_since(store, count_rows, before)


def test_a_cancel_between_steps_comes_back_with_the_presumed_checkpoint(leased, db_url):
    # A cancel changes none of the fenced values: the fence holds, and the update returns the boundary.
    store = leased
    answer, opened = _answered(store, 3)
    other = TaskStore(db_url)
    try:
        other.request_cancel("task-1", reason="enough")
    finally:
        other.close()

    boundaries: list[Any] = []
    trips = round_trips(store, lambda: boundaries.append(store.complete_step(
        make_update_for(3, [answer, a_result(3, 0)]), journal=opened, **HELD)))

    assert (trips, boundaries) == (1, [("enough", False)])


def test_presumed_checkpoints_keep_their_trace_events_in_order(leased):
    from longhaul.models.traces import TraceWriter

    store = leased
    tracer = TraceWriter(agent="p", model="m", job_type="agent_task", next_sequence=store.next_trace_sequence("task-1"),
                         started_at=0.0, clock=store.clock)
    for index in (3, 4):
        tracer.emit("tool_output", {"step": index})  # with the answer: a trace batch row of its own
        answer = an_answer(index, 1)
        opened = store.journal_answer("task-1", index, answer, traces=tracer.take(), **HELD)
        tracer.emit("step_done", {"step": index})  # with the checkpoint: in its row
        store.complete_step(make_update_for(index, [answer, a_result(index, 0)]), journal=opened,
                            traces=tracer.take(), **HELD)

    assert [(event.event_type, event.data.get("step")) for event in store.traces("task-1")][-4:] == [
        ("tool_output", 3), ("step_done", 3), ("tool_output", 4), ("step_done", 4)]


def test_a_connection_the_server_ended_while_idle_is_not_used_for_a_presumed_write(leased, db_url):
    # The server ends the session of the pooled connection (as a restart does): the goodbye waits on its
    # socket. The next write must not send on it (its outcome would be unknown) but replace it and succeed.
    import psycopg

    store = leased
    store.db.connect(reuse_if_open=True)
    pid = store.db.connection().info.backend_pid
    store.db.close()
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    answer = an_answer(3, 1)
    opened = store.journal_answer("task-1", 3, answer, **HELD)
    store.complete_step(make_update_for(3, [answer, a_result(3, 0)]), journal=opened, **HELD)

    assert _history(store)[-2:] == [answer, a_result(3, 0)]
    store.db.connect(reuse_if_open=True)
    assert store.db.connection().info.backend_pid != pid


def test_a_task_s_end_after_its_last_checkpoint_is_two_round_trips(leased, count_rows):
    """The step loop's final answer: nine round trips before (BEGIN, the row, the open step's two reads,
    the messages, the trace, the row's update, the end's count, COMMIT)."""
    from longhaul.models import TaskStatus

    store = leased
    final = ChatMessage.assistant("all done")

    assert round_trips(store, lambda: store.finish("task-1", TaskStatus.COMPLETED, final_response="all done",
                                                   new_messages=[final], lease_token="held")) == 2

    record = store.get("task-1")
    assert (record.status, record.final_response, record.execution_history[-1]) == (
        TaskStatus.COMPLETED, "all done", final)
    assert record.lease is None
    assert store.task_end_counts()[("completed", "scripted")] == 1
    _assert_connection_idle(store)


def test_a_claimed_task_s_first_step_writes_are_one_round_trip_each(store):
    # The claim's RETURNING and the opening histories' write leave the row known: no step write reads it.
    from longhaul.models import Claimant, TaskSpec

    assert store.create_task(task_id="task-1", thread_id="thread-1", channel="cli", provider="scripted",
                             model="m", spec=TaskSpec(prompt="go"))
    claim = store.start("task-1", Claimant(owner="host-a:1:x", host="host-a", pid=1), lease_s=30)
    store.append_histories("task-1", execution=[ChatMessage.user("go")], lease_token=claim.token)
    answer = an_answer(1, 1)
    steps: list[Any] = []

    trips = {
        "answer": round_trips(store, lambda: steps.append(store.journal_answer(
            "task-1", 1, answer, lease_token=claim.token, lease_s=30))),
        "checkpoint": round_trips(store, lambda: store.complete_step(
            make_update_for(1, [answer, a_result(1, 0)]), journal=steps[0], lease_token=claim.token, lease_s=30)),
    }

    assert trips == {"answer": 1, "checkpoint": 1}
    assert store.get("task-1").execution_history == [ChatMessage.user("go"), answer, a_result(1, 0)]
    assert store.summary("task-1").checkpoint_count == 1
