"""`TaskRun` runs with the parts it is handed: a provider object, a tool table, the store's clock.

Nothing here registers a provider or tool in the process or assigns a
clock after the fact; the run below is the worker's own code path, from a
claimed lease to the finished task.
"""

from __future__ import annotations

from datetime import timezone
from typing import Iterator

import pytest
from pydantic import BaseModel

from longhaul.models import TaskStatus, ToolCall
from longhaul.worker import Runtime, load_settings
from longhaul.worker.api import submit
from longhaul.worker.loop import TaskRun
from longhaul.worker.providers import PROVIDERS, AssistantTurn, StepContext
from longhaul.worker.testing import FakeClock
from longhaul.worker.tools import TOOLS, ToolContext, define_tool


class EchoArguments(BaseModel):
    text: str


@define_tool("echo")
def echo(args: EchoArguments, ctx: ToolContext) -> str:
    """Say the text back, with the call's idempotency key."""
    return f"{args.text} ({ctx.idempotency_key})"


class EchoTwice:
    """Asks for `echo` at steps 1 and 2, then answers."""

    name = "echo-twice"

    def __init__(self) -> None:
        self.steps_seen: list[int] = []

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        self.steps_seen.append(ctx.step_index)
        assert [t.name for t in ctx.tools] == ["echo"]  # the run offers the tools it was handed
        if ctx.step_index > 2:
            return AssistantTurn("echoed twice")
        return AssistantTurn(f"step {ctx.step_index}",
                             [ToolCall(id=f"c{ctx.step_index}", name="echo", arguments={"text": "hi"})])


@pytest.fixture
def runtime(db_url: str, clock: FakeClock) -> Iterator[Runtime]:
    """An embedded runtime (its worker never started) whose store follows `clock`."""
    rt = Runtime(load_settings(database_url=db_url, redis_url=None, traces=False), embedded=True, clock=clock)
    yield rt
    rt.store.close_all()


def test_a_run_asks_the_provider_it_is_handed_and_calls_only_the_tools_it_is_handed(runtime, clock):
    task_id = submit(runtime, "echo", provider="scripted", task_id="handed")
    claim = runtime.leases.claim(task_id, runtime.claimant, lease_s=30)
    assert claim is not None
    provider = EchoTwice()

    status = TaskRun(runtime, claim, provider=provider, tools={"echo": echo}).run()

    assert status is TaskStatus.COMPLETED
    assert provider.steps_seen == [1, 2, 3]
    record = runtime.store.get(task_id)
    assert record.final_response == "echoed twice"
    assert [(c.step_index, c.items[0].output) for c in record.checkpoints] == [
        (1, "hi (handed:1:0)"), (2, "hi (handed:2:0)")]
    # The store's clock is the run's: every timestamp is the fake one, which never moved.
    assert {c.created_at.replace(tzinfo=timezone.utc).timestamp() for c in record.checkpoints} == {clock()}
    assert "echo" not in TOOLS and "echo-twice" not in PROVIDERS  # nothing was registered on the way


def test_a_run_handed_a_tool_table_refuses_a_registered_tool_it_was_not_handed(runtime):
    task_id = submit(runtime, "ledger please", provider="scripted", task_id="not-handed", steps=1)
    claim = runtime.leases.claim(task_id, runtime.claimant, lease_s=30)
    assert claim is not None

    status = TaskRun(runtime, claim, tools={"echo": echo}).run()  # the scripted provider asks for `ledger`

    assert status is TaskStatus.COMPLETED
    [checkpoint] = runtime.store.get(task_id).checkpoints
    [item] = checkpoint.items
    assert item.tool_name == "ledger" and not item.success and "unknown tool 'ledger'" in item.output


class HeldAtDone:
    """Live output that notes which leases its process still holds when a run's `done` goes out."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.held: list[list[str]] = []

    def publisher(self, task_id: str, thread_id: str) -> HeldAtDone:
        return self

    def __call__(self, event_type: str, data: dict) -> None:
        pass

    def publish_done(self) -> None:
        self.held.append(self.rt.held_tokens())


def test_a_finished_run_holds_no_lease_while_its_live_output_s_done_goes_out(db_url: str, clock: FakeClock):
    # A renewal meanwhile would find the lease gone and warn that it was lost (hundreds of finished tasks
    # waiting on Redis at once: "191 of 191 leases were lost").
    rt = Runtime(load_settings(database_url=db_url, redis_url=None), embedded=True, clock=clock)
    live = HeldAtDone(rt)
    rt.live = live  # type: ignore[assignment]
    task_id = submit(rt, "echo", provider="scripted", task_id="live-done")
    claim = rt.leases.claim(task_id, rt.claimant, lease_s=30)
    assert claim is not None
    rt.track(claim)  # as `execute_task` does

    status = TaskRun(rt, claim, provider=EchoTwice(), tools={"echo": echo}).run()
    rt.store.close_all()

    assert status is TaskStatus.COMPLETED
    assert live.held == [[]]
