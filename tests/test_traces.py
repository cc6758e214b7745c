"""Trace events, usage totals, redaction, retention and the schema they need.

Loop tests run a task synchronously with `execute_task` on an embedded
runtime (no broker thread), with fake providers registered by name; the
crash test runs the real `longhaul` command and SIGKILLs it.
"""

from __future__ import annotations

import signal
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import orjson
import pytest
from dramatiq.middleware import Shutdown
from hypothesis import given, settings
from hypothesis import strategies as st
from playhouse.migrate import SchemaMigrator, migrate

from longhaul import worker
from longhaul.models import (
    ChatMessage,
    CheckpointItem,
    CheckpointUpdate,
    CorruptRecord,
    TaskNotFound,
    TaskRecord,
    TaskSnapshot,
    TaskSpec,
    TaskStatus,
    TaskStore,
    ToolCall,
    TraceSequenceClash,
    Usage,
)
from longhaul.models.migrations import _V2_TASK_COLUMNS
from longhaul.models.redact import _SECRET_KEY, _SECRET_TEXT, might_hold_secret
from longhaul.models.tables import SCHEMA_VERSION
from longhaul.models.traces import INLINE_CAPS, PendingTraces, TraceWriter
from longhaul.worker import Runtime
from longhaul.worker.execute import execute_task
from longhaul.worker.providers import AssistantTurn, PermanentProviderError, StepContext
from longhaul.worker.testing import FakeClock, wait_until
from tests.fixtures.runtimes import with_providers

# -- fake providers -----------------------------------------------------------------


def ledger_call(step: int) -> list[ToolCall]:
    return [ToolCall(id="call_0", name="ledger", arguments={"line": f"step {step}"})]


class StreamsFirstTurn:
    """Step 1 streams content, reasoning, content and calls the ledger; step 2 answers without streaming."""

    name = "streams-first-turn"

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        if ctx.step_index > 1:
            return AssistantTurn("final answer")
        for kind, chunk in [("content", "a"), ("content", "b"), ("content", "c"), ("reasoning", "r1"),
                            ("reasoning", "r2"), ("content", "d")]:
            ctx.emit(kind, {"text": chunk})
        return AssistantTurn("abcd", ledger_call(1))


class StreamsThenStops:
    """Streams two content chunks, then the worker is told to shut down mid-answer."""

    name = "streams-then-stops"

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        ctx.emit("content", {"text": "par"})
        ctx.emit("content", {"text": "tial"})
        raise Shutdown()


def usage_of(step: int) -> Usage:
    return Usage(input_tokens=100 * step, output_tokens=10 * step, cache_read_tokens=step, cache_creation_tokens=2,
                 reasoning_tokens=3 * step, request_count=1, cost_usd=0.25 * step)


class Metered:
    """Three ledger steps, then an answer; every turn reports `usage_of(step)`.

    With `stop_at`, the worker shuts down once when asked for that step (before it answers).
    """

    name = "metered"
    steps = 3
    stop_at: Optional[int] = None

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        step = ctx.step_index
        if step == type(self).stop_at:
            type(self).stop_at = None
            raise Shutdown()
        if step > self.steps:
            return AssistantTurn("metered answer", usage=usage_of(step))
        return AssistantTurn(f"step {step}", ledger_call(step), usage=usage_of(step))


API_KEY = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
BEARER_TOKEN = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ"


class Leaky:
    """Streams reasoning that holds an API key (split across two chunks) and a bearer header, then fails."""

    name = "leaky"

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        ctx.emit("reasoning", {"text": f"retrying with {API_KEY[:14]}"})
        ctx.emit("reasoning", {"text": f"{API_KEY[14:]} and Authorization: Bearer {BEARER_TOKEN}"})
        raise PermanentProviderError(
            f"401 Unauthorized: Authorization: Bearer {BEARER_TOKEN} (api_key={API_KEY}) was rejected",
            status_code=401,
        )


@pytest.fixture(autouse=True)
def fresh_fake_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Metered, "stop_at", None)


@pytest.fixture
def make_runtime(make_runtime: Callable[..., Runtime]) -> Callable[..., Runtime]:
    """This module's runtimes are handed its fake providers beside the built-in ones; nothing is registered."""
    return with_providers(make_runtime, StreamsFirstTurn, StreamsThenStops, Metered, Leaky)


# -- helpers and fixtures ---------------------------------------------------------------


@pytest.fixture
def run_here(embedded_runtime: Runtime) -> Callable[..., TaskRecord]:
    """Run a task in this thread until it ends or is interrupted (resuming it if it exists); its record."""

    def run(provider: str, *, task_id: str = "traced", prompt: str = "trace me", **options: Any) -> TaskRecord:
        try:
            embedded_runtime.store.summary(task_id)
        except TaskNotFound:
            worker.submit(embedded_runtime, prompt, task_id=task_id, provider=provider, **options)
        execute_task(embedded_runtime, task_id)
        return embedded_runtime.store.get(task_id)

    return run


@pytest.fixture
def tracer(clock: FakeClock) -> TraceWriter:
    """A writer on its own (no store): what it hands over is what a checkpoint would store."""
    return TraceWriter(agent="p", model="m", job_type="agent_task", next_sequence=0, started_at=clock(), clock=clock)


def streamed(taken: PendingTraces) -> list[tuple[str, str]]:
    """(event type, text) of each event a writer handed over."""
    return [(event_type, data.get("text")) for _recorded_at, event_type, data in taken.events]


def kinds(store: TaskStore, task_id: str) -> list[str]:
    return [event.event_type for event in store.traces(task_id)]


def checkpoints_of(store: TaskStore, task_id: str) -> int:
    try:
        return store.summary(task_id).checkpoint_count
    except TaskNotFound:
        return 0


def utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc)


# -- sequence numbers ----------------------------------------------------------------------


@pytest.mark.crash
def test_trace_sequences_stay_strictly_increasing_and_unique_across_a_sigkill_and_resume(
    longhaul, start_longhaul, store, count_rows
):
    steps = 30
    running = start_longhaul("run", "count slowly", "--task-id", "k", "--steps", str(steps),
                             "--step-delay", "0.1").proc
    wait_until(lambda: checkpoints_of(store, "k") >= 5 or running.poll() is not None, timeout_s=30,
               what="five checkpoints before the kill")
    assert running.poll() is None, "the run ended before it could be killed"

    running.send_signal(signal.SIGKILL)
    running.wait()
    before = store.traces("k")
    result = longhaul("resume", "--interrupted", "--json")

    assert result.returncode == 0, result.stderr
    traces = store.traces("k")
    sequences = [event.sequence for event in traces]
    assert sequences == sorted(set(sequences)) and sequences[0] == 0
    # A step's events ride in its checkpoint row, but those of its answer, journaled before its tool runs;
    # the start, the resume and the end have rows of their own.
    assert count_rows(store, "trace_batch", task_id="k") == 3 + steps
    assert traces[:len(before)] == before  # what the killed run stored is kept as it was
    [resumed] = [event for event in traces if event.event_type == "resumed"]
    assert resumed.sequence == before[-1].sequence + 1  # continues after the highest stored number
    assert kinds(store, "k").count("session_started") == 1
    assert sorted(e.data["step"] for e in traces if e.event_type == "checkpoint") == list(range(1, steps + 1))
    assert traces[-1].event_type == "done" and traces[-1].data["status"] == "completed"


@pytest.fixture
def stale_writer(clock: FakeClock) -> TraceWriter:
    """A writer that numbers from 0 whatever is stored: the seed's resume bug."""
    return TraceWriter(agent="scripted", model="m", job_type="agent_task", next_sequence=0, started_at=clock(),
                       clock=clock)


def test_events_numbered_before_the_stored_ones_are_refused_and_nothing_is_written(
    make_stepped_task, clocked_store, count_rows, stale_writer
):
    task_id = make_stepped_task(steps=1, finish=False)
    before = clocked_store.traces(task_id)
    stale_writer.emit("error", {"kind": "stale"})

    with pytest.raises(TraceSequenceClash, match="do not come after"):
        clocked_store.append_traces(task_id, stale_writer.take())
    assert clocked_store.traces(task_id) == before
    assert clocked_store.next_trace_sequence(task_id) == before[-1].sequence + 1


def test_a_checkpoint_with_stale_trace_numbers_is_rolled_back_whole(
    make_stepped_task, make_update, clocked_store, stale_writer
):
    task_id = make_stepped_task(steps=1, finish=False)
    before = clocked_store.get(task_id)
    stale_writer.emit("checkpoint", {"step": 2})

    with pytest.raises(TraceSequenceClash):
        clocked_store.record_checkpoint(make_update(2, task_id=task_id), traces=stale_writer.take())
    assert clocked_store.get(task_id) == before  # no checkpoint, message or counter of step 2


def test_reading_after_any_sequence_number_merges_step_and_run_events_in_order(make_stepped_task, clocked_store):
    task_id = make_stepped_task(steps=4, calls=2)  # start and end rows; steps' events in their checkpoints
    everything = clocked_store.traces(task_id)
    assert [e.sequence for e in everything] == list(range(len(everything)))
    assert (everything[0].event_type, everything[-1].event_type) == ("session_started", "done")

    for after in range(-1, len(everything)):
        later = [e for e in everything if e.sequence > after]
        assert clocked_store.traces(task_id, after_sequence=after) == later, after
        assert clocked_store.traces(task_id, after_sequence=after, limit=3) == later[:3], after


def test_a_damaged_step_trace_fails_reading_naming_its_cell(make_stepped_task, clocked_store):
    task_id = make_stepped_task(steps=2)
    clocked_store.db.execute_sql('UPDATE "checkpoint" SET "trace" = \'{"events": \' WHERE "step_index" = 2')

    with pytest.raises(CorruptRecord, match=r"checkpoint\.trace\["):
        clocked_store.traces(task_id)


# -- consolidation and flush points ---------------------------------------------------------


def test_content_reasoning_content_streamed_in_one_turn_are_stored_as_three_rows_and_no_duplicate(
    run_here, embedded_runtime
):
    record = run_here("streams-first-turn")

    assert record.status is TaskStatus.COMPLETED, record.last_error
    traces = embedded_runtime.store.traces("traced")
    assert [e.event_type for e in traces] == [
        "session_started", "content", "reasoning", "content", "tool_call_started", "tool_call_completed",
        "checkpoint", "turn_completed", "content", "done",
    ]
    texts = [(e.data["text"], e.data["chunks"]) for e in traces if e.event_type in ("content", "reasoning")]
    # Step 1 streamed (no extra "abcd" row from the loop); step 2 did not, so the loop wrote its answer.
    assert texts == [("abc", 3), ("r1r2", 2), ("d", 1), ("final answer", 1)]


def test_chunks_of_one_type_are_merged_until_the_type_changes(tracer):
    for kind, chunk in [("content", "a"), ("content", "b"), ("reasoning", "r"), ("content", "c"), ("content", "d")]:
        tracer.emit(kind, {"text": chunk})

    assert streamed(tracer.take()) == [("content", "ab"), ("reasoning", "r"), ("content", "cd")]


def test_a_turn_boundary_flushes_pending_chunks_so_two_turns_never_merge(tracer):
    tracer.emit("content", {"text": "first turn"})
    tracer.end_turn()
    tracer.emit("content", {"text": "second turn"})

    assert streamed(tracer.take()) == [("content", "first turn"), ("content", "second turn")]
    assert tracer.streamed_content is True  # the second turn streamed; end_turn resets it for the next


def test_taking_rows_for_a_checkpoint_flushes_pending_chunks(tracer):
    tracer.emit("content", {"text": "before "})
    tracer.emit("content", {"text": "checkpoint"})
    at_checkpoint = tracer.take()
    tracer.emit("content", {"text": "after"})

    assert streamed(at_checkpoint) == [("content", "before checkpoint")]
    assert streamed(tracer.take()) == [("content", "after")]
    assert (at_checkpoint.first_sequence, at_checkpoint.last_sequence) == (0, 0)
    assert tracer.take().first_sequence == 2  # "after" took sequence 1


def test_a_shutdown_mid_answer_keeps_the_chunks_streamed_so_far_as_a_restart_not_as_content(
    embedded_runtime, run_here
):
    with pytest.raises(Shutdown):
        run_here("streams-then-stops")

    store = embedded_runtime.store
    summary = store.summary("traced")
    assert summary.status is TaskStatus.RUNNING and summary.lease is None
    # The call is made again on resume and streams again: its first chunks must not be traced twice.
    assert [e for e in store.traces("traced") if e.event_type == "content"] == []
    [restarted] = [e for e in store.traces("traced") if e.event_type == "model_call_restarted"]
    assert (restarted.data["partial_text"], restarted.data["discarded_chunks"], restarted.data["step"]) == (
        "partial", 2, 1)


# -- text stored once ---------------------------------------------------------------------------

ANSWER = "Reading the report now: " + " ".join(f"finding{n}" for n in range(20))
OUTPUT = " ".join(f"row{n}" for n in range(80))  # no characters JSON would escape: found as-is in any cell


@pytest.fixture
def shared_text_step(clocked_store: TaskStore, clock: FakeClock) -> str:
    """A stored step whose trace repeats its assistant answer and its tool output, as the step loop's does."""
    task_id = "shared"
    tracer = TraceWriter(agent="scripted", model="m", job_type="agent_task", next_sequence=0,
                         started_at=clock(), clock=clock)
    tracer.emit("content", {"text": ANSWER})
    tracer.emit("tool_call_completed", {"step": 1, "tool": "read_file", "call_id": "c1", "output": OUTPUT})
    call = ToolCall(id="c1", name="read_file", arguments={"path": "report.txt"})
    clocked_store.record_checkpoint(
        CheckpointUpdate(task_id=task_id, thread_id=task_id, channel="test", provider="scripted", model="m",
                         step_index=1,
                         new_messages=[ChatMessage.assistant(ANSWER, tool_calls=[call]),
                                       ChatMessage(role="tool", content=OUTPUT, tool_call_id="c1", name="read_file")],
                         items=[CheckpointItem(tool_name="read_file", arguments={"path": "report.txt"}, success=True,
                                               output=OUTPUT)]),
        traces=tracer.take(),
    )
    return task_id


def cells_holding(store: TaskStore, text: str) -> dict[str, int]:
    """How many stored cells of each table hold `text`, straight from SQL."""
    columns = {"message": ["content"], "checkpoint": ["items", "trace"], "trace_batch": ["events"]}
    return {table: sum(text in (cell or "") for column in names
                       for (cell,) in store.db.execute_sql(f'SELECT "{column}" FROM "{table}"'))
            for table, names in columns.items()}


def test_text_a_step_shares_with_its_messages_is_stored_once_and_read_back_whole(clocked_store, shared_text_step):
    assert cells_holding(clocked_store, OUTPUT) == {"message": 1, "checkpoint": 0, "trace_batch": 0}
    assert cells_holding(clocked_store, ANSWER) == {"message": 1, "checkpoint": 0, "trace_batch": 0}

    record = clocked_store.get(shared_text_step)
    assert record.checkpoints[0].items[0].output == OUTPUT
    assert clocked_store.latest_checkpoint(shared_text_step).items[0].output == OUTPUT
    events = {e.event_type: e.data for e in clocked_store.traces(shared_text_step)}
    assert events["content"] == {"text": ANSWER, "chunks": 1}
    assert events["tool_call_completed"] == {"step": 1, "tool": "read_file", "call_id": "c1", "output": OUTPUT}


def test_a_rerun_copies_referenced_text_into_the_trace_before_deleting_the_old_messages(
    clocked_store, shared_text_step
):
    clocked_store.finish(shared_text_step, TaskStatus.COMPLETED, final_response="done")
    before = clocked_store.traces(shared_text_step)

    clocked_store.reset_for_rerun(shared_text_step)

    assert clocked_store.get(shared_text_step).execution_history == []
    assert clocked_store.traces(shared_text_step) == before  # the old run's trace reads as it did
    assert cells_holding(clocked_store, OUTPUT) == {"message": 0, "checkpoint": 0, "trace_batch": 1}


def test_a_shorter_snapshot_keeps_the_checkpoint_outputs_its_old_messages_held(clocked_store, shared_text_step):
    record = clocked_store.get(shared_text_step)

    clocked_store.save_snapshot(TaskSnapshot(
        task_id=record.task_id, thread_id=record.thread_id, channel=record.channel, provider=record.provider,
        model=record.model, status=TaskStatus.RUNNING, execution_history=[ChatMessage.user("start over")]))

    after = clocked_store.get(shared_text_step)
    assert after.execution_history == [ChatMessage.user("start over")]
    assert after.checkpoints[0].items[0].output == OUTPUT
    assert [e.data for e in clocked_store.traces(shared_text_step)] == [
        {"text": ANSWER, "chunks": 1}, {"step": 1, "tool": "read_file", "call_id": "c1", "output": OUTPUT}]


def test_text_read_from_a_message_into_a_trace_event_is_redacted_there_and_kept_whole_in_the_history(
    clocked_store, clock
):
    leaky = f"Calling the API with api_key={API_KEY} as configured."
    tracer = TraceWriter(agent="scripted", model="m", job_type="agent_task", next_sequence=0,
                         started_at=clock(), clock=clock)
    tracer.emit("content", {"text": leaky})
    clocked_store.record_checkpoint(
        CheckpointUpdate(task_id="leaky", thread_id="leaky", channel="test", provider="scripted", model="m",
                         step_index=1, new_messages=[ChatMessage.assistant(leaky)]),
        traces=tracer.take(),
    )

    [content] = clocked_store.traces("leaky")
    assert API_KEY not in content.data["text"] and "[redacted]" in content.data["text"]
    assert clocked_store.get("leaky").execution_history[0].content == leaky  # resuming needs the real text


def test_a_secret_named_value_is_blanked_even_when_a_message_holds_the_same_text(clocked_store, clock):
    tracer = TraceWriter(agent="scripted", model="m", job_type="agent_task", next_sequence=0,
                         started_at=clock(), clock=clock)
    tracer.emit("tool_call_completed", {"step": 1, "password": OUTPUT})
    clocked_store.record_checkpoint(
        CheckpointUpdate(task_id="keyed", thread_id="keyed", channel="test", provider="scripted", model="m",
                         step_index=1, new_messages=[ChatMessage(role="tool", content=OUTPUT, tool_call_id="c1")]),
        traces=tracer.take(),
    )

    [event] = clocked_store.traces("keyed")
    assert event.data == {"step": 1, "password": "[redacted]"}


def test_a_tool_output_no_message_holds_is_stored_cut_to_its_cap(clocked_store, clock):
    clocked_store.create_task(task_id="long", thread_id="long", channel="test", provider="scripted", model="m",
                              spec=TaskSpec(prompt="go"))
    tracer = TraceWriter(agent="scripted", model="m", job_type="agent_task", next_sequence=0,
                         started_at=clock(), clock=clock)
    tracer.emit("tool_call_completed", {"step": 1, "output": "y" * 50_000})

    clocked_store.append_traces("long", tracer.take())  # as a worker does when it stops mid-step

    [event] = clocked_store.traces("long")
    assert event.data["output"] == "y" * INLINE_CAPS["output"]


def test_a_step_recorded_below_the_highest_one_keeps_its_events_readable_in_order(clocked_store, clock, make_update):
    tracer = TraceWriter(agent="scripted", model="m", job_type="agent_task", next_sequence=0,
                         started_at=clock(), clock=clock)
    for step in (5, 3):  # a direct API caller filling in an earlier step after a later one
        tracer.emit("checkpoint", {"step": step})
        tracer.emit("turn_completed", {"step": step})
        clocked_store.record_checkpoint(make_update(step), traces=tracer.take())

    everything = clocked_store.traces("task-1")
    assert [(e.sequence, e.data["step"]) for e in everything] == [(0, 5), (1, 5), (2, 3), (3, 3)]
    assert clocked_store.traces("task-1", after_sequence=1) == everything[2:]


def test_recording_a_stored_step_again_with_its_traces_is_a_no_op(clocked_store, clock, make_update):
    tracer = TraceWriter(agent="scripted", model="m", job_type="agent_task", next_sequence=0,
                         started_at=clock(), clock=clock)
    tracer.emit("checkpoint", {"step": 1})
    taken = tracer.take()
    assert clocked_store.record_checkpoint(make_update(1), traces=taken) is True
    before = clocked_store.get("task-1")

    assert clocked_store.record_checkpoint(make_update(1), traces=taken) is False  # e.g. a commit of unknown outcome
    assert clocked_store.get("task-1") == before and len(clocked_store.traces("task-1")) == 1


def test_a_trace_event_whose_message_is_gone_fails_loudly_naming_it(clocked_store, shared_text_step):
    p = clocked_store.db.param
    clocked_store.db.execute_sql(f'DELETE FROM "message" WHERE "role" = {p}', ("tool",))

    with pytest.raises(CorruptRecord, match="execution message 1, which is not stored"):
        clocked_store.traces(shared_text_step)


# -- usage -----------------------------------------------------------------------------------


def test_usage_of_every_turn_is_summed_on_the_task_and_usage_updates_carry_running_totals(
    run_here, embedded_runtime
):
    record = run_here("metered")

    assert record.status is TaskStatus.COMPLETED, record.last_error
    expected = usage_of(1) + usage_of(2) + usage_of(3) + usage_of(4)
    assert record.usage == expected
    assert (expected.input_tokens, expected.request_count, expected.cost_usd) == (1000, 4, 2.5)
    assert embedded_runtime.store.summary("traced").usage == expected
    updates = [e.data for e in embedded_runtime.store.traces("traced") if e.event_type == "usage_update"]
    assert [u["step"] for u in updates] == [1, 2, 3, 4]
    assert [Usage(**u["turn"]) for u in updates] == [usage_of(step) for step in (1, 2, 3, 4)]
    running = Usage()
    for update in updates:
        running += usage_of(update["step"])
        assert Usage(**update["total"]) == running


def test_usage_totals_continue_from_the_stored_ones_after_a_resume(run_here, embedded_runtime):
    Metered.stop_at = 3
    with pytest.raises(Shutdown):
        run_here("metered")
    store = embedded_runtime.store
    assert store.summary("traced").usage == usage_of(1) + usage_of(2)  # stored with steps 1 and 2

    record = run_here("metered")

    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert record.usage == usage_of(1) + usage_of(2) + usage_of(3) + usage_of(4)
    traces = store.traces("traced")
    resumed_at = next(e.sequence for e in traces if e.event_type == "resumed")
    after_resume = [e.data for e in traces if e.event_type == "usage_update" and e.sequence > resumed_at]
    assert [u["step"] for u in after_resume] == [3, 4]
    assert Usage(**after_resume[0]["total"]) == usage_of(1) + usage_of(2) + usage_of(3)
    assert Usage(**after_resume[1]["total"]) == record.usage


# -- redaction --------------------------------------------------------------------------------


def test_api_keys_and_bearer_tokens_never_reach_the_database_file_or_last_error(run_here, embedded_runtime, db_path):
    record = run_here("leaky")

    assert record.status is TaskStatus.FAILED
    assert record.last_error is not None and "401 Unauthorized" in record.last_error
    assert "[redacted]" in record.last_error
    [error] = [e for e in embedded_runtime.store.traces("traced") if e.event_type == "error"]
    assert (error.data["kind"], error.data["http_status"], error.data["provider"]) == ("permanent", 401, "leaky")
    [reasoning] = [e for e in embedded_runtime.store.traces("traced") if e.event_type == "reasoning"]
    assert "[redacted]" in reasoning.data["text"]
    embedded_runtime.store.close()
    stored = b"".join(path.read_bytes() for path in (db_path, Path(f"{db_path}-wal")) if path.exists())
    # The key's second half alone would leak if chunks were redacted one by one, before consolidation.
    for secret in (API_KEY, API_KEY[14:], BEARER_TOKEN):
        assert secret.encode() not in stored
        assert secret not in record.last_error


#: Fragments that make up text the full secret patterns may or may not match.
SECRET_PARTS = st.sampled_from([
    "Bearer ", "basic ", "sk-", "SK-", "proj-", "ghp_", "xoxb-", "api_key", "API-KEY", "apiKey", "token", "secret",
    "Password", "access_token", "Authorization", "cookie", "credential", "\u017fecret", "=", ": ", "'", "\"",
    "abcdefghijklmnopqrstuvwxyz0123456789", "x" * 20,
])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(SECRET_PARTS, st.text(max_size=12)), max_size=8).map("".join))
def test_the_cheap_secret_check_never_waves_through_text_or_a_key_the_full_patterns_would_redact(text):
    redacted_by_patterns = text
    for pattern, replacement in _SECRET_TEXT:
        redacted_by_patterns = pattern.sub(replacement, redacted_by_patterns)
    if redacted_by_patterns != text or _SECRET_KEY.search(text):
        assert might_hold_secret(text)
        assert might_hold_secret(orjson.dumps({text: text}).decode())  # and in a JSON payload holding it


# -- retention and listing ------------------------------------------------------------------


TABLES = ("task", "checkpoint", "message", "trace_batch")


def test_prune_deletes_finished_tasks_with_all_their_rows_and_never_queued_or_running_ones(
    make_stepped_task, clocked_store, clock, count_rows
):
    make_stepped_task("completed", steps=2)
    make_stepped_task("failed", steps=1, finish=False)
    clocked_store.finish("failed", TaskStatus.FAILED, last_error="boom")
    make_stepped_task("running", steps=2, finish=False)
    clocked_store.create_task(task_id="queued", thread_id="queued", channel="test", provider="scripted",
                              model="m", spec=TaskSpec(prompt="wait"))
    kept = {table: sum(count_rows(clocked_store, table, task_id=t) for t in ("running", "queued")) for table in TABLES}
    assert all(kept.values())  # the running task has checkpoints, messages and traces at stake
    clock.advance(60)

    deleted = clocked_store.prune(max_tasks=0, older_than_s=0)

    assert sorted(deleted) == ["completed", "failed"]
    assert {table: count_rows(clocked_store, table) for table in TABLES} == kept  # no orphan rows either
    assert clocked_store.summary("running").status is TaskStatus.RUNNING
    assert clocked_store.summary("queued").status is TaskStatus.QUEUED


def test_a_dry_run_prune_names_the_tasks_and_deletes_nothing(make_stepped_task, clocked_store, count_rows):
    make_stepped_task("completed", steps=1)
    before = {table: count_rows(clocked_store, table) for table in TABLES}

    assert clocked_store.prune(max_tasks=0, dry_run=True) == ["completed"]
    assert {table: count_rows(clocked_store, table) for table in TABLES} == before


def test_list_tasks_filters_by_provider_and_by_creation_time(clocked_store, clock):
    start_s = clock()
    for task_id, provider in [("a", "openai"), ("b", "anthropic"), ("c", "openai")]:
        clocked_store.create_task(task_id=task_id, thread_id=task_id, channel="test", provider=provider,
                                  model="m", spec=TaskSpec(prompt="hi"))
        clock.advance(10)

    def ids(**filters: Any) -> list[str]:
        return [row.task_id for row in clocked_store.list_tasks(order_by="created", **filters)]

    assert ids() == ["c", "b", "a"]
    assert ids(provider="openai") == ["c", "a"]
    assert ids(since=utc(start_s + 10)) == ["c", "b"]
    assert ids(until=utc(start_s + 20)) == ["b", "a"]  # until is exclusive
    assert ids(since=utc(start_s + 5), until=utc(start_s + 15)) == ["b"]
    assert ids(provider="openai", since=utc(start_s + 10)) == ["c"]
    assert ids(provider="nobody") == []


# -- schema --------------------------------------------------------------------------------------


@pytest.fixture
def version_1_db(db_url: str, db_path: Path, make_update: Callable[..., Any]) -> TaskRecord:
    """This test's database as release 1 wrote it: one task of two steps; returns that task as it was.

    Release 1 had no usage columns, no trace table and schema version 1.
    """
    with TaskStore(db_url) as store:
        store.record_checkpoint(make_update(1))
        store.record_checkpoint(make_update(2))
        before = store.get("task-1")
        db = store.db
        db.execute_sql("PRAGMA foreign_keys = OFF")  # rebuilding `task` here must not cascade into its messages
        with db.atomic():
            migrator = SchemaMigrator.from_database(db)
            migrate(*[migrator.drop_column("task", name) for name in _V2_TASK_COLUMNS])
            db.execute_sql('DROP TABLE "trace_batch"')
            db.execute_sql('DELETE FROM "schema_version" WHERE "version" >= 2')
            db.execute_sql('INSERT OR IGNORE INTO "schema_version" ("version", "applied_at") VALUES (1, 0)')
    with closing(sqlite3.connect(db_path)) as raw:
        assert not set(_V2_TASK_COLUMNS) & {row[1] for row in raw.execute('PRAGMA table_info("task")')}
        assert raw.execute('SELECT MAX("version") FROM "schema_version"').fetchone() == (1,)
        assert raw.execute('SELECT COUNT(*) FROM "message"').fetchone() == (4,)
    return before


def test_a_version_1_database_is_migrated_to_the_current_version_when_a_store_opens_it(db_url, version_1_db):
    with TaskStore(db_url) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert set(_V2_TASK_COLUMNS) <= {column.name for column in store.db.get_columns("task")}
        assert "trace_batch" in store.db.get_tables() and "trace_event" not in store.db.get_tables()
        summary = store.summary("task-1")
        assert (summary.status, summary.checkpoint_count, summary.usage) == (TaskStatus.RUNNING, 2, Usage())
        assert store.next_trace_sequence("task-1") == 0


def test_migrating_to_version_2_keeps_every_history_and_checkpoint(db_url, version_1_db):
    with TaskStore(db_url) as store:
        record = store.get("task-1")

    assert record.execution_history == version_1_db.execution_history
    assert record.checkpoints == version_1_db.checkpoints
    assert record.turn_count == 2  # recounted from the stored assistant messages


#: Schema 2's trace table, as release 2 created it (one row per event).
V2_TRACE_EVENT_DDL = """
CREATE TABLE "trace_event" ("id" {id}, "task_id" INTEGER NOT NULL REFERENCES "task" ("id") ON DELETE CASCADE,
    "sequence" INTEGER NOT NULL, "recorded_at" {real} NOT NULL, "elapsed_ms" {real} NOT NULL,
    "agent" VARCHAR(200) NOT NULL, "model" VARCHAR(200) NOT NULL, "job_type" VARCHAR(64) NOT NULL,
    "event_type" VARCHAR(64) NOT NULL, "data" TEXT NOT NULL)
"""


def test_a_version_2_trace_is_migrated_to_batches_with_its_sequences_times_and_data(
    db_url, make_stepped_task, clocked_store
):
    task_id = make_stepped_task(steps=2)
    events = clocked_store.traces(task_id)
    db, p = clocked_store.db, clocked_store.db.param
    sqlite = db_url.startswith("sqlite")
    task_pk = db.execute_sql(f'SELECT "id" FROM "task" WHERE "task_id" = {p}', (task_id,)).fetchone()[0]
    with db.atomic():  # the database as release 2 left it: the same events, a row each
        db.execute_sql(V2_TRACE_EVENT_DDL.format(id="INTEGER PRIMARY KEY" if sqlite else "BIGSERIAL PRIMARY KEY",
                                                 real="REAL" if sqlite else "DOUBLE PRECISION"))
        for e in events:
            db.execute_sql(
                'INSERT INTO "trace_event" ("task_id", "sequence", "recorded_at", "elapsed_ms", "agent", "model", '
                f'"job_type", "event_type", "data") VALUES ({", ".join([p] * 9)})',
                (task_pk, e.sequence, e.recorded_at.timestamp(), e.elapsed_ms, e.agent, e.model, e.job_type,
                 e.event_type, orjson.dumps(e.data).decode()))
        db.execute_sql('DROP TABLE "trace_batch"')
        for table, column in [("task", "trace_next_sequence"), ("checkpoint", "trace_first_sequence"),
                              ("checkpoint", "trace")]:
            db.execute_sql(f'ALTER TABLE "{table}" DROP COLUMN "{column}"')
        db.execute_sql('DELETE FROM "schema_version"')
        db.execute_sql(f'INSERT INTO "schema_version" ("version", "applied_at") VALUES (2, {p})', (0.0,))
    clocked_store.close_all()

    with TaskStore(db_url) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert "trace_event" not in store.db.get_tables()
        migrated = store.traces(task_id)
        assert store.next_trace_sequence(task_id) == events[-1].sequence + 1

    assert [(e.sequence, e.event_type, e.data, e.elapsed_ms) for e in migrated] == [
        (e.sequence, e.event_type, e.data, e.elapsed_ms) for e in events]
    assert [e.recorded_at.timestamp() for e in migrated] == pytest.approx([e.recorded_at.timestamp() for e in events])
