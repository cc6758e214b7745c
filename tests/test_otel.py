"""OpenTelemetry spans: one per run, model call and tool call, with the GenAI attributes; one trace per task.

In-process runs with the SDK's in-memory exporter check the spans'
shape; a real worker process with ``OTEL_TRACES_EXPORTER=console`` checks
the environment-only configuration and that a resume after SIGKILL
continues the task's trace (tests/test_metrics.py's pool does the kill).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterator

import pytest
from pydantic import BaseModel

from longhaul.models import TaskStatus, ToolCall, Usage
from longhaul.worker import Runtime, load_settings
from longhaul.worker.api import submit
from longhaul.worker.errors import TransientProviderError
from longhaul.worker.loop import TaskRun
from longhaul.worker.providers import AssistantTurn, StepContext
from longhaul.worker.tools import ToolContext, define_tool

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from longhaul.worker.otel import OtelObserver  # noqa: E402


class LookupArguments(BaseModel):
    key: str


@define_tool("lookup")
def lookup(args: LookupArguments, ctx: ToolContext) -> str:
    """Answer a fixed value."""
    return f"value of {args.key}"


class FlakyAtStepTwo:
    """Calls `lookup` at steps 1 and 2, answers at 3; step 2 first fails once (a rate limit)."""

    name = "flaky"

    def __init__(self) -> None:
        self.failed = False

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        if ctx.step_index == 2 and not self.failed:
            self.failed = True
            raise TransientProviderError("rate limited", status_code=429)
        usage = Usage(input_tokens=10 * ctx.step_index, output_tokens=ctx.step_index, request_count=1)
        if ctx.step_index > 2:
            return AssistantTurn("the <b>answer</b>", usage=usage)
        return AssistantTurn(f"step {ctx.step_index}", [ToolCall(id=f"call-{ctx.step_index}", name="lookup",
                                                                 arguments={"key": "k"})], usage=usage)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced_runtime(db_url: str, spans: InMemorySpanExporter) -> Iterator[Runtime]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    rt = Runtime(load_settings(database_url=db_url, redis_url=None), embedded=True,
                 observer=OtelObserver(provider))
    yield rt
    rt.store.close_all()


def run_interrupted_then_resumed(rt: Runtime) -> str:
    task_id = submit(rt, "look it up", provider="scripted", task_id="traced", thread_id="thread-7")
    provider = FlakyAtStepTwo()
    for expected in (None, TaskStatus.COMPLETED):
        claim = rt.leases.claim(task_id, rt.claimant, lease_s=30)
        assert claim is not None
        run = TaskRun(rt, claim, provider=provider, tools={"lookup": lookup})
        if expected is None:
            with pytest.raises(TransientProviderError):
                run.run()
        else:
            assert run.run() is expected
    return task_id


def by_name(spans: InMemorySpanExporter) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for span in spans.get_finished_spans():
        found.setdefault(span.name, []).append(span)
    return found


def test_a_task_run_has_agent_model_and_tool_spans_with_the_genai_attributes(traced_runtime, spans):
    task_id = run_interrupted_then_resumed(traced_runtime)

    named = by_name(spans)
    assert sorted((name, len(found)) for name, found in named.items()) == [
        ("chat scripted-v1", 4), ("execute_tool lookup", 2), ("invoke_agent scripted", 2)]
    first_run, second_run = sorted(named["invoke_agent scripted"], key=lambda span: span.start_time)
    assert first_run.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert first_run.attributes["gen_ai.agent.name"] == "scripted"
    assert first_run.attributes["gen_ai.conversation.id"] == "thread-7"
    assert first_run.attributes["longhaul.task.id"] == task_id
    assert second_run.attributes["longhaul.task.status"] == "completed"
    failed = [span for span in named["chat scripted-v1"] if "error.type" in span.attributes]
    assert [span.attributes["error.type"] for span in failed] == ["TransientProviderError"]
    answered = [span for span in named["chat scripted-v1"] if "error.type" not in span.attributes]
    assert sorted(span.attributes["gen_ai.usage.input_tokens"] for span in answered) == [10, 20, 30]
    assert {span.attributes["gen_ai.request.model"] for span in answered} == {"scripted-v1"}
    assert {span.attributes["gen_ai.provider.name"] for span in answered} == {"scripted"}
    assert all("gen_ai.output.messages" not in span.attributes for span in answered)  # content only on opt-in
    tools = named["execute_tool lookup"]
    assert sorted(span.attributes["gen_ai.tool.call.id"] for span in tools) == ["call-1", "call-2"]
    assert {span.attributes["gen_ai.tool.name"] for span in tools} == {"lookup"}
    # Children of their run's span.
    assert {span.parent.span_id for span in tools} <= {first_run.context.span_id, second_run.context.span_id}


def test_a_resumed_run_continues_the_trace_stored_with_the_task(traced_runtime, spans):
    task_id = run_interrupted_then_resumed(traced_runtime)

    finished = spans.get_finished_spans()
    assert len({span.context.trace_id for span in finished}) == 1
    first_run, second_run = sorted(by_name(spans)["invoke_agent scripted"], key=lambda span: span.start_time)
    assert first_run.parent is None and second_run.parent.span_id == first_run.context.span_id
    stored = traced_runtime.store.trace_parent(task_id)
    assert stored == f"{first_run.context.trace_id:032x}-{first_run.context.span_id:016x}"


def test_message_content_goes_into_spans_only_when_the_user_opts_in(traced_runtime, spans, monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    run_interrupted_then_resumed(traced_runtime)

    contents = [json.loads(span.attributes["gen_ai.output.messages"]) for span in by_name(spans)["chat scripted-v1"]
                if "gen_ai.output.messages" in span.attributes]
    assert [message["parts"][0]["content"] for [message] in contents][-1] == "the <b>answer</b>"


def test_without_otel_variables_neither_the_sdk_nor_prometheus_client_is_imported(tmp_path):
    import subprocess

    # (redis-py itself imports the OpenTelemetry *API* when it is installed: not ours to avoid.)
    code = ("import sys; from longhaul.worker.runtime import observer_from_environment, NULL_OBSERVER;"
            "assert observer_from_environment() is NULL_OBSERVER;"
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'prometheus_client'))))")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
