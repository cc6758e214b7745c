"""OpenTelemetry spans of task runs, model calls and tool calls (the optional ``longhaul[otel]`` extra).

Configured only by the standard variables: ``OTEL_TRACES_EXPORTER``
(``console`` for a quick look, ``otlp`` for a collector, with
``OTEL_EXPORTER_OTLP_ENDPOINT`` and friends read by the exporter itself),
``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (the resource),
``OTEL_TRACES_SAMPLER`` (the SDK's sampler) and ``OTEL_SDK_DISABLED``.
Without ``OTEL_TRACES_EXPORTER`` (or an OTLP endpoint) nothing is imported:
tracing costs nothing when it is off or the extra is not installed.

Spans follow the GenAI semantic conventions: ``invoke_agent {agent}`` per
run of a task, ``chat {model}`` per model call, ``execute_tool {tool}`` per
tool call. A task's first traced run records its trace with the task
(`TaskStore.keep_trace_parent`); every later run (a resume after a crash,
a takeover) is a span of the same trace, a child of the first run's span.
Model and tool text goes into spans only with
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`` (redacted).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from typing import Any, Optional

from longhaul.models import TaskStatus
from longhaul.models.redact import redact_text

from .errors import SettingsError
from .observe import Committed, ModelCall, RunInfo, RunObserver, ToolCallRun, TraceParentStore

logger = logging.getLogger(__name__)

#: The instrumentation scope of longhaul's spans.
SCOPE = "longhaul"
#: `OTEL_TRACES_EXPORTER` names and the exporter entry point each loads (group ``opentelemetry_traces_exporter``).
EXPORTER_ALIASES = {"otlp": "otlp_proto_http"}
#: The standard opt-in for message content in GenAI spans.
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
#: Longest text put in one span attribute, in characters.
MAX_CONTENT_CHARS = 4_000


def _exporter_names() -> list[str]:
    """The exporters asked for; empty when tracing is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw and (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or
                    os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        raw = "otlp"
    return [name.strip() for name in raw.split(",") if name.strip() and name.strip() != "none"]


def tracing_observer() -> Optional[OtelObserver]:
    """An `OtelObserver` when ``OTEL_*`` asks for traces, else None (and nothing imported).

    `SettingsError` naming the variable when traces are asked for but the
    extra is not installed, or an exporter name is unknown.
    """
    names = _exporter_names()
    if not names:
        return None
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        raise SettingsError("OTEL_TRACES_EXPORTER: OpenTelemetry is not installed; "
                            "pip install 'longhaul[otel]' (or unset OTEL_TRACES_EXPORTER)")
    return OtelObserver(_tracer_provider(names))


def _tracer_provider(names: list[str]) -> Any:
    from importlib.metadata import entry_points

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    found = {point.name: point for point in entry_points(group="opentelemetry_traces_exporter")}
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME")
                                                        or "longhaul-worker"}))
    for name in names:
        point = found.get(EXPORTER_ALIASES.get(name, name))
        if point is None:
            raise SettingsError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (installed: "
                                f"{', '.join(sorted({'otlp', *found}))})")
        exporter = point.load()()
        # The console is for a quick look: each span printed when it ends. The rest is batched.
        processor = SimpleSpanProcessor if name == "console" else BatchSpanProcessor
        provider.add_span_processor(processor(exporter))
    return provider


def _ns(epoch_s: float) -> int:
    return int(epoch_s * 1e9)


def _capture_content() -> bool:
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() == "true"


class _OtelRun:
    """One run's `invoke_agent` span, the parent of its model and tool spans."""

    def __init__(self, observer: OtelObserver, run: RunInfo, remember: TraceParentStore) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

        self.trace = trace
        self.observer = observer
        self.run = run
        parent = remember.trace_parent(run.task_id)
        context = None
        if parent is not None:
            trace_hex, span_hex = parent.split("-", 1)
            context = trace.set_span_in_context(NonRecordingSpan(SpanContext(
                int(trace_hex, 16), int(span_hex, 16), is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))))
        self.span = observer.tracer.start_span(f"invoke_agent {run.agent}", context=context, kind=SpanKind.INTERNAL,
                                               attributes=self._common("invoke_agent") | {
                                                   "gen_ai.agent.name": run.agent,
                                                   "gen_ai.conversation.id": run.thread_id,
                                                   "longhaul.task.id": run.task_id,
                                                   "longhaul.run.resumed": run.resumed})
        self.context = trace.set_span_in_context(self.span)
        if parent is None:
            own = self.span.get_span_context()
            remember.keep_trace_parent(run.task_id, f"{own.trace_id:032x}-{own.span_id:016x}")

    def _common(self, operation: str) -> dict[str, Any]:
        return {"gen_ai.operation.name": operation, "gen_ai.provider.name": self.run.provider,
                "gen_ai.request.model": self.run.model}

    def model_call(self, call: ModelCall) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        attributes: dict[str, Any] = self._common("chat") | {"gen_ai.response.model": self.run.model,
                                                              "longhaul.step": call.step}
        if call.usage is not None:
            attributes["gen_ai.usage.input_tokens"] = call.usage.input_tokens
            attributes["gen_ai.usage.output_tokens"] = call.usage.output_tokens
        if call.content is not None and _capture_content():
            attributes["gen_ai.output.messages"] = json.dumps([{"role": "assistant", "parts": [
                {"type": "text", "content": redact_text(call.content)[:MAX_CONTENT_CHARS]}]}])
        span = self.observer.tracer.start_span(f"chat {self.run.model}", context=self.context, kind=SpanKind.CLIENT,
                                               start_time=_ns(call.started_s), attributes=attributes)
        if call.error_type is not None:
            span.set_attribute("error.type", call.error_type)
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=_ns(call.ended_s))

    def tool_call(self, call: ToolCallRun) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        span = self.observer.tracer.start_span(
            f"execute_tool {call.tool}", context=self.context, kind=SpanKind.INTERNAL, start_time=_ns(call.started_s),
            attributes=self._common("execute_tool") | {"gen_ai.tool.name": call.tool, "gen_ai.tool.call.id":
                                                       call.call_id, "longhaul.step": call.step})
        if not call.success:
            span.set_attribute("error.type", "ToolFailed")
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=_ns(call.ended_s))

    def committed(self, commit: Committed) -> None:
        pass

    def ended(self, status: TaskStatus, error_type: Optional[str]) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attribute("longhaul.task.status", status.value)
        if status in (TaskStatus.FAILED, TaskStatus.TIMED_OUT):
            self.span.set_attribute("error.type", error_type or status.value)
            self.span.set_status(Status(StatusCode.ERROR))
        self.span.end()


class OtelObserver:
    """Spans of this process's runs, through its own `TracerProvider` (never the global one)."""

    def __init__(self, tracer_provider: Any) -> None:
        self.tracer_provider = tracer_provider
        self.tracer = tracer_provider.get_tracer(SCOPE)

    def run_started(self, run: RunInfo, *, remember: TraceParentStore) -> RunObserver:
        return _OtelRun(self, run, remember)

    def recovery(self, reason: str) -> None:
        pass

    def takeover(self) -> None:
        pass

    def shutdown(self) -> None:
        """Export what is buffered (at worker shutdown)."""
        self.tracer_provider.shutdown()
