"""Budgets: a task stops exactly at its limit, counted from the store, across runs and a SIGKILL."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from dramatiq.middleware import Shutdown

from longhaul import AssistantTurn, Budget, StepContext, TaskStatus, TaskStore, ToolCall, Usage
from longhaul.models import InvalidInput
from longhaul.worker import api as worker
from longhaul.worker.agents import Agent
from longhaul.worker.execute import execute_task
from longhaul.worker.runtime import Runtime
from longhaul.worker.testing import ledger_counts, wait_until
from tests.fixtures.runtimes import with_providers

#: Usage each `Metered` turn reports.
TOKENS_PER_TURN = 100
COST_PER_TURN_USD = 0.25


class Metered:
    """Calls the ledger tool forever (it never answers); every turn costs 100 tokens and $0.25."""

    name = "metered-forever"
    calls = 0
    stop_at: Optional[int] = None

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        if ctx.step_index == type(self).stop_at:
            type(self).stop_at = None
            raise Shutdown()
        type(self).calls += 1
        line = f"{ctx.task_id} step {ctx.step_index}"
        return AssistantTurn(f"step {ctx.step_index}", [ToolCall(id=f"c{ctx.step_index}", name="ledger",
                                                                 arguments={"line": line})],
                             usage=Usage(input_tokens=80, output_tokens=20, request_count=1,
                                         cost_usd=COST_PER_TURN_USD))


class TwoCallsPerTurn:
    """Each turn asks for two ledger calls."""

    name = "two-calls"

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        calls = [ToolCall(id=f"c{ctx.step_index}-{i}", name="ledger",
                          arguments={"line": f"{ctx.task_id} step {ctx.step_index} call {i}"}) for i in (1, 2)]
        return AssistantTurn(f"step {ctx.step_index}", calls)


@pytest.fixture(autouse=True)
def fresh_fake_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Metered, "calls", 0)
    monkeypatch.setattr(Metered, "stop_at", None)


@pytest.fixture
def make_runtime(make_runtime: Callable[..., Runtime]) -> Callable[..., Runtime]:
    """This module's runtimes are handed its fake providers beside the built-in ones; nothing is registered."""
    return with_providers(make_runtime, Metered, TwoCallsPerTurn)


@pytest.fixture(autouse=True)
def no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    from longhaul.worker import agents

    monkeypatch.setattr(agents, "AGENTS", {})


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger.txt"


def budget_events(rt: Runtime, task_id: str) -> list[dict[str, Any]]:
    return [event.data for event in rt.store.traces(task_id) if event.event_type == "budget_exceeded"]


def test_a_model_call_budget_stops_a_looping_task_exactly_at_the_limit(embedded_runtime, ledger):
    record = worker.run_inline("loop", task_id="calls", steps=1000, ledger_path=str(ledger),
                               budget=Budget(max_model_calls=3))

    assert record.status is TaskStatus.FAILED
    assert record.last_error == "budget exceeded: max_model_calls=3, 3 model calls used"
    assert (record.turn_count, record.checkpoint_count) == (3, 3)
    assert ledger_counts(ledger) == {f"calls step {i}": 1 for i in (1, 2, 3)}
    assert budget_events(embedded_runtime, "calls") == [{"limit": "max_model_calls", "limit_value": 3, "used": 3}]


def test_a_tool_call_budget_runs_exactly_that_many_tools_and_no_more(embedded_runtime, ledger):
    record = worker.run_inline("loop", task_id="tools", provider="two-calls", ledger_path=str(ledger),
                               budget=Budget(max_tool_calls=3))

    assert record.status is TaskStatus.FAILED
    assert record.last_error == "budget exceeded: max_tool_calls=3, 3 tool calls used"
    # Step 1 ran both its calls; step 2 ran one, and the refused one never ran.
    assert ledger_counts(ledger) == {"tools step 1 call 1": 1, "tools step 1 call 2": 1, "tools step 2 call 1": 1}
    assert record.checkpoint_count == 1
    # Step 2 as far as it went; the refused call gets a result saying so, so the history stays valid.
    assert [m.role for m in record.execution_history[-3:]] == ["assistant", "tool", "tool"]
    assert record.execution_history[-1].content.startswith("[no result: this tool call did not complete: "
                                                           "the task ended (failed): budget exceeded")


def test_a_token_budget_stops_before_the_next_model_call_once_reached(embedded_runtime, ledger):
    record = worker.run_inline("loop", task_id="tokens", provider="metered-forever", ledger_path=str(ledger),
                               budget=Budget(max_tokens=2 * TOKENS_PER_TURN))

    assert record.status is TaskStatus.FAILED
    assert record.last_error == "budget exceeded: max_tokens=200, 200 tokens used"
    assert Metered.calls == 2 and record.usage.total_tokens == 200
    assert len(ledger_counts(ledger)) == 2


def test_a_cost_budget_passed_by_a_model_call_runs_none_of_its_tools(embedded_runtime, ledger):
    record = worker.run_inline("loop", task_id="cost", provider="metered-forever", ledger_path=str(ledger),
                               budget=Budget(max_cost_usd=0.6))

    assert record.status is TaskStatus.FAILED
    assert record.last_error == "budget exceeded: max_cost_usd=0.6, 0.75 USD used"
    assert Metered.calls == 3 and record.usage.cost_usd == pytest.approx(0.75)
    assert ledger_counts(ledger) == {"cost step 1": 1, "cost step 2": 1}  # step 3's call was paid, its tool not run
    assert budget_events(embedded_runtime, "cost")[0]["limit"] == "max_cost_usd"


def test_a_task_s_budget_overrides_its_agent_s_limit_by_limit(embedded_runtime, ledger):
    Agent(name="capped", budget=Budget(max_model_calls=5, max_tool_calls=4))

    record = worker.run_inline("loop", agent="capped", task_id="capped", steps=1000, ledger_path=str(ledger),
                               budget=Budget(max_model_calls=10))

    assert embedded_runtime.store.task_spec("capped").budget == Budget(max_model_calls=10, max_tool_calls=4)
    assert record.last_error == "budget exceeded: max_tool_calls=4, 4 tool calls used"


def test_a_task_within_its_budget_completes(embedded_runtime, ledger):
    record = worker.run_inline("count", task_id="fits", steps=3, ledger_path=str(ledger),
                               budget=Budget(max_model_calls=4, max_tool_calls=3))

    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert record.turn_count == 4


def test_a_budget_holds_across_a_resume_counting_what_the_first_run_stored(embedded_runtime, ledger):
    Metered.stop_at = 3  # the first run stops (as on SIGTERM) when asked for step 3
    worker.submit(embedded_runtime, "loop", task_id="split", provider="metered-forever", ledger_path=str(ledger),
                  budget=Budget(max_model_calls=4, max_tokens=10_000))
    with pytest.raises(Shutdown):
        execute_task(embedded_runtime, "split")
    assert embedded_runtime.store.summary("split").turn_count == 2

    execute_task(embedded_runtime, "split")

    record = embedded_runtime.store.get("split")
    assert record.last_error == "budget exceeded: max_model_calls=4, 4 model calls used"
    assert Metered.calls == 4 and record.turn_count == 4  # two before the stop, two after
    assert ledger_counts(ledger) == {f"split step {i}": 1 for i in (1, 2, 3, 4)}


def test_a_rerun_counts_the_task_s_earlier_runs_so_a_spent_budget_stays_spent(embedded_runtime, ledger):
    worker.run_inline("loop", task_id="again", steps=1000, ledger_path=str(ledger), budget=Budget(max_model_calls=2))

    record = worker.rerun("again")

    assert record.last_error == "budget exceeded: max_model_calls=2, 2 model calls used"
    assert len(ledger_counts(ledger)) == 2 and sum(ledger_counts(ledger).values()) == 2  # the rerun called nothing


@pytest.mark.parametrize("field, value", [("max_model_calls", -1), ("max_cost_usd", "lots"), ("max_tokens", 1.5)])
def test_a_bad_limit_is_refused_naming_it_before_anything_is_stored(embedded_runtime, field, value):
    with pytest.raises(InvalidInput, match=field):
        worker.run_inline("x", task_id="bad", budget={field: value})
    assert embedded_runtime.store.count_tasks() == 0


@pytest.mark.crash
def test_a_budget_stops_a_looping_task_exactly_at_the_limit_across_a_sigkill_and_resume(
    start_longhaul: Callable[..., Any], longhaul: Callable[..., Any], ledger: Path, db_url: str
):
    limit = 8
    running = start_longhaul("run", "loop forever", "--task-id", "b", "--steps", "100000", "--step-delay", "0.15",
                             "--ledger", str(ledger), "--max-model-calls", str(limit))
    wait_until(lambda: len(ledger_counts(ledger)) >= 3 or running.proc.poll() is not None, timeout_s=30,
               what="three steps before the kill")
    assert running.proc.poll() is None, running.stderr()
    running.proc.send_signal(signal.SIGKILL)
    running.proc.wait()
    with TaskStore(db_url) as store:
        at_kill = store.summary("b")
    assert at_kill.status is TaskStatus.RUNNING and 0 < at_kill.turn_count < limit

    result = longhaul("resume", "b", "--json")

    assert result.returncode == 1, result.stderr
    with TaskStore(db_url) as store:
        record = store.get("b")
        events = [e.event_type for e in store.traces("b")]
    assert record.status is TaskStatus.FAILED
    assert record.last_error == f"budget exceeded: max_model_calls={limit}, {limit} model calls used"
    assert (record.turn_count, record.checkpoint_count) == (limit, limit)
    assert events.count("budget_exceeded") == 1 and events.index("budget_exceeded") > events.index("resumed")
    counts = ledger_counts(ledger)
    assert set(counts) == {f"b step {i}" for i in range(1, limit + 1)}  # no step past the limit ever ran
    twice = [step for step, n in counts.items() if n > 1]
    assert twice in ([], [f"b step {at_kill.checkpoint_count + 1}"])  # only the step in flight at the kill
