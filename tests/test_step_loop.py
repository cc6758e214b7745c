"""The agent step loop, in-process: an embedded (StubBroker) runtime and `worker.api`.

Everything here runs in this process: the scripted provider and its ledger
tool show which steps ran and how often; fake providers registered by name
inject errors; the store's clock is a `FakeClock` wherever leases expire.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from longhaul import worker
from longhaul.models import (
    Claimant,
    LeaseInfo,
    TaskNotFound,
    TaskNotResumable,
    TaskRecord,
    TaskStatus,
    ToolCall,
    load_resumable_state,
)
from longhaul.worker import Runtime, identity
from longhaul.worker.execute import execute_task
from longhaul.worker.providers import (
    AssistantTurn,
    PermanentProviderError,
    StepContext,
    TransientProviderError,
)
from longhaul.worker.providers.scripted import ScriptedProvider
from longhaul.worker.recovery import find_interrupted, interruption, resend_interrupted
from longhaul.worker.testing import FakeClock, ledger_counts, wait_until
from tests.fixtures.runtimes import with_providers

#: A worker process on another host: its liveness cannot be checked from here.
ELSEWHERE = Claimant(owner="other", host="elsewhere", pid=1)


# -- fake providers (module level, so every worker thread finds the same ones) --


class AlwaysTransient:
    """Every call fails in a way worth retrying; counts the calls."""

    name = "always-transient"
    calls = 0

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        type(self).calls += 1
        raise TransientProviderError("upstream answered 503; try again later")


class AlwaysPermanent:
    name = "always-permanent"

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        raise PermanentProviderError("401: the API key was rejected")


class Crashing:
    """A provider with a bug: raises something that is not a provider error."""

    name = "crashing"

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        raise RuntimeError("provider bug: unexpected response shape")


class BadArgumentsOnce:
    """Step 1 calls the ledger tool without its `line` argument; step 2 answers."""

    name = "bad-arguments"

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        if ctx.step_index == 1:
            return AssistantTurn("Writing to the ledger.", [ToolCall(id="call_0", name="ledger", arguments={})])
        return AssistantTurn(f"Finished; the ledger said: {ctx.history[-1].content}")


class TaggedFinal(ScriptedProvider):
    """The scripted provider, but its final answer also carries a tool-call tag (and no call)."""

    name = "tagged-final"

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        turn = super().next_turn(ctx)
        if turn.tool_calls:
            return turn
        tag = '<tool_call>{"name": "ledger", "arguments": {"line": "never run"}}</tool_call>'
        return AssistantTurn(f"{turn.content}\n{tag}")


FAKE_PROVIDERS = (AlwaysTransient, AlwaysPermanent, Crashing, BadArgumentsOnce, TaggedFinal)


@pytest.fixture(autouse=True)
def fresh_fake_providers() -> None:
    AlwaysTransient.calls = 0


@pytest.fixture
def make_runtime(make_runtime: Callable[..., Runtime]) -> Callable[..., Runtime]:
    """This module's runtimes are handed its fake providers beside the built-in ones; nothing is registered."""
    return with_providers(make_runtime, *FAKE_PROVIDERS)


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger.txt"


@pytest.fixture
def clocked_runtime(make_runtime: Callable[..., Runtime], clock: FakeClock) -> Callable[..., Runtime]:
    """Build an embedded runtime whose store (and so every lease) follows `clock`."""

    def make(**overrides: object) -> Runtime:
        return make_runtime(clock=clock, **overrides)

    return make


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- helpers --------------------------------------------------------------------


def steps_of(record: TaskRecord) -> list[int]:
    return [checkpoint.step_index for checkpoint in record.checkpoints]


def each_step(task_id: str, steps: int, times: int = 1) -> Counter[str]:
    """The ledger of a task whose steps 1..`steps` each ran `times` times."""
    return Counter({f"{task_id} step {i}": times for i in range(1, steps + 1)})


def checkpoint_count(rt: Runtime, task_id: str) -> int:
    """Checkpoints stored so far (0 while the task does not exist yet)."""
    try:
        return rt.store.summary(task_id).checkpoint_count
    except TaskNotFound:
        return 0


def lease_of(rt: Runtime, task_id: str) -> Optional[LeaseInfo]:
    """The task's lease now (None while it has none or does not exist yet)."""
    try:
        return rt.store.summary(task_id).lease
    except TaskNotFound:
        return None


def deliver_and_wait(rt: Runtime, task_id: str, *, timeout_s: float = 10) -> TaskRecord:
    """Send a stored task to the embedded worker and wait (with a deadline) for it to finish."""
    rt.start_embedded_worker()
    rt.send(task_id)
    wait_until(lambda: rt.store.summary(task_id).status.is_terminal, timeout_s=timeout_s,
               what=f"task {task_id} to finish")
    return rt.store.get(task_id)


def run_in_thread(**run_inline_kwargs: Any) -> tuple[threading.Thread, dict[str, TaskRecord]]:
    """Start `worker.run_inline` in a thread; its record lands in the dict under 'record'."""
    result: dict[str, TaskRecord] = {}
    thread = threading.Thread(target=lambda: result.update(record=worker.run_inline(**run_inline_kwargs)),
                              daemon=True)
    thread.start()
    return thread, result


# -- running steps ----------------------------------------------------------------


def test_a_task_runs_every_planned_step_once_and_completes_with_a_final_response(embedded_runtime, ledger):
    record = worker.run_inline("count to five", task_id="five", steps=5, ledger_path=str(ledger))

    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert record.final_response and record.final_response.startswith("Done: 5 steps")
    assert steps_of(record) == [1, 2, 3, 4, 5]
    assert all(len(c.items) == 1 and c.items[0].tool_name == "ledger" and c.items[0].success
               for c in record.checkpoints)
    assert ledger_counts(ledger) == each_step("five", 5)
    assert record.lease is None

    history = record.execution_history
    assert len(history) == 1 + 2 * 5 + 1
    assert (history[0].role, history[0].content) == ("user", "count to five")
    for step in range(1, 6):
        assistant, tool = history[2 * step - 1], history[2 * step]
        assert assistant.role == "assistant" and assistant.tool_calls is not None
        [call] = assistant.tool_calls
        assert (call.name, call.arguments) == ("ledger", {"line": f"five step {step}"})
        assert (tool.role, tool.name, tool.tool_call_id) == ("tool", "ledger", call.id)
        assert f"five step {step}" in tool.content
    assert (history[-1].role, history[-1].content, history[-1].tool_calls) == (
        "assistant", record.final_response, None)


def test_a_transient_provider_error_retries_from_the_latest_checkpoint_not_from_step_one(
    embedded_runtime, ledger, tmp_path
):
    marker = tmp_path / "failed-once"
    record = worker.run_inline("flaky upstream", task_id="flaky", steps=5, ledger_path=str(ledger),
                               fail_once_at_step=3, fail_once_marker=str(marker))

    assert marker.exists(), "the injected failure never fired"
    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert steps_of(record) == [1, 2, 3, 4, 5]
    assert ledger_counts(ledger) == each_step("flaky", 5)
    # A retry gives the lease back and resumes; it is no crash, so the crash-loop counter stays at 0.
    assert record.recovery_count == 0


def test_a_transient_error_that_outlasts_max_retries_fails_the_task_saying_it_gave_up(make_runtime):
    rt = make_runtime(max_retries=1)
    task_id = worker.submit(rt, "upstream is down", provider="always-transient")

    record = deliver_and_wait(rt, task_id, timeout_s=2)

    assert AlwaysTransient.calls == 2  # the first delivery and one retry
    assert record.status is TaskStatus.FAILED
    assert record.last_error is not None
    assert "gave up" in record.last_error and "upstream answered 503" in record.last_error
    assert record.lease is None


def test_the_gave_up_message_counts_the_retries_that_actually_ran(make_runtime):
    rt = make_runtime(max_retries=1)
    task_id = worker.submit(rt, "upstream is down", provider="always-transient")

    record = deliver_and_wait(rt, task_id, timeout_s=2)

    assert record.last_error is not None and "after 1 retr" in record.last_error


def test_a_permanent_provider_error_fails_the_task_with_its_message(embedded_runtime):
    record = worker.run_inline("bad credentials", provider="always-permanent")

    assert record.status is TaskStatus.FAILED
    assert record.last_error == "401: the API key was rejected"
    assert record.checkpoints == []
    assert record.lease is None


def test_an_unexpected_provider_exception_fails_the_task_instead_of_leaving_it_leased(embedded_runtime):
    task_id = worker.submit(embedded_runtime, "buggy provider", provider="crashing")

    record = deliver_and_wait(embedded_runtime, task_id, timeout_s=2)

    assert record.status is TaskStatus.FAILED
    assert record.last_error is not None and "RuntimeError" in record.last_error
    assert record.lease is None


# -- cancel, rerun, shutdown ----------------------------------------------------------


def test_cancel_stops_a_running_task_between_steps(embedded_runtime, ledger):
    thread, result = run_in_thread(prompt="a long job", task_id="to-cancel", steps=30, step_delay_s=0.05,
                                   ledger_path=str(ledger))
    wait_until(lambda: checkpoint_count(embedded_runtime, "to-cancel") >= 2, timeout_s=10,
               what="two checkpoints before cancelling")

    assert worker.cancel("to-cancel") is TaskStatus.RUNNING  # it stops after its current step
    thread.join(timeout=10)

    assert not thread.is_alive()
    record = result["record"]
    assert record.status is TaskStatus.CANCELLED
    done = record.checkpoint_count
    assert 2 <= done < 30
    assert steps_of(record) == list(range(1, done + 1))
    assert ledger_counts(ledger) == each_step("to-cancel", done)  # no step half-run after the cancel
    assert record.last_error is not None and f"step {done}" in record.last_error


def test_a_cancel_that_comes_after_the_claim_stops_a_new_task_before_its_first_model_call(
        embedded_runtime, ledger, monkeypatch):
    """The first step boundary is read with the opening histories, the last store call before the model's."""
    task_id = worker.submit(embedded_runtime, "never mind", steps=3, ledger_path=str(ledger))
    store = embedded_runtime.store
    append_histories = store.append_histories

    def cancelled_first(*args: Any, **kwargs: Any) -> Any:
        assert store.request_cancel(task_id, reason="changed my mind") is TaskStatus.RUNNING  # claimed by now
        return append_histories(*args, **kwargs)

    monkeypatch.setattr(store, "append_histories", cancelled_first)

    assert execute_task(embedded_runtime, task_id) is TaskStatus.CANCELLED
    record = store.get(task_id)
    assert not ledger.exists()  # no step ran
    assert [m.role for m in record.execution_history] == ["user"]  # the model was never asked
    assert record.last_error == "changed my mind after step 0"


def test_a_run_reads_no_step_boundary_of_its_own_the_writes_before_each_bring_it(
        embedded_runtime, ledger, monkeypatch):
    """The opening histories' write brings the first boundary, each checkpoint the next: a store call fewer a step."""
    task_id = worker.submit(embedded_runtime, "three steps", steps=3, ledger_path=str(ledger))
    store = embedded_runtime.store
    reads: list[str] = []
    step_boundary = store.step_boundary
    monkeypatch.setattr(store, "step_boundary", lambda task: reads.append(task) or step_boundary(task))

    assert execute_task(embedded_runtime, task_id) is TaskStatus.COMPLETED
    assert ledger_counts(ledger) == each_step(task_id, 3)
    assert reads == [task_id]  # one: whether a steer came while the model wrote its final answer


def test_cancel_of_a_queued_task_cancels_it_at_once_and_it_never_runs(embedded_runtime, ledger):
    task_id = worker.submit(embedded_runtime, "never mind", steps=3, ledger_path=str(ledger))

    assert worker.cancel(task_id) is TaskStatus.CANCELLED
    assert embedded_runtime.store.summary(task_id).status is TaskStatus.CANCELLED
    assert execute_task(embedded_runtime, task_id) is None  # a late delivery runs nothing
    assert not ledger.exists()


def test_rerun_resets_checkpoints_and_runs_the_task_again_from_step_one(embedded_runtime, ledger):
    first = worker.run_inline("twice", task_id="again", steps=4, ledger_path=str(ledger))
    assert first.status is TaskStatus.COMPLETED

    second = worker.rerun("again")

    assert second.status is TaskStatus.COMPLETED, second.last_error
    assert steps_of(second) == [1, 2, 3, 4]  # not 8: the stale checkpoints were reset
    assert len(second.execution_history) == len(first.execution_history)
    assert ledger_counts(ledger) == each_step("again", 4, times=2)


def test_rerun_of_an_unfinished_task_raises_task_not_resumable(embedded_runtime, ledger):
    rt = embedded_runtime
    queued = worker.submit(rt, "still queued", steps=2, ledger_path=str(ledger))
    running = worker.submit(rt, "running now", steps=2, ledger_path=str(ledger))
    assert rt.leases.claim(running, ELSEWHERE, lease_s=30) is not None

    for task_id, status in ((queued, "queued"), (running, "running")):
        with pytest.raises(TaskNotResumable) as raised:
            worker.rerun(task_id)
        assert raised.value.status == status
        assert rt.store.summary(task_id).status.value == status  # untouched
    assert not ledger.exists()


def test_stopping_the_worker_finishes_the_current_step_and_the_task_resumes_from_there(make_runtime, ledger):
    rt = make_runtime()
    thread, result = run_in_thread(prompt="interrupted", task_id="stopped", steps=20, step_delay_s=0.05,
                                   ledger_path=str(ledger))
    wait_until(lambda: checkpoint_count(rt, "stopped") >= 2, timeout_s=10, what="two checkpoints")

    rt.stop_embedded_worker()  # what SIGTERM does to a worker
    thread.join(timeout=10)

    stopped = result["record"]
    assert stopped.status is TaskStatus.RUNNING and stopped.lease is None
    done = stopped.checkpoint_count
    assert ledger_counts(ledger) == each_step("stopped", done)  # the step in flight finished and checkpointed

    make_runtime()  # a new process, as it were
    resumed = worker.resume("stopped")

    assert resumed.status is TaskStatus.COMPLETED, resumed.last_error
    assert steps_of(resumed) == list(range(1, 21))
    assert ledger_counts(ledger) == each_step("stopped", 20)


# -- threads ------------------------------------------------------------------------


def test_a_second_task_on_a_thread_starts_from_the_first_task_s_normalized_turns(embedded_runtime, ledger):
    first = worker.run_inline("what is in the ledger?", thread_id="chat-1", task_id="turn-1",
                              provider="tagged-final", steps=2, ledger_path=str(ledger))
    assert first.status is TaskStatus.COMPLETED
    assert first.final_response and "<tool_call>" in first.final_response

    second = worker.run_inline("and now?", thread_id="chat-1", task_id="turn-2", steps=1,
                               ledger_path=str(ledger))

    assert second.status is TaskStatus.COMPLETED, second.last_error
    state = load_resumable_state(embedded_runtime.store, "chat-1", before_task_id="turn-2")
    assert state is not None
    turns, note = state
    assert [(t.role, t.content) for t in turns] == [
        ("user", "what is in the ledger?"),
        ("assistant", "Done: 2 steps recorded in the ledger for turn-1."),  # the tag is stripped
    ]
    assert note is not None and note == first.latest_checkpoint_note

    opening = [(m.role, m.content) for m in second.execution_history[:4]]
    assert opening[:2] == [(t.role, t.content) for t in turns]
    assert opening[2][0] == "system" and note in opening[2][1]
    assert opening[3] == ("user", "and now?")
    assert ledger_counts(ledger) == each_step("turn-1", 2) + each_step("turn-2", 1)


def test_a_task_on_a_new_thread_starts_from_its_prompt_alone(embedded_runtime):
    record = worker.run_inline("fresh start", thread_id="chat-new", steps=1)

    assert record.execution_history[0].role == "user"
    assert record.execution_history[0].content == "fresh start"
    assert not any(m.role == "system" for m in record.execution_history)


# -- leases -------------------------------------------------------------------------


def test_a_live_lease_held_elsewhere_blocks_the_task_until_it_expires(clocked_runtime, clock, ledger):
    rt = clocked_runtime(lease_s=30)
    task_id = worker.submit(rt, "contested", steps=2, ledger_path=str(ledger))
    assert rt.leases.claim(task_id, ELSEWHERE, lease_s=30) is not None

    assert execute_task(rt, task_id) is None
    assert not ledger.exists()
    summary = rt.store.summary(task_id)
    assert summary.checkpoint_count == 0 and summary.lease is not None and summary.lease.owner == "other"

    clock.advance(31)
    assert execute_task(rt, task_id) is TaskStatus.COMPLETED

    record = rt.store.get(task_id)
    # The takeover of the expired lease counted as a recovery; the steps stored since then reset the count.
    [resumed] = [event for event in rt.store.traces(task_id) if event.event_type == "resumed"]
    assert resumed.data["recovery_count"] == 1
    assert record.recovery_count == 0
    assert steps_of(record) == [1, 2]
    assert ledger_counts(ledger) == each_step(task_id, 2)


def test_the_same_task_delivered_to_two_threads_at_once_runs_once(embedded_runtime, ledger):
    rt = embedded_runtime
    task_id = worker.submit(rt, "delivered twice", steps=4, step_delay_s=0.02, ledger_path=str(ledger))
    barrier = threading.Barrier(2)
    results: list[Optional[TaskStatus]] = []

    def deliver() -> None:
        barrier.wait()
        results.append(execute_task(rt, task_id))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert Counter(results) == Counter({TaskStatus.COMPLETED: 1, None: 1})
    assert steps_of(rt.store.get(task_id)) == [1, 2, 3, 4]
    assert ledger_counts(ledger) == each_step(task_id, 4)


@pytest.mark.parametrize("interruptions, expected", [(2, TaskStatus.COMPLETED), (3, TaskStatus.FAILED)])
def test_a_task_interrupted_more_often_than_max_recoveries_is_failed_as_poison(
    clocked_runtime, clock, ledger, interruptions, expected
):
    rt = clocked_runtime(max_recoveries=2, lease_s=30)
    task_id = worker.submit(rt, "poison", steps=2, ledger_path=str(ledger))
    for _ in range(interruptions):  # a worker claims it, then dies without a checkpoint
        assert rt.leases.claim(task_id, ELSEWHERE, lease_s=30) is not None
        clock.advance(31)

    assert execute_task(rt, task_id) is expected

    record = rt.store.get(task_id)
    assert record.status is expected
    if expected is TaskStatus.FAILED:
        assert record.last_error is not None and "LONGHAUL_MAX_RECOVERIES" in record.last_error
        assert not ledger.exists()
    else:
        assert ledger_counts(ledger) == each_step(task_id, 2)


def test_a_dead_owner_on_this_host_is_taken_over_at_once(embedded_runtime, ledger, dead_pid):
    rt = embedded_runtime
    task_id = worker.submit(rt, "orphaned", steps=2, ledger_path=str(ledger))
    dead = Claimant(owner="dead-local", host=rt.claimant.host, pid=dead_pid)
    assert rt.leases.claim(task_id, dead, lease_s=3600) is not None

    assert execute_task(rt, task_id) is TaskStatus.COMPLETED
    assert ledger_counts(ledger) == each_step(task_id, 2)


def test_a_live_owner_on_this_host_is_not_taken_over(embedded_runtime, ledger):
    rt = embedded_runtime
    task_id = worker.submit(rt, "busy", steps=2, ledger_path=str(ledger))
    alive = Claimant(owner="live-local", host=rt.claimant.host, pid=os.getpid())
    assert rt.leases.claim(task_id, alive, lease_s=3600) is not None

    assert execute_task(rt, task_id) is None
    assert not ledger.exists()


def test_a_worker_whose_lease_was_taken_over_stops_at_its_next_checkpoint(embedded_runtime, ledger):
    rt = embedded_runtime
    task_id = worker.submit(rt, "taken over", steps=10, step_delay_s=0.1, ledger_path=str(ledger))
    results: list[Optional[TaskStatus]] = []
    thread = threading.Thread(target=lambda: results.append(execute_task(rt, task_id)))
    thread.start()
    wait_until(lambda: checkpoint_count(rt, task_id) >= 1, timeout_s=10, what="the first checkpoint")

    holder = rt.leases.holder(task_id)
    assert holder is not None and holder.token is not None
    assert rt.leases.claim(task_id, ELSEWHERE, lease_s=30, steal_token=holder.token) is not None
    at_takeover = checkpoint_count(rt, task_id)
    thread.join(timeout=10)

    assert results == [TaskStatus.RUNNING]  # interrupted, left to the new owner
    summary = rt.store.summary(task_id)
    assert summary.lease is not None and summary.lease.owner == "other"
    assert summary.checkpoint_count <= at_takeover + 1  # at most the step already being written
    assert sum(ledger_counts(ledger).values()) <= summary.checkpoint_count + 1


def test_resuming_a_task_whose_time_budget_is_spent_ends_it_timed_out_without_a_step(clocked_runtime, clock, ledger):
    rt = clocked_runtime(lease_s=5)
    task_id = worker.submit(rt, "out of time", steps=3, time_limit_s=10, ledger_path=str(ledger))
    assert rt.leases.claim(task_id, ELSEWHERE, lease_s=5)  # it started, then its worker died
    clock.advance(30)

    assert execute_task(rt, task_id) is TaskStatus.TIMED_OUT
    assert not ledger.exists()


def test_resume_of_a_task_that_a_live_worker_holds_raises_task_busy(embedded_runtime):
    task_id = worker.submit(embedded_runtime, "busy elsewhere", steps=2)
    assert embedded_runtime.leases.claim(task_id, ELSEWHERE, lease_s=3600)

    with pytest.raises(worker.TaskBusy):
        worker.resume(task_id)


def test_run_inline_reports_progress_step_by_step(embedded_runtime):
    seen: list[worker.Progress] = []

    record = worker.run_inline("watch me", task_id="watched", steps=3, step_delay_s=0.15, on_progress=seen.append)

    assert record.status is TaskStatus.COMPLETED
    steps_seen = [p.step for p in seen]
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] == 3
    assert len(set(steps_seen)) >= 2  # it reported while running, not only at the end
    assert all(p.task_id == "watched" and p.planned_steps == 3 for p in seen)
    assert seen[-1].last_tool == "ledger"


def test_the_heartbeat_keeps_a_long_step_s_lease_alive(make_runtime):
    rt = make_runtime(lease_s=0.6)  # renewed every 0.2 s
    thread, result = run_in_thread(prompt="one long step", task_id="long-step", steps=1, step_delay_s=1.5)
    wait_until(lambda: lease_of(rt, "long-step"), timeout_s=5, what="the task to be leased")
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # well past lease_s, still in step 1 (no checkpoint renews it)
        lease = lease_of(rt, "long-step")
        assert lease is not None and lease.expires_at.timestamp() > time.time(), "the lease lapsed mid-step"
        assert find_interrupted(rt) == []
        time.sleep(0.1)
    thread.join(timeout=10)

    assert result["record"].status is TaskStatus.COMPLETED


# -- recovery -------------------------------------------------------------------------


def test_find_interrupted_lists_exactly_the_tasks_nobody_runs_and_no_message_is_coming_for(
    clocked_runtime, clock, dead_pid
):
    rt = clocked_runtime(lease_s=30, redelivery_grace_s=60)
    here = rt.claimant.host

    def task(name: str) -> str:
        return worker.submit(rt, name, task_id=name)

    overdue = task("queued-overdue")
    clock.advance(61)  # its message should have arrived a minute ago
    task("queued-fresh")  # sent moments ago: not interrupted
    released = task("released")
    claim = rt.leases.claim(released, rt.claimant, lease_s=30)
    assert claim is not None and rt.leases.release(released, claim.token, redeliver_at=None)
    retrying = task("released-for-retry")
    claim = rt.leases.claim(retrying, rt.claimant, lease_s=30)
    assert claim is not None
    assert rt.leases.release(retrying, claim.token, redeliver_at=clock() + 10)  # its retry is due soon
    expired = task("lease-expired")
    assert rt.leases.claim(expired, Claimant(owner="gone", host="elsewhere", pid=2), lease_s=5)
    live_elsewhere = task("live-elsewhere")
    assert rt.leases.claim(live_elsewhere, ELSEWHERE, lease_s=3600)
    dead_local = task("dead-local")
    assert rt.leases.claim(dead_local, Claimant(owner="dead", host=here, pid=dead_pid), lease_s=3600)
    live_local = task("live-local")
    assert rt.leases.claim(live_local, Claimant(owner="me", host=here, pid=os.getpid()), lease_s=3600)
    finished = task("cancelled")
    worker.cancel(finished)
    clock.advance(6)  # the 5 s lease expires; nothing else is due yet

    found = {row.task_id: reason for row, reason in find_interrupted(rt)}

    assert set(found) == {overdue, released, expired, dead_local}
    assert "overdue" in found[overdue]
    assert "released" in found[released]
    assert "expired" in found[expired]
    assert str(dead_pid) in found[dead_local]
    for row, reason in find_interrupted(rt):
        assert interruption(row, host=here, now=clock(), grace_s=60) == reason


def test_a_recovery_pass_asks_the_os_once_per_holding_process_not_once_per_task(
    clocked_runtime, dead_pid, monkeypatch
):
    rt = clocked_runtime(lease_s=3600)
    here = rt.claimant.host
    live = Claimant(owner="me", host=here, pid=os.getpid(), pid_started_at=rt.claimant.pid_started_at)
    dead = Claimant(owner="dead", host=here, pid=dead_pid)
    held = {}
    for i in range(30):
        task_id = worker.submit(rt, f"held {i}", task_id=f"held-{i}")
        held[task_id] = dead if i % 3 == 0 else live
        assert rt.leases.claim(task_id, held[task_id], lease_s=3600)
    asked: list[tuple[int, Optional[float]]] = []
    real = identity.is_process_alive

    def counted(pid: int, started_at: Optional[float]) -> bool:
        asked.append((pid, started_at))
        return real(pid, started_at)

    monkeypatch.setattr(identity, "is_process_alive", counted)

    found = {row.task_id for row, _ in find_interrupted(rt)}

    assert found == {task_id for task_id, holder in held.items() if holder is dead}
    assert sorted(asked) == sorted({(live.pid, live.pid_started_at), (dead_pid, None)})  # 2 checks, not 30
    find_interrupted(rt)
    assert len(asked) == 4  # the next pass asks again: a process may have died meanwhile


def test_resend_interrupted_sends_each_interrupted_task_once_even_when_called_twice(
    clocked_runtime, clock, dead_pid
):
    rt = clocked_runtime(lease_s=30, redelivery_grace_s=60)
    queue = rt.broker.queues[rt.settings.queue_name]
    expired = worker.submit(rt, "expired", task_id="expired")
    assert rt.leases.claim(expired, ELSEWHERE, lease_s=30)
    dead_local = worker.submit(rt, "dead", task_id="dead-local")
    assert rt.leases.claim(dead_local, Claimant(owner="dead", host=rt.claimant.host, pid=dead_pid),
                           lease_s=3600)
    released = worker.submit(rt, "released", task_id="released")
    claim = rt.leases.claim(released, rt.claimant, lease_s=30)
    assert claim is not None and rt.leases.release(released, claim.token, redeliver_at=None)
    clock.advance(31)
    overdue = worker.submit(rt, "overdue", task_id="overdue")
    clock.advance(61)
    assert queue.qsize() == 0

    first = resend_interrupted(rt)
    second = resend_interrupted(rt)

    assert sorted(first) == sorted([expired, dead_local, released, overdue])
    assert second == []
    assert queue.qsize() == 4
    assert find_interrupted(rt) == []


def interrupted_elsewhere(rt: Runtime, clock: FakeClock, count: int) -> list[str]:
    """`count` tasks leased (30 s) by a worker elsewhere that stopped renewing: their leases have expired."""
    task_ids = [worker.submit(rt, f"job {i}", task_id=f"job-{i:03d}") for i in range(count)]
    for task_id in task_ids:
        assert rt.leases.claim(task_id, ELSEWHERE, lease_s=30)
    clock.advance(31)
    return task_ids


@pytest.mark.backends("sqlite", "postgres")
def test_interrupted_tasks_are_taken_in_one_transaction_unless_they_changed_since_the_scan(
    clocked_runtime, clock
):
    rt = clocked_runtime(lease_s=30, redelivery_grace_s=60)
    leased = [worker.submit(rt, f"leased {i}", task_id=f"leased-{i}") for i in range(5)]
    for task_id in leased:
        assert rt.leases.claim(task_id, ELSEWHERE, lease_s=30)
    clock.advance(31)
    unsent = worker.submit(rt, "unsent", task_id="unsent")  # queued, its message overdue
    clock.advance(61)
    rows = [row for row, _reason in find_interrupted(rt)]
    assert {row.task_id for row in rows} == {*leased, unsent}
    before = {t: rt.store.get(t).recovery_count for t in [*leased, unsent]}
    # Between the scan and the take: one is claimed by another worker, one finishes, one's message is sent.
    token_at_scan = {row.task_id: row.token for row in rows}
    assert rt.leases.claim(leased[1], ELSEWHERE, lease_s=30, steal_token=token_at_scan[leased[1]]) is not None
    rt.store.finish(leased[3], TaskStatus.CANCELLED, last_error="cancelled meanwhile")
    rt.leases.note_sent(unsent)

    taken = rt.leases.take_all_for_redelivery(rows)

    assert taken == [row.task_id for row in rows if row.task_id in {leased[0], leased[2], leased[4]}]
    assert rt.leases.take_all_for_redelivery(rows) == []  # what was taken changed: a second scan wins nothing
    after = {t: rt.store.get(t).recovery_count for t in before}
    # Cleared leases count as recoveries (as the other worker's takeover of an expired one did).
    assert {t for t in before if after[t] != before[t]} == {*taken, leased[1]}
    assert all(after[t] == before[t] + 1 for t in taken)
    assert all(rt.leases.holder(t).token is None for t in taken)
    assert rt.leases.holder(leased[1]).token is not None  # the new holder keeps it


@pytest.mark.backends("sqlite", "postgres")
def test_a_recovery_pass_over_hundreds_of_interrupted_tasks_takes_them_in_batches(
    clocked_runtime, clock, monkeypatch
):
    rt = clocked_runtime(lease_s=30)
    queue = rt.broker.queues[rt.settings.queue_name]
    task_ids = interrupted_elsewhere(rt, clock, 450)
    batches: list[int] = []
    take_all = rt.leases.take_all_for_redelivery
    monkeypatch.setattr(rt.leases, "take_all_for_redelivery", lambda rows: batches.append(len(rows)) or take_all(rows))

    def one_by_one(row):
        raise AssertionError("taken one transaction each")

    monkeypatch.setattr(rt.leases, "take_for_redelivery", one_by_one)

    sent = resend_interrupted(rt)

    assert sorted(sent) == sorted(task_ids)
    assert batches == [200, 200, 50]  # TAKE_BATCH at a time
    assert queue.qsize() == len(task_ids)


@pytest.mark.backends("postgres")
def test_a_row_locked_past_the_lock_timeout_is_skipped_alone_and_taken_on_a_later_pass(
    clocked_runtime, clock, db_url
):
    import psycopg

    rt = clocked_runtime(lease_s=30)
    task_ids = interrupted_elsewhere(rt, clock, 6)
    with psycopg.connect(db_url) as stuck:  # a paused worker inside its checkpoint transaction
        stuck.execute("SELECT 1 FROM task WHERE task_id = %s FOR UPDATE", (task_ids[2],))

        first = resend_interrupted(rt)

    assert sorted(first) == sorted(set(task_ids) - {task_ids[2]})
    assert resend_interrupted(rt) == [task_ids[2]]  # the lock is gone: the next pass takes it


def test_concurrent_recovery_scans_send_each_interrupted_task_once(clocked_runtime, clock):
    rt = clocked_runtime(lease_s=30)
    queue = rt.broker.queues[rt.settings.queue_name]
    task_ids = interrupted_elsewhere(rt, clock, 6)
    barrier = threading.Barrier(4)
    sent: list[str] = []

    def scan() -> None:
        barrier.wait()
        sent.extend(resend_interrupted(rt))

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert sorted(sent) == sorted(task_ids)
    assert queue.qsize() == len(task_ids)


# -- limits and bad input -------------------------------------------------------------


def test_a_task_past_its_time_limit_ends_timed_out(embedded_runtime, ledger):
    started = time.monotonic()
    record = worker.run_inline("slow", task_id="slow", steps=50, step_delay_s=0.1, time_limit_s=1,
                               ledger_path=str(ledger))

    assert record.status is TaskStatus.TIMED_OUT
    assert time.monotonic() - started < 10
    assert record.checkpoint_count < 50
    assert steps_of(record) == list(range(1, record.checkpoint_count + 1))
    assert sum(ledger_counts(ledger).values()) <= record.checkpoint_count + 1  # at most the step in flight
    assert record.lease is None


def test_a_task_that_needs_more_steps_than_max_steps_fails_naming_max_steps(embedded_runtime, ledger):
    record = worker.run_inline("too long", task_id="capped", steps=5, max_steps=3, ledger_path=str(ledger))

    assert record.status is TaskStatus.FAILED
    assert record.last_error is not None and "max_steps" in record.last_error
    assert steps_of(record) == [1, 2, 3]
    assert ledger_counts(ledger) == each_step("capped", 3)


def test_a_tool_call_with_invalid_arguments_becomes_a_failed_result_and_the_task_goes_on(embedded_runtime):
    record = worker.run_inline("call a tool badly", provider="bad-arguments")

    assert record.status is TaskStatus.COMPLETED, record.last_error
    [checkpoint] = record.checkpoints
    [item] = checkpoint.items
    assert item.tool_name == "ledger" and item.success is False
    assert "line" in item.output
    tool_message = record.execution_history[2]
    assert tool_message.role == "tool" and "line" in tool_message.content
    assert record.final_response is not None and "line" in record.final_response  # the model saw the error


def test_a_corrupt_stored_spec_fails_that_task_naming_the_field_and_others_still_run(embedded_runtime, ledger):
    rt = embedded_runtime
    broken = worker.submit(rt, "will be corrupted", task_id="broken", steps=2, ledger_path=str(ledger))
    rt.store.db.execute_sql("UPDATE task SET spec = '{bad' WHERE task_id = ?", (broken,))

    assert execute_task(rt, broken) is TaskStatus.FAILED
    record = rt.store.summary(broken)
    assert record.status is TaskStatus.FAILED
    assert record.last_error is not None and "spec" in record.last_error
    assert not ledger.exists()

    healthy = worker.run_inline("unaffected", task_id="healthy", steps=2, ledger_path=str(ledger))
    assert healthy.status is TaskStatus.COMPLETED
    assert ledger_counts(ledger) == each_step("healthy", 2)


@pytest.fixture
def broken_and_healthy_interrupted(clocked_runtime, clock, ledger) -> tuple[Runtime, str, str]:
    """Two interrupted tasks (expired leases); the older one's stored spec is corrupt."""
    rt = clocked_runtime(lease_s=30)
    broken = worker.submit(rt, "corrupt", task_id="broken", steps=2, ledger_path=str(ledger))
    healthy = worker.submit(rt, "fine", task_id="healthy", steps=2, ledger_path=str(ledger))
    assert rt.leases.claim(broken, ELSEWHERE, lease_s=30)
    clock.advance(1)  # the recovery scan meets the broken task first
    assert rt.leases.claim(healthy, ELSEWHERE, lease_s=30)
    rt.store.db.execute_sql("UPDATE task SET spec = '{bad' WHERE task_id = ?", (broken,))
    clock.advance(31)
    return rt, broken, healthy


def test_a_recovery_pass_is_not_blocked_by_a_task_with_a_corrupt_spec(broken_and_healthy_interrupted):
    rt, _broken, healthy = broken_and_healthy_interrupted

    sent = resend_interrupted(rt)

    assert healthy in sent
    assert rt.broker.queues[rt.settings.queue_name].qsize() >= 1


def test_resume_interrupted_is_not_blocked_by_a_task_with_a_corrupt_spec(broken_and_healthy_interrupted, ledger):
    rt, broken, healthy = broken_and_healthy_interrupted

    records = {record.task_id: record for record in worker.resume_interrupted()}

    assert records[healthy].status is TaskStatus.COMPLETED
    assert ledger_counts(ledger) == each_step(healthy, 2)
    assert rt.store.summary(broken).status is not TaskStatus.COMPLETED
