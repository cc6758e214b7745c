"""Strict API: every keyword is a declared parameter or an option the provider or a tool declares.

Anything else, or a value of the wrong type, is `InvalidInput` naming it, and nothing is stored.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from longhaul import AssistantTurn, Budget, InvalidInput, StepContext, ToolContext, register_provider, tool
from longhaul.worker import api as worker
from longhaul.worker import providers, tools


@pytest.fixture(autouse=True)
def own_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "PROVIDERS", dict(providers.PROVIDERS))
    monkeypatch.setattr(providers, "_OPTIONS_MODELS", {})


def refused(rt: Any, call: Any, *named: str) -> str:
    """Run `call`, which must raise `InvalidInput` naming each of `named`; nothing may be stored."""
    with pytest.raises(InvalidInput) as caught:
        call()
    message = str(caught.value)
    for name in named:
        assert f"{name}:" in message, message
    assert rt.store.count_tasks() == 0
    return message


def test_typos_are_refused_each_named_with_a_suggestion_before_anything_is_stored(embedded_runtime):
    message = refused(embedded_runtime, lambda: worker.run_inline("x", stesp=5, thread="t:1", temprature=0.2),
                      "stesp", "thread", "temprature")
    assert "stesp: unknown keyword; did you mean 'steps'?" in message
    assert "thread: unknown keyword; did you mean 'thread_id'?" in message
    assert "provider 'scripted'" in message  # which options were on offer


@pytest.mark.parametrize("kwargs, field", [
    (dict(steps="five"), "steps"),
    (dict(steps=-1), "steps"),
    (dict(step_delay_s="slow"), "step_delay_s"),
    (dict(max_steps="many"), "max_steps"),
    (dict(task_id=5), "task_id"),
    (dict(thread_id="has space"), "thread_id"),
    (dict(tools="ledger"), "tools"),
    (dict(budget=Budget), "budget"),
    (dict(time_limit_s="1h"), "time_limit_s"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_its_field(embedded_runtime, kwargs, field):
    refused(embedded_runtime, lambda: worker.run_inline("x", **kwargs), field)


def test_submit_refuses_what_run_inline_refuses(embedded_runtime):
    refused(embedded_runtime, lambda: worker.submit(embedded_runtime, "x", stesp=5), "stesp")
    refused(embedded_runtime, lambda: worker.submit(embedded_runtime, 42), "prompt")


@pytest.mark.parametrize("call", [
    lambda: worker.resume("t", on_progres=print),
    lambda: worker.rerun("t", follow=True),
    lambda: worker.cancel("t", now=True),
    lambda: worker.wait_for("t", timeout=3),
    lambda: worker.wait_for("t", timeout_s="soon"),
])
def test_the_other_public_functions_refuse_unknown_keywords_and_wrong_types(embedded_runtime, call):
    with pytest.raises(InvalidInput, match=r"^\w+: "):
        call()


def test_each_provider_takes_the_options_it_declares_and_no_other(embedded_runtime):
    refused(embedded_runtime, lambda: worker.submit(embedded_runtime, "x", provider="openai", steps=3), "steps")
    refused(embedded_runtime, lambda: worker.submit(embedded_runtime, "x", provider="openai", temperature="hot"),
            "temperature")
    refused(embedded_runtime, lambda: worker.submit(embedded_runtime, "x", provider="anthropic", temperature=0.2),
            "temperature")

    task_id = worker.submit(embedded_runtime, "x", provider="openai", temperature=0.2, seed=7,
                            ledger_path="ledger.txt")  # the ledger tool's option, for the ledger tool it may call

    assert embedded_runtime.store.task_spec(task_id).options == {"temperature": 0.2, "seed": 7,
                                                                  "ledger_path": "ledger.txt"}


def test_a_tool_s_options_are_accepted_only_for_a_task_that_may_call_it(embedded_runtime):
    refused(embedded_runtime, lambda: worker.submit(embedded_runtime, "x", tools=["read_file"], ledger_path="l"),
            "ledger_path")


class LoudArguments(BaseModel):
    text: str


class LoudOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    volume: int = 1


def test_a_user_tool_s_declared_options_are_taken_by_tasks_that_may_call_it(embedded_runtime, monkeypatch):
    monkeypatch.setattr(tools, "TOOLS", dict(tools.TOOLS))

    @tool(options=LoudOptions)
    def loud(args: LoudArguments, ctx: ToolContext) -> str:
        """Say it at the task's volume."""
        return args.text * int(ctx.options.get("volume", 1))

    task_id = worker.submit(embedded_runtime, "x", tools=["loud"], volume="3")
    assert embedded_runtime.store.task_spec(task_id).options == {"volume": 3, "tools": ["loud"]}
    with pytest.raises(InvalidInput, match="volume: unknown keyword"):
        worker.submit(embedded_runtime, "x", tools=["ledger"], volume=3)
    with pytest.raises(InvalidInput, match="tool 'loud' option: volume"):
        worker.submit(embedded_runtime, "x", volume="max")


class Custom:
    """A registered provider with options of its own."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        depth: int = 1

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        return AssistantTurn(f"depth {ctx.options.get('depth')}")


class Plain:
    """A provider that declares no options."""

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        return AssistantTurn("plain")


class DepthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    depth: int = 1
    width: int = 1


def test_a_registered_provider_s_declared_options_are_checked_and_reach_it(embedded_runtime):
    register_provider("custom", Custom)
    register_provider("plain", Plain)
    register_provider("explicit", Custom, options=DepthOptions)

    refused(embedded_runtime, lambda: worker.run_inline("x", provider="custom", depht=2), "depht")
    refused(embedded_runtime, lambda: worker.run_inline("x", provider="custom", depth="deep"), "depth")
    refused(embedded_runtime, lambda: worker.run_inline("x", provider="plain", tools=[], depth=2), "depth")
    refused(embedded_runtime, lambda: worker.run_inline("x", provider="custom", tools=[], width=2), "width")

    assert worker.run_inline("x", provider="custom", depth="3").final_response == "depth 3"  # converted
    assert worker.run_inline("x", provider="explicit", depth=4, width=2).final_response == "depth 4"


@pytest.mark.parametrize("factory, options", [("not callable", None), (Custom, dict)])
def test_register_provider_refuses_what_cannot_be_a_provider(factory, options):
    with pytest.raises(InvalidInput, match="register_provider"):
        register_provider("bad", factory, options=options)


def test_an_unknown_provider_or_tool_is_refused_naming_it_and_how_to_register_one(embedded_runtime):
    message = refused(embedded_runtime, lambda: worker.run_inline("x", provider="nope"), "provider")
    assert "'nope'" in message and "--app / LONGHAUL_APP" in message
    message = refused(embedded_runtime, lambda: worker.run_inline("x", tools=["nope"]), "tools")
    assert "'nope'" in message and "--app / LONGHAUL_APP" in message


@pytest.mark.parametrize("args, named", [
    (("run", "x", "--provider", "openai", "--steps", "3"), "steps: unknown keyword"),
    (("run", "x", "--max-cost-usd", "lots"), "--max-cost-usd"),
    (("run", "x", "--max-model-calls", "-1"), "--max-model-calls"),
    (("run", "x", "--agent", "nobody"), "agent: unknown agent 'nobody'"),
    (("enqueue", "x", "--app", "nosuch"), "app module 'nosuch'"),
])
def test_the_cli_refuses_the_same_with_one_line_and_exit_code_2(longhaul, db_url, args, named):
    result = longhaul(*args)

    assert result.returncode == 2, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr
    from longhaul.models import TaskStore

    with TaskStore(db_url) as store:
        assert store.count_tasks() == 0
