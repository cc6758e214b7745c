"""The step journal: an answer is stored before its tools run, each result as it completes, and no history
ever holds a tool call without its result.

Runs go through `TaskRun` with the parts each test hands it (a provider object,
a tool table), on an embedded runtime whose worker is never started: the
worker's own code path from a claimed lease to the finished task. An
interrupt the step loop resumes from (`Shutdown`) stands in for a crash at an
exact point; `test_journal_crash.py` kills real processes.
"""

from __future__ import annotations

import threading
from typing import Iterator, Optional

import pytest
from dramatiq.middleware import Shutdown, TimeLimitExceeded
from dramatiq.middleware.threading import raise_thread_exception
from pydantic import BaseModel

from longhaul.models import (
    ChatMessage,
    CheckpointUpdate,
    Claimant,
    InvalidInput,
    LeaseBook,
    OpenStep,
    TaskStatus,
    TaskStore,
    ToolCall,
    with_orphans_answered,
)
from longhaul.worker import Runtime, load_settings, loop
from longhaul.worker.api import submit
from longhaul.worker.loop import TaskRun
from longhaul.worker.providers import AssistantTurn, StepContext
from longhaul.worker.providers.anthropic import anthropic_messages
from longhaul.worker.providers.openai import chat_messages
from longhaul.worker.testing import wait_until
from longhaul.worker.tools import Tool, ToolContext, ToolError, define_tool

pytestmark = pytest.mark.backends("sqlite", "postgres")


class Note(BaseModel):
    text: str


class Calls:
    """What the tools of one test did: each call's idempotency key, in the order they ran."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.lock = threading.Lock()
        self.interrupt_at: Optional[str] = None  # the tool call (by text) that interrupts the run once
        self.inside: Optional[Runtime] = None
        self.seen_open: list[Optional[OpenStep]] = []

    def record(self, args: Note, ctx: ToolContext) -> str:
        with self.lock:
            self.keys.append(ctx.idempotency_key)
        if self.inside is not None:
            self.seen_open.append(self.inside.store.open_step(ctx.task_id))
        if args.text == self.interrupt_at:
            self.interrupt_at = None
            raise Shutdown()
        return f"noted {args.text}"


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def note_tools(calls: Calls) -> dict[str, Tool]:
    """`note` (one call at a time) and `fetch` (declared parallel), both recording into `calls`."""

    @define_tool("note")
    def note(args: Note, ctx: ToolContext) -> str:
        """Write a note."""
        return calls.record(args, ctx)

    @define_tool("fetch", parallel=True)
    def fetch(args: Note, ctx: ToolContext) -> str:
        """Fetch something; safe to run beside other fetches."""
        return calls.record(args, ctx)

    return {"note": note, "fetch": fetch}


class Planned:
    """Step 1 asks for the planned calls, step 2 answers; counts how often each step was asked."""

    name = "planned"

    def __init__(self, *calls: tuple[str, str]) -> None:
        self.calls = [ToolCall(id=f"c{i}", name=tool, arguments={"text": text}) for i, (tool, text) in enumerate(calls)]
        self.asked: list[int] = []

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        self.asked.append(ctx.step_index)
        if ctx.step_index == 1:
            return AssistantTurn("working", list(self.calls))
        return AssistantTurn("all done")


@pytest.fixture
def runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(load_settings(database_url=db_url, redis_url=None), embedded=True)
    yield rt
    rt.store.close_all()


def run_once(rt: Runtime, task_id: str, provider: object, tools: dict[str, Tool]) -> TaskStatus:
    claim = rt.leases.claim(task_id, rt.claimant, lease_s=30)
    assert claim is not None
    try:
        return TaskRun(rt, claim, provider=provider, tools=tools).run()  # type: ignore[arg-type]
    except Shutdown:
        return TaskStatus.RUNNING


def new_task(rt: Runtime, task_id: str, **options: object) -> str:
    return submit(rt, "work", provider="scripted", task_id=task_id, **options)


def assert_no_orphans(history: list[ChatMessage]) -> None:
    """Every tool call of `history` has its result, right after its answer."""
    assert with_orphans_answered(history) == history


# -- journaling ---------------------------------------------------------------------------------------


def test_the_answer_is_stored_before_its_first_tool_runs(runtime, calls, note_tools):
    task_id = new_task(runtime, "first")
    calls.inside = runtime

    assert run_once(runtime, task_id, Planned(("note", "a"), ("note", "b")), note_tools) is TaskStatus.COMPLETED

    first, second = calls.seen_open
    assert first is not None and [c.arguments["text"] for _, c in first.pending_calls] == ["a", "b"]
    assert second is not None and [c.arguments["text"] for _, c in second.pending_calls] == ["b"]
    assert second.results[0] is not None and second.results[0].content == "noted a"  # stored as it completed


def test_a_run_interrupted_between_two_tools_resumes_with_the_pending_call_only_and_never_asks_again(
    runtime, calls, note_tools
):
    task_id = new_task(runtime, "between")
    provider = Planned(("note", "a"), ("note", "b"), ("note", "c"))
    calls.interrupt_at = "b"

    assert run_once(runtime, task_id, provider, note_tools) is TaskStatus.RUNNING
    step = runtime.store.open_step(task_id)
    assert step is not None and [i for i, _ in step.pending_calls] == [1, 2]

    assert run_once(runtime, task_id, provider, note_tools) is TaskStatus.COMPLETED
    assert provider.asked == [1, 2]  # step 1 was answered once, from the journal afterwards
    assert calls.keys == ["between:1:0", "between:1:1", "between:1:1", "between:1:2"]  # same keys on resume
    record = runtime.store.get(task_id)
    assert [m.content for m in record.execution_history if m.role == "tool"] == ["noted a", "noted b", "noted c"]
    assert [c.step_index for c in record.checkpoints] == [1]
    assert [i.output for i in record.checkpoints[0].items] == ["noted a", "noted b", "noted c"]
    assert runtime.store.open_step(task_id) is None
    assert record.turn_count == 2 and record.tool_call_count == 3
    assert_no_orphans(record.execution_history)


def _echo_and_broken_tools(calls: Calls) -> dict[str, Tool]:
    """`echo` answers its text (after recording the call, which may interrupt); `broken` always fails."""

    @define_tool("echo")
    def echo(args: Note, ctx: ToolContext) -> str:
        """Say the text back."""
        calls.record(args, ctx)
        return args.text

    @define_tool("broken")
    def broken(args: Note, ctx: ToolContext) -> str:
        """Fail."""
        raise ToolError("it broke")

    return {"echo": echo, "broken": broken}


LOOKS_FAILED = "echo failed: no, this call worked"  # a success whose text starts like `run_tool_call`'s failures


def test_a_resumed_step_keeps_each_journaled_results_success_flag_even_when_its_text_reads_like_a_failure(
    runtime, calls
):
    task_id = new_task(runtime, "flags")
    tools = _echo_and_broken_tools(calls)
    provider = Planned(("echo", LOOKS_FAILED), ("broken", "x"), ("echo", "b"))
    calls.interrupt_at = "b"

    assert run_once(runtime, task_id, provider, tools) is TaskStatus.RUNNING
    step = runtime.store.open_step(task_id)
    assert step is not None and step.succeeded == (True, False, None)

    assert run_once(runtime, task_id, provider, tools) is TaskStatus.COMPLETED
    items = runtime.store.get(task_id).checkpoints[0].items
    assert [(item.output, item.success) for item in items] == [
        (LOOKS_FAILED, True), ("broken failed: it broke", False), ("b", True)]


def test_a_result_journaled_without_a_flag_by_an_older_release_is_judged_by_its_text_as_before(runtime, calls):
    task_id = new_task(runtime, "legacy")
    tools = _echo_and_broken_tools(calls)
    provider = Planned(("echo", LOOKS_FAILED), ("echo", "ok"), ("echo", "b"))
    calls.interrupt_at = "b"
    assert run_once(runtime, task_id, provider, tools) is TaskStatus.RUNNING
    runtime.store.db.execute_sql('UPDATE "message" SET "tool_succeeded" = NULL')  # as a schema-7 row reads
    step = runtime.store.open_step(task_id)
    assert step is not None and step.succeeded == (None, None, None)

    assert run_once(runtime, task_id, provider, tools) is TaskStatus.COMPLETED
    items = runtime.store.get(task_id).checkpoints[0].items
    assert [item.success for item in items] == [False, True, True]  # the guess: fooled by the text, as before


def test_the_store_keeps_results_in_the_answers_order_whatever_order_they_complete_in(runtime):
    store: TaskStore = runtime.store
    task_id = new_task(runtime, "order")
    answer = ChatMessage.assistant("three", tool_calls=[ToolCall(id=f"c{i}", name="fetch") for i in range(3)])
    step = store.journal_answer(task_id, 1, answer)
    for index in (2, 0):
        step = store.journal_result(step, index, ChatMessage(role="tool", content=f"r{index}",
                                                             tool_call_id=f"c{index}", name="fetch"))

    reopened = store.open_step(task_id)
    assert reopened == step and [i for i, _ in reopened.pending_calls] == [1]
    assert [m.content for m in store.get(task_id).execution_history[-3:]] == ["three", "r0", "r2"]


# -- parallel calls -------------------------------------------------------------------------------


def test_calls_to_parallel_tools_run_at_once_and_their_results_keep_the_answers_order(runtime, db_url):
    task_id = new_task(runtime, "parallel")
    all_started, order = threading.Barrier(3, timeout=10), []

    @define_tool("wait", parallel=True)
    def wait(args: Note, ctx: ToolContext) -> str:
        """Wait until all three calls run at once (the barrier breaks if they do not), then finish in reverse."""
        all_started.wait()
        threading.Event().wait(0.05 * (3 - ctx.call_index))  # call 2 finishes first
        order.append(ctx.call_index)
        return f"waited {args.text}"

    provider = Planned(("wait", "x"), ("wait", "y"), ("wait", "z"))
    assert run_once(runtime, task_id, provider, {"wait": wait}) is TaskStatus.COMPLETED

    assert order == [2, 1, 0]
    record = runtime.store.get(task_id)
    assert [m.content for m in record.execution_history if m.role == "tool"] == ["waited x", "waited y", "waited z"]
    assert [m.tool_call_id for m in record.execution_history if m.role == "tool"] == ["c0", "c1", "c2"]


def test_an_answer_that_calls_any_tool_not_declared_parallel_runs_its_calls_one_at_a_time(runtime):
    task_id = new_task(runtime, "mixed")
    running, most = [0], [0]
    lock = threading.Lock()

    def counted(args: Note, ctx: ToolContext) -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.05)
        with lock:
            running[0] -= 1
        return "ok"

    tools = {"fetch": define_tool("fetch", description="d", parallel=True)(counted),
             "note": define_tool("note", description="d")(counted)}
    assert run_once(runtime, task_id, Planned(("fetch", "a"), ("note", "b"), ("fetch", "c")), tools) \
        is TaskStatus.COMPLETED
    assert most[0] == 1


def test_a_parallel_flag_that_is_not_a_bool_is_refused_naming_it():
    with pytest.raises(InvalidInput, match="parallel: must be True or False, got 'yes'"):
        define_tool("x", description="d", parallel="yes")  # type: ignore[arg-type]


# -- orphan repair ---------------------------------------------------------------------------------


def test_a_cancel_during_a_tool_stops_before_the_next_call_which_gets_a_result_saying_so(runtime, calls):
    task_id = new_task(runtime, "cancel")

    @define_tool("note")
    def note(args: Note, ctx: ToolContext) -> str:
        """Write a note; the first one asks for the task to be cancelled, as a user would meanwhile."""
        calls.record(args, ctx)
        runtime.store.request_cancel(ctx.task_id)
        return "noted"

    assert run_once(runtime, task_id, Planned(("note", "a"), ("note", "b")), {"note": note}) is TaskStatus.CANCELLED

    record = runtime.store.get(task_id)
    assert calls.keys == ["cancel:1:0"]
    assert record.last_error == "cancelled during step 1, before its tool call 2"
    last = record.execution_history[-1]
    assert (last.role, last.tool_call_id) == ("tool", "c1")
    assert last.content.startswith("[no result: this tool call did not complete: the task ended (cancelled)")
    assert_no_orphans(record.execution_history)
    assert not any(m.tool_calls or m.role == "tool" for m in record.resumable_history)  # a thread resumes turns only


def test_a_time_limit_hit_during_a_tool_gives_that_call_and_the_rest_a_result_saying_so(runtime):
    task_id = new_task(runtime, "timed")

    @define_tool("slow")
    def slow(args: Note, ctx: ToolContext) -> str:
        """Runs past the task's time limit (Dramatiq raises this in the worker thread)."""
        raise TimeLimitExceeded()

    assert run_once(runtime, task_id, Planned(("slow", "a"), ("slow", "b")), {"slow": slow}) is TaskStatus.TIMED_OUT

    record = runtime.store.get(task_id)
    results = [m for m in record.execution_history if m.role == "tool"]
    assert [m.tool_call_id for m in results] == ["c0", "c1"]
    assert all("the task ended (timed_out): time limit exceeded" in m.content for m in results)
    assert_no_orphans(record.execution_history)


def test_a_time_limit_during_a_parallel_batch_stops_it_at_once_and_never_starts_the_calls_still_queued(
    runtime, monkeypatch, caplog
):
    """Dramatiq's time limit, raised into the loop's thread as Dramatiq does, while two calls block.

    Four parallel calls on a pool of two: ``a`` returns and is stored; ``b``
    and ``c`` block (``c`` starts in ``a``'s thread); ``d`` waits its turn.
    """
    monkeypatch.setattr(loop, "PARALLEL_TOOL_THREADS", 2)
    task_id = new_task(runtime, "batch")
    loop_thread, release = threading.get_ident(), threading.Event()
    started: list[str] = []
    returned: list[str] = []  # of the blocking calls

    @define_tool("fetch", parallel=True)
    def fetch(args: Note, ctx: ToolContext) -> str:
        """Fetch; ``a`` at once, the others only once released."""
        started.append(args.text)
        if args.text == "a":
            return "fetched a"
        if args.text == "c":  # both blocking calls run, and a's result is stored: the time is up
            wait_until(lambda: (step := runtime.store.open_step(task_id)) is not None and step.results[0] is not None,
                       timeout_s=30, what="a's result to be stored")
            raise_thread_exception(loop_thread, TimeLimitExceeded)
        release.wait(timeout=30)
        returned.append(args.text)
        return f"fetched {args.text} too late"

    provider = Planned(("fetch", "a"), ("fetch", "b"), ("fetch", "c"), ("fetch", "d"))
    with caplog.at_level("WARNING", logger="longhaul.worker.loop"):
        status = run_once(runtime, task_id, provider, {"fetch": fetch})
    still_blocked = not returned
    release.set()

    assert status is TaskStatus.TIMED_OUT and still_blocked  # the loop did not wait for the blocked tools
    record = runtime.store.get(task_id)
    results = [m.content for m in record.execution_history if m.role == "tool"]
    assert results[0] == "fetched a"
    assert all("the task ended (timed_out): time limit exceeded" in text for text in results[1:]) and len(results) == 4
    assert_no_orphans(record.execution_history)
    left = next(e for e in runtime.store.traces(task_id) if e.event_type == "tool_calls_left_behind")
    assert [c["call_id"] for c in left.data["running"]] == ["c1", "c2"]
    assert [c["call_id"] for c in left.data["not_started"]] == ["c3"]
    assert "batch:1:1" in caplog.text and "batch:1:2" in caplog.text and "cannot stop" in caplog.text
    assert sorted(started) == ["a", "b", "c"]  # d never started, not even once a thread was free


def test_cancelling_a_task_whose_worker_died_mid_step_closes_its_open_step(runtime):
    store: TaskStore = runtime.store
    task_id = new_task(runtime, "dead")
    claim = runtime.leases.claim(task_id, runtime.claimant, lease_s=30)
    assert claim is not None
    store.journal_answer(task_id, 1, ChatMessage.assistant("go", tool_calls=[ToolCall(id="c0", name="note")]),
                         lease_token=claim.token)
    runtime.leases.release(task_id, claim.token, redeliver_at=None)  # as an expired lease: nobody holds it

    assert store.request_cancel(task_id) is TaskStatus.CANCELLED
    history = store.get(task_id).execution_history
    assert history[-1].content.startswith("[no result: this tool call did not complete: the task was cancelled")
    assert store.open_step(task_id) is None or store.open_step(task_id).is_complete
    assert_no_orphans(history)


def test_every_terminal_write_closes_the_open_step(runtime):
    """`finish` is what recovery's give-up, the retries' give-up and every loop ending go through."""
    store: TaskStore = runtime.store
    task_id = new_task(runtime, "finished")
    store.journal_answer(task_id, 1, ChatMessage.assistant("go", tool_calls=[ToolCall(id="c0", name="note"),
                                                                              ToolCall(id="c1", name="note")]))

    store.finish(task_id, TaskStatus.FAILED, last_error="gave up after 3 recoveries")

    history = store.get(task_id).execution_history
    assert [m.tool_call_id for m in history[-2:]] == ["c0", "c1"]
    assert "the task ended (failed): gave up after 3 recoveries" in history[-1].content
    assert_no_orphans(history)


def test_no_provider_request_holds_a_tool_call_without_its_result():
    call, other = ToolCall(id="c0", name="note"), ToolCall(id="c1", name="note")
    history = [ChatMessage.user("hi"), ChatMessage.assistant("", tool_calls=[call, other]),
               ChatMessage(role="tool", content="done", tool_call_id="c1", name="note"), ChatMessage.user("and?")]

    sent = chat_messages(history)
    assert [(m["role"], m.get("tool_call_id")) for m in sent] == [
        ("user", None), ("assistant", None), ("tool", "c1"), ("tool", "c0"), ("user", None)]
    _system, blocks = anthropic_messages(history)
    results = [b["tool_use_id"] for m in blocks for b in m["content"] if b["type"] == "tool_result"]
    assert sorted(results) == ["c0", "c1"]


def test_completing_a_step_hands_back_the_next_step_boundary_as_its_locked_read_saw_it(
        store, make_snapshot, make_update):
    """`TaskStore.complete_step`: the loop's next boundary comes with the checkpoint, no read of its own."""
    store.save_snapshot(make_snapshot(TaskStatus.RUNNING))
    lease = LeaseBook(store).claim("task-1", Claimant(owner="host-a:1:x", host="host-a", pid=1), lease_s=30)

    def a_step(index: int) -> tuple[CheckpointUpdate, OpenStep]:
        answer = ChatMessage.assistant(f"step {index}", tool_calls=[ToolCall(id=f"c{index}", name="shell",
                                                                             arguments={})])
        step = store.journal_answer("task-1", index, answer, lease_token=lease.token)
        result = ChatMessage(role="tool", content=f"result {index}", tool_call_id=f"c{index}", name="shell")
        return make_update(index, new_messages=[answer, result]), step

    update, step = a_step(1)
    assert store.complete_step(update, journal=step, lease_token=lease.token) == (None, False)

    update, step = a_step(2)
    assert store.request_cancel("task-1", reason="enough") is TaskStatus.RUNNING
    store.db.execute_sql(f'UPDATE "task" SET "steering" = {store.db.param} WHERE "task_id" = {store.db.param}',
                         ('["and one more"]', "task-1"))

    assert store.complete_step(update, journal=step, lease_token=lease.token) == ("enough", True)
    assert store.complete_step(update, journal=step, lease_token=lease.token) == ("enough", True)  # a repeat too
    assert store.step_boundary("task-1") == ("enough", True) and store.summary("task-1").checkpoint_count == 2
