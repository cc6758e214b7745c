"""Agents: registered on definition, stored with each task, their instructions seen exactly once."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
from dramatiq.middleware import Shutdown

from longhaul import Agent, AssistantTurn, Budget, ChatMessage, StepContext, TaskStatus, ToolCall
from longhaul.models import InvalidInput
from longhaul.worker import agents
from longhaul.worker import api as worker
from longhaul.worker.agents import DuplicateAgent, UnknownAgent
from longhaul.worker.execute import execute_task
from longhaul.worker.providers import PROVIDERS


class Recording:
    """Two ledger steps, then an answer; records the history it is shown on every call.

    With `stop_at`, the worker shuts down once when asked for that step (before it answers).
    """

    name = "recording"
    seen: list[list[ChatMessage]] = []
    stop_at: Optional[int] = None

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        if ctx.step_index == type(self).stop_at:
            type(self).stop_at = None
            raise Shutdown()
        type(self).seen.append(list(ctx.history))
        if ctx.step_index > 2:
            return AssistantTurn(f"answer of {ctx.task_id}")
        return AssistantTurn(f"step {ctx.step_index}", [ToolCall(id=f"c{ctx.step_index}", name="ledger",
                                                                 arguments={"line": f"step {ctx.step_index}"})])


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agents, "AGENTS", {})
    monkeypatch.setitem(PROVIDERS, Recording.name, Recording)
    monkeypatch.setattr(Recording, "seen", [])
    monkeypatch.setattr(Recording, "stop_at", None)


def system_messages(history: list[ChatMessage]) -> list[str]:
    return [m.content for m in history if m.role == "system"]


def test_an_agent_registers_itself_under_its_name_when_defined():
    helper = Agent(name="helper", instructions="Be brief.", provider="recording", tools=["ledger"])

    assert agents.get_agent("helper") is helper
    assert helper.spec.tools == ["ledger"] and helper.spec.instructions == "Be brief."
    assert helper.defined_at == f"{__file__}:{helper.defined_at.rsplit(':', 1)[1]}"


def test_two_agents_with_one_name_is_an_error_naming_both_definitions():
    first = Agent(name="twin", instructions="one")
    with pytest.raises(DuplicateAgent) as caught:
        Agent(name="twin", instructions="two")

    message = str(caught.value)
    assert first.defined_at in message and f"{__file__}:" in message.split(" and at ")[1]
    assert agents.get_agent("twin") is first


def test_the_same_definition_run_again_replaces_itself_as_a_module_reload_does():
    made = [Agent(name="reloaded", instructions=f"take {i}") for i in range(2)]  # one definition site

    assert agents.get_agent("reloaded") is made[1]


def test_a_bad_agent_field_is_refused_naming_it():
    with pytest.raises(InvalidInput, match="max_steps"):
        Agent(name="bad", max_steps=0)
    with pytest.raises(InvalidInput, match="name"):
        Agent(name="has space")


def test_the_version_is_a_short_hash_that_changes_with_any_field_and_only_then():
    base = dict(name="v", instructions="Be brief.", provider="recording", model="m1", options={"steps": 2})
    version = Agent(**base).version
    agents.AGENTS.clear()
    assert Agent(**base).version == version
    for change in (dict(instructions="Be verbose."), dict(model="m2"), dict(options={"steps": 3}),
                   dict(budget=Budget(max_model_calls=3)), dict(tools=["ledger"]), dict(max_steps=9)):
        agents.AGENTS.clear()
        assert Agent(**{**base, **change}).version != version, change
    assert len(version) == agents.VERSION_CHARS


def test_a_task_runs_its_agent_with_the_instructions_as_the_first_message_and_stores_the_definition(
    embedded_runtime,
):
    helper = Agent(name="helper", instructions="Be brief.", provider="recording", model="rec-1", tools=["ledger"])

    record = worker.run_inline("go", agent="helper", task_id="a1")

    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert (record.provider, record.model) == ("recording", "rec-1")
    assert record.spec is not None and record.spec.agent == helper.spec
    assert record.spec.options["tools"] == ["ledger"]
    for history in Recording.seen:
        assert history[0] == ChatMessage.system("Be brief.")
        assert system_messages(history) == ["Be brief."]
    assert [m.role for m in record.execution_history[:2]] == ["system", "user"]


def test_explicit_arguments_override_the_agent_s_fields(embedded_runtime, tmp_path: Path):
    Agent(name="counter", provider="scripted", model="scripted-v1", max_steps=10, options={"steps": 5})

    record = worker.run_inline("go", agent="counter", task_id="a2", model="scripted-v2", steps=2,
                               ledger_path=str(tmp_path / "ledger"))

    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert record.model == "scripted-v2" and record.checkpoint_count == 2
    assert record.spec is not None and record.spec.max_steps == 10 and record.spec.options["steps"] == 2


def test_a_task_in_flight_keeps_the_definition_it_started_with_after_the_agent_changes(embedded_runtime):
    old = Agent(name="deployed", instructions="Version one.", provider="recording")
    Recording.stop_at = 2
    worker.submit(embedded_runtime, "go", agent="deployed", task_id="in-flight")
    with pytest.raises(Shutdown):
        execute_task(embedded_runtime, "in-flight")  # interrupted after step 1, as by a deploy
    agents.AGENTS.clear()
    new = Agent(name="deployed", instructions="Version two.", provider="recording")  # the new deploy
    worker.submit(embedded_runtime, "go", agent="deployed", task_id="after-deploy")

    execute_task(embedded_runtime, "in-flight")
    execute_task(embedded_runtime, "after-deploy")

    store = embedded_runtime.store
    assert old.version != new.version
    assert store.task_spec("in-flight").agent == old.spec and store.task_spec("after-deploy").agent == new.spec
    assert system_messages(store.get("in-flight").execution_history) == ["Version one."]
    assert system_messages(store.get("after-deploy").execution_history) == ["Version two."]


def test_the_instructions_are_seen_exactly_once_after_a_resume(embedded_runtime):
    Agent(name="resumed", instructions="Say little.", provider="recording")
    Recording.stop_at = 2
    worker.submit(embedded_runtime, "go", agent="resumed", task_id="r1")
    with pytest.raises(Shutdown):
        execute_task(embedded_runtime, "r1")

    execute_task(embedded_runtime, "r1")

    record = embedded_runtime.store.get("r1")
    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert len(Recording.seen) == 3  # step 1, then steps 2 and 3 after the resume
    for history in Recording.seen:
        assert history[0] == ChatMessage.system("Say little.") and system_messages(history) == ["Say little."]
    assert system_messages(record.execution_history) == ["Say little."]


def test_a_continued_thread_sees_its_agent_s_instructions_once_and_the_earlier_turns(embedded_runtime):
    Agent(name="chat", instructions="Stay on topic.", provider="recording")
    worker.run_inline("first question", agent="chat", thread_id="t-1", task_id="turn-1")
    Recording.seen.clear()

    second = worker.run_inline("second question", agent="chat", thread_id="t-1", task_id="turn-2")

    assert second.status is TaskStatus.COMPLETED, second.last_error
    first_view = Recording.seen[0]
    assert first_view[0] == ChatMessage.system("Stay on topic.")
    assert system_messages(first_view).count("Stay on topic.") == 1  # beside the thread's checkpoint note
    assert [m.content for m in first_view if m.role == "user"] == ["first question", "second question"]
    assert "answer of turn-1" in [m.content for m in first_view if m.role == "assistant"]


def test_an_unknown_agent_is_refused_at_enqueue_naming_it_and_the_app_setting(embedded_runtime):
    with pytest.raises(UnknownAgent, match="'nobody'.*LONGHAUL_APP"):
        worker.run_inline("go", agent="nobody")
    assert embedded_runtime.store.count_tasks() == 0
