"""The agent step loop: ask the provider, run the tools, checkpoint, repeat.

The loop runs a task whose lease this process holds. It starts at the step
after the latest checkpoint, so a resumed task never repeats a completed
step; only a step in flight when the process died can run twice. Every
interruption is caught here and nowhere else, and each leaves the task
either finished or resumable.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Optional, Sequence

from dramatiq.middleware import CurrentMessage, Shutdown, TimeLimitExceeded

from longhaul.models import (
    ChatMessage,
    CheckpointItem,
    CheckpointUpdate,
    Claim,
    CorruptRecord,
    LeaseLost,
    StoreUnavailable,
    TaskRecord,
    TaskSpec,
    TaskStatus,
    ToolCall,
    TraceSequenceClash,
    Usage,
    load_resumable_state,
    strip_tool_call_tags,
)
from longhaul.models.redact import redact_text, scrub_configured
from longhaul.models.traces import NullTraceWriter, TraceWriter

from .budgets import BudgetExceeded, Spend, check_budget
from .context import WorkerContext
from .live import LivePublisher
from .observe import NULL_RUN, ObservedProvider, ObservedStore, RunInfo, RunObserver, ToolCallListener
from .providers import (
    PermanentProviderError,
    Provider,
    StepContext,
    TransientProviderError,
    UnknownProvider,
    create_provider,
)
from .tools import Tool, ToolContext, UnknownTool, allowed_tools, checkpoint_item, run_tool_call, validate_tool_names

logger = logging.getLogger(__name__)


#: Errors worth a Dramatiq retry (with backoff) from the latest checkpoint.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (TransientProviderError, StoreUnavailable)


class _TaskFailed(Exception):
    """Internal: stop the loop and mark the task failed with this message."""


def run_claimed_task(rt: WorkerContext, claim: Claim) -> TaskStatus:
    """Run the task until it finishes or is interrupted; returns its status then.

    `running` means the task was interrupted and is resumable (shutdown,
    lease lost). Transient errors release the lease and re-raise, so that
    Dramatiq's Retries middleware redelivers the message after a backoff.
    """
    return TaskRun(rt, claim).run()


class TaskRun:
    """One claimed run of a task: its tracer, its usage so far, and how it ends.

    The run asks `provider` (default: the one the task names, built from
    the process's providers with its settings) and calls the tools of
    `tools` (default: the process's registry), so a test hands it its own
    parts. Time is the store's clock (`TaskStore(clock=...)`,
    `Runtime(clock=...)`), the one its leases follow.
    """

    def __init__(self, rt: WorkerContext, claim: Claim, *, provider: Optional[Provider] = None,
                 tools: Optional[Mapping[str, Tool]] = None) -> None:
        self.rt = rt
        self.provider = provider
        self.tools = tools
        self.store = rt.store
        self.observation: RunObserver = NULL_RUN
        self.tool_calls_heard: Optional[ToolCallListener] = None
        self.claim = claim
        self.task_id = claim.task_id
        self.tracer: TraceWriter = NullTraceWriter(agent="", model="", job_type="", next_sequence=0,
                                                   started_at=0.0)
        self.usage = Usage()  # this run's, not yet stored
        self.pending: list[ChatMessage] = []  # the step in progress: its assistant turn and tool results so far
        self.live: Optional[LivePublisher] = None  # live output (`longhaul follow`), with Redis

    def run(self) -> TaskStatus:
        """Run until the task finishes or is interrupted (see `run_claimed_task`), observed from start to end."""
        status = TaskStatus.RUNNING  # what an exception leaves: interrupted, resumable
        try:
            status = self._run()
            return status
        finally:
            self.observation.ended(status, self.tool_calls_heard.error_type if self.tool_calls_heard else None)

    def _observe(self, record: TaskRecord) -> None:
        """Hook the process's observer (metrics, spans) into this run: the store, the tracer, the provider."""
        agent = record.spec.agent.name if record.spec is not None and record.spec.agent is not None else ""
        self.observation = self.rt.observer.run_started(
            RunInfo(task_id=self.task_id, thread_id=record.thread_id, agent=agent or record.provider,
                    provider=record.provider, model=record.model, resumed=self.claim.resumed),
            remember=self.store)
        if self.observation is not NULL_RUN:  # nothing observes: no wrapper, no listener
            self.store = ObservedStore(self.store, self.observation)  # type: ignore[assignment]
            self.tool_calls_heard = ToolCallListener(self.observation)

    def _run(self) -> TaskStatus:
        try:
            record = self.store.get(self.task_id, checkpoints=False)
            self._observe(record)
            self.tracer = self._open_tracer(record)
            self.tracer.listener = self.tool_calls_heard
            self._check_startable(record)
            assert record.spec is not None
            provider = self.provider or create_provider(record.provider, settings=self.rt.settings,
                                                        providers=self.rt.providers)
            if self.observation is not NULL_RUN:
                provider = ObservedProvider(provider, self.observation)
            validate_tool_names(record.spec.options, self.tools)  # a tool this worker lacks: fail now, naming --app
            history = list(record.execution_history) or self._open_histories(record, record.spec)
            return self._step_until_done(record, record.spec, provider, history)
        except (UnknownProvider, UnknownTool) as exc:
            return self._fail(exc, message=f"this worker lacks it: {exc}")
        except BudgetExceeded as exc:
            return self._over_budget(exc)
        except (_TaskFailed, CorruptRecord, PermanentProviderError) as exc:
            return self._fail(exc)
        except TimeLimitExceeded:
            return self._finish(TaskStatus.TIMED_OUT, last_error="time limit exceeded")
        except LeaseLost as exc:
            logger.warning("%s", exc)
            return TaskStatus.RUNNING
        except Shutdown:
            self._release(redeliver_at=None)
            raise
        except TransientProviderError as exc:
            self._error_event(exc, kind="transient")
            self._release(redeliver_at=_retry_due_at(self.rt))
            raise
        except StoreUnavailable as exc:
            self._release(redeliver_at=_retry_due_at(self.rt))
            if exc.task_id == self.task_id:
                raise
            raise StoreUnavailable(self.task_id, exc.problem) from exc
        except TraceSequenceClash as exc:  # another writer got ahead: retry from what it stored
            self._release(redeliver_at=_retry_due_at(self.rt))
            raise StoreUnavailable(self.task_id, f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # a bug in a provider or tool: fail the task, never leave it leased
            logger.exception("task %r: unexpected error", self.task_id)
            return self._fail(exc, message=f"{type(exc).__name__}: {exc}")

    # -- starting ----------------------------------------------------------------

    def _open_tracer(self, record: TaskRecord) -> TraceWriter:
        """The run's trace writer; its first event (started or resumed) is written at once."""
        if not self.rt.settings.traces:
            return self.tracer
        started_at = record.started_at.timestamp() if record.started_at else self.store.clock()
        self.live = self.rt.live.publisher(record.task_id, record.thread_id) if self.rt.live else None
        tracer = TraceWriter(agent=record.provider, model=record.model, job_type="agent_task",
                             next_sequence=self.store.next_trace_sequence(self.task_id), started_at=started_at,
                             clock=self.store.clock, on_event=self.live)  # live output for `longhaul follow`
        if self.claim.resumed:
            tracer.emit("resumed", {"from_step": record.last_step_index + 1,
                                    "recovery_count": self.claim.recovery_count,
                                    "worker": self.rt.claimant.owner})
        else:
            tracer.emit("session_started", {"thread_id": record.thread_id, "channel": record.channel,
                                            "prompt": (record.spec.prompt[:500] if record.spec else None),
                                            "worker": self.rt.claimant.owner})
        self.store.append_traces(self.task_id, tracer.take(), lease_token=self.claim.token)
        return tracer

    def _check_startable(self, record: TaskRecord) -> None:
        settings = self.rt.settings
        if self.claim.recovery_count > settings.max_recoveries:
            raise _TaskFailed(
                f"gave up after {self.claim.recovery_count} recoveries (limit {settings.max_recoveries}, "
                f"LONGHAUL_MAX_RECOVERIES): the task keeps getting interrupted at step "
                f"{record.last_step_index + 1}; last error: {record.last_error or 'none recorded'}"
            )
        if record.spec is None:
            raise _TaskFailed("the task has no spec (it was stored by save_snapshot, not enqueued); nothing to run")
        limit_s = record.spec.time_limit_s
        if limit_s is not None and record.started_at is not None:
            used_s = self.store.clock() - record.started_at.timestamp()
            if used_s > limit_s:
                raise TimeLimitExceeded()

    def _open_histories(self, record: TaskRecord, spec: TaskSpec) -> list[ChatMessage]:
        """The first messages of a task: its agent's instructions, its thread's turns so far, then the prompt.

        Written once, when the task first runs; a resume continues the stored
        history. A thread's turns hold only user and assistant messages, so
        the instructions of an earlier task on the thread are not repeated.
        """
        prior = load_resumable_state(self.store, record.thread_id, before_task_id=record.task_id)
        turns, note = prior if prior is not None else ([], None)
        instructions = spec.agent.instructions if spec.agent is not None else None
        execution = [ChatMessage.system(instructions)] if instructions else []
        execution.extend(turns)
        if note:
            execution.append(ChatMessage.system(f"Latest checkpoint of this thread: {note}"))
        prompt = ChatMessage.user(spec.prompt)
        execution.append(prompt)
        self.store.append_histories(record.task_id, execution=execution, resumable=[*turns, prompt],
                                    lease_token=self.claim.token)
        return execution

    # -- the loop ------------------------------------------------------------------

    def _step_until_done(self, record: TaskRecord, spec: TaskSpec, provider: Provider,
                         history: list[ChatMessage]) -> TaskStatus:
        store, task_id, tracer = self.store, self.task_id, self.tracer
        options: dict[str, Any] = dict(spec.options)
        tools = allowed_tools(options, self.tools)
        totals = record.usage
        spend = Spend.stored(record)
        step = record.last_step_index
        while True:
            if self.rt.stopping.is_set():
                logger.info("task %r: worker shutting down; stopping after step %d", task_id, step)
                self._release(redeliver_at=None)
                return TaskStatus.RUNNING
            if (stop_reason := store.cancel_reason(task_id)) is not None:  # cancel, or if_busy="interrupt"
                return self._finish(TaskStatus.CANCELLED, last_error=f"{stop_reason} after step {step}")
            step += 1
            check_budget(task_id, spec.budget, spend, "model call")
            turn = provider.next_turn(StepContext(task_id=task_id, step_index=step, history=history,
                                                  model=record.model, options=options, tools=tools,
                                                  emit=tracer.emit))
            if turn.content and not tracer.streamed_content:
                tracer.emit("content", {"text": turn.content})
            if turn.usage is not None:
                self.usage += turn.usage
                tracer.emit("usage_update", {"step": step, "turn": turn.usage.model_dump(),
                                             "total": (totals + self.usage).model_dump()})
            spend.add_model_call(turn.usage)
            assistant = ChatMessage.assistant(turn.content, tool_calls=turn.tool_calls)
            self.pending = [assistant]
            if not turn.tool_calls:
                tracer.end_turn()
                return self._finish(TaskStatus.COMPLETED, final_response=turn.content, new_messages=[assistant])
            if spec.max_steps is not None and step > spec.max_steps:
                raise _TaskFailed(f"max_steps: the task asked for step {step} but max_steps is {spec.max_steps}")
            new_messages, items = self.pending, []
            for call_index, call in enumerate(turn.tool_calls):
                check_budget(task_id, spec.budget, spend, "tool call")
                spend.tool_calls += 1
                message, item = self._call_tool(call, ToolContext(task_id=task_id, step_index=step,
                                                                  call_index=call_index, options=options,
                                                                  settings=self.rt.settings))
                new_messages.append(message)
                items.append(item)
            note = f"step {step} done: " + ", ".join(
                f"{item.tool_name} {'ok' if item.success else 'failed'}" for item in items)
            tracer.emit("checkpoint", {"step": step, "note": note})
            tracer.emit("turn_completed", {"step": step, "tool_calls": len(items)})
            tracer.end_turn()
            store.record_checkpoint(
                CheckpointUpdate(
                    task_id=task_id, thread_id=record.thread_id, channel=record.channel,
                    provider=record.provider, model=record.model, step_index=step,
                    new_messages=new_messages, items=items, checkpoint_note=note,
                ),
                lease_token=self.claim.token,
                lease_s=self.rt.settings.lease_s,
                traces=tracer.take(),
                usage=self.usage,
            )
            totals, self.usage, self.pending = totals + self.usage, Usage(), []
            history.extend(new_messages)
            _reset_retries()

    def _call_tool(self, call: ToolCall, ctx: ToolContext) -> tuple[ChatMessage, CheckpointItem]:
        self.tracer.emit("tool_call_started", {"step": ctx.step_index, "tool": call.name, "call_id": call.id,
                                               "arguments": call.arguments, "idempotency_key": ctx.idempotency_key})
        started = time.perf_counter()
        result = run_tool_call(call, ctx, self.tools)
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        self.tracer.emit("tool_call_completed" if result.success else "tool_call_failed",
                         {"step": ctx.step_index, "tool": call.name, "call_id": call.id, "duration_ms": duration_ms,
                          "output": result.output})  # stored once: the tool message holds it
        message = ChatMessage(role="tool", content=result.output, tool_call_id=call.id or None, name=call.name)
        return message, checkpoint_item(call, result)

    # -- how a run ends --------------------------------------------------------------

    def _over_budget(self, exc: BudgetExceeded) -> TaskStatus:
        """Fail the task, keeping what the step in progress already did (its turn, the tools that ran)."""
        self.tracer.emit("budget_exceeded", {"limit": exc.limit, "limit_value": exc.limit_value, "used": exc.used})
        return self._finish(TaskStatus.FAILED, last_error=str(exc), new_messages=self.pending)

    def _fail(self, exc: BaseException, *, message: Optional[str] = None) -> TaskStatus:
        self._error_event(exc, kind="permanent")
        return self._finish(TaskStatus.FAILED, last_error=message or str(exc))

    def _error_event(self, exc: BaseException, *, kind: str) -> None:
        self.tracer.emit("error", {"kind": kind, "error": type(exc).__name__, "message": str(exc),
                                   "provider": self.tracer.agent, "model": self.tracer.model,
                                   "http_status": getattr(exc, "status_code", None)})

    def _finish(self, status: TaskStatus, *, final_response: Optional[str] = None,
                last_error: Optional[str] = None, new_messages: Sequence[ChatMessage] = ()) -> TaskStatus:
        resumable = []
        if final_response:
            final_response = scrub_configured(final_response)  # a model that echoes an API key

            visible = strip_tool_call_tags(final_response)
            if visible:
                resumable.append(ChatMessage.assistant(visible))
        self.tracer.emit("done", {"status": status.value, "final_response": final_response or "",
                                  "last_error": last_error})
        try:
            self.store.finish(self.task_id, status, final_response=final_response, last_error=last_error,
                              new_messages=new_messages, resumable_messages=resumable,
                              lease_token=self.claim.token, traces=self.tracer.take(), usage=self.usage)
        except LeaseLost as exc:
            logger.warning("%s", exc)
            return TaskStatus.RUNNING
        if self.live is not None:  # followers see `done` only once the store has the end
            self.live.publish_done()
        if status is TaskStatus.COMPLETED:
            logger.info("task %r completed", self.task_id)
        else:
            logger.warning("task %r %s: %s", self.task_id, status.value, redact_text(last_error or ""))
        return status

    def _release(self, *, redeliver_at: Optional[float]) -> None:
        """Write what the tracer holds and give the lease back; never raises (we are already failing)."""
        try:
            self.store.append_traces(self.task_id, self.tracer.take(), lease_token=self.claim.token)
        except Exception:  # traces of an unfinished step: losing them loses no work
            logger.warning("task %r: could not write its last trace events", self.task_id, exc_info=True)
        try:
            self.rt.leases.release(self.task_id, self.claim.token, redeliver_at=redeliver_at)
        except Exception:  # the lease then simply expires
            logger.warning("task %r: could not release its lease; it resumes when the lease expires",
                           self.task_id, exc_info=True)


def _reset_retries() -> None:
    """A step was stored: the message's retry count starts again from 0.

    Dramatiq's Retries middleware counts on the message (``options["retries"]``)
    and never resets, so a task that meets one rate limit per step would
    give up after `max_retries` steps however well it progresses. The count
    is meant to measure trouble since the last progress, not a task's age.
    """
    message = CurrentMessage.get_current_message()
    if message is not None:
        message.options["retries"] = 0


def _retry_due_at(rt: WorkerContext) -> float:
    """When Dramatiq's retry of the current message will be delivered at the latest."""
    message = CurrentMessage.get_current_message()
    retries = int(message.options.get("retries", 0)) if message is not None else 0
    settings = rt.settings
    backoff_ms = min(settings.min_backoff_ms * 2 ** min(retries, 32), settings.max_backoff_ms)
    return rt.store.clock() + backoff_ms / 1000
