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
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Iterator, Mapping, Optional, Sequence

import orjson
from dramatiq.middleware import CurrentMessage, Shutdown, TimeLimitExceeded

from longhaul.models import (
    ChatMessage,
    CheckpointItem,
    CheckpointUpdate,
    Claim,
    CorruptRecord,
    LeaseLost,
    OpenStep,
    StepBoundary,
    StoreUnavailable,
    TaskRecord,
    TaskSpec,
    TaskStatus,
    ToolCall,
    TraceSequenceClash,
    Usage,
    Wait,
    load_resumable_state,
    strip_tool_call_tags,
    with_orphans_answered,
)
from longhaul.models.journal import tool_result
from longhaul.models.redact import redact_text, scrub_configured
from longhaul.models.traces import NullTraceWriter, TraceWriter

from .budgets import BudgetExceeded, Spend, check_budget
from .context import WorkerContext
from .errors import WaitForReply
from .fault_points import fault_point
from .live import LivePublisher
from .observe import NULL_RUN, ObservedProvider, ObservedStore, RunInfo, RunObserver, ToolCallListener
from .providers import (
    AssistantTurn,
    PermanentProviderError,
    Provider,
    StepContext,
    TransientProviderError,
    UnknownProvider,
    create_provider,
)
from .tools import (
    TOOLS,
    Tool,
    ToolContext,
    ToolResult,
    UnknownTool,
    allowed_tools,
    checkpoint_item,
    failed_output,
    run_tool_call,
    validate_tool_names,
)

logger = logging.getLogger(__name__)


#: The most tool calls of one parallel batch that run at the same time; the others wait their turn.
PARALLEL_TOOL_THREADS = 8
#: How long the step loop waits for a parallel batch at a time (see `TaskRun._calls_at_once`).
TOOL_WAIT_SLICE_S = 0.05

#: Errors worth a Dramatiq retry (with backoff) from the latest checkpoint.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (TransientProviderError, StoreUnavailable)


class _TaskFailed(Exception):
    """Internal: stop the loop and mark the task failed with this message."""


class _CancelledMidStep(Exception):
    """Internal: a cancel request seen between two tool calls of one answer."""


class _Waiting(Exception):
    """Internal: call `call` of step `step` waits for the user (a reply, or an approval); the task waits."""

    def __init__(self, kind: str, question: str, step: int, call: int, tool: str) -> None:
        super().__init__(question)
        self.kind, self.question, self.step, self.call, self.tool = kind, question, step, call, tool


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
        self.live: Optional[LivePublisher] = None  # live output (`longhaul follow`), with Redis
        self.options: dict[str, Any] = {}
        self.totals, self.spend = Usage(), Spend()
        #: The step in progress as stored: its answer and the results journaled so far (None between steps).
        self.open_step: Optional[OpenStep] = None
        self.reply_timeout_s: Optional[float] = None  # the spec's reply_timeout_s, for `_wait`
        #: The first step boundary, read by the run's last store call before it (the claim, or the opening
        #: histories' write): no read of its own. None: read it.
        self.first_boundary: Optional[StepBoundary] = claim.first_boundary

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
            # Read with the claim when `TaskStore.start` made it (no second read of a new task).
            record = self.claim.record or self.store.get(self.task_id, checkpoints=False)
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
        except _CancelledMidStep as exc:
            return self._finish(TaskStatus.CANCELLED, last_error=str(exc))
        except _Waiting as exc:
            return self._wait(exc)
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
        """The run's trace writer with its first event (started or resumed).

        A resume writes its event at once; a first run's ``session_started``
        goes with the opening histories (`_open_histories`), one write
        instead of two (every way out before then writes what the tracer
        holds). The next sequence came with the claim.
        """
        if not self.rt.settings.traces:
            return self.tracer
        started_at = record.started_at.timestamp() if record.started_at else self.store.clock()
        self.live = self.rt.live.publisher(record.task_id, record.thread_id) if self.rt.live else None
        next_sequence = self.claim.trace_next_sequence
        if next_sequence is None:
            next_sequence = self.store.next_trace_sequence(self.task_id)
        tracer = TraceWriter(agent=record.provider, model=record.model, job_type="agent_task",
                             next_sequence=next_sequence, started_at=started_at,
                             clock=self.store.clock, on_event=self.live)  # live output for `longhaul follow`
        if self.claim.resumed:
            tracer.emit("resumed", {"from_step": record.last_step_index + 1,
                                    "recovery_count": self.claim.recovery_count,
                                    "worker": self.rt.claimant.owner})
        else:
            tracer.emit("session_started", {"thread_id": record.thread_id, "channel": record.channel,
                                            "prompt": (record.spec.prompt[:500] if record.spec else None),
                                            "worker": self.rt.claimant.owner})
        if self.claim.resumed or record.execution_history:
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
        # Read only if the claim saw a finished task before this one on its thread (else the story is empty).
        prior = (load_resumable_state(self.store, record.thread_id, before_task_id=record.task_id)
                 if self.claim.story_before else None)
        turns, note = prior if prior is not None else ([], None)
        instructions = spec.agent.instructions if spec.agent is not None else None
        execution = [ChatMessage.system(instructions)] if instructions else []
        execution.extend(turns)
        if note:
            execution.append(ChatMessage.system(f"Latest checkpoint of this thread: {note}"))
        prompt = ChatMessage.user(spec.prompt)
        execution.append(prompt)
        self.first_boundary = self.store.append_histories(
            record.task_id, execution=execution, resumable=[*turns, prompt], lease_token=self.claim.token,
            traces=self.tracer.take())
        return execution

    # -- the loop ------------------------------------------------------------------
    #
    # A step is journaled in parts (see `models.journal`): ask the model, store its answer, run the
    # calls that lack a result (storing each as it completes), then the checkpoint completes the step.
    # A crash replays what is stored: the model is asked again only if the crash came during its call.

    def _step_until_done(self, record: TaskRecord, spec: TaskSpec, provider: Provider,
                         history: list[ChatMessage]) -> TaskStatus:
        task_id = self.task_id
        self.options = dict(spec.options)
        self.reply_timeout_s = spec.reply_timeout_s
        self.totals, self.spend = record.usage, Spend.stored(record)
        step = self._reopen_step(record, history)
        index = record.last_step_index if step is None else step.step_index
        boundary, self.first_boundary = self.first_boundary, None
        while True:
            if self.rt.stopping.is_set():
                logger.info("task %r: worker shutting down; stopping after step %d", task_id, index)
                self._release(redeliver_at=None)
                return TaskStatus.RUNNING
            # Cancel, if_busy interrupt/steer: brought by the write before (the claim, the opening histories,
            # the checkpoint), or one read of its own (after a final answer a steer came during).
            stop_reason, steered = boundary if boundary is not None else self.store.step_boundary(task_id)
            boundary = None
            if stop_reason is not None:
                done = index if step is None else index - 1  # a reopened step is not done yet
                return self._finish(TaskStatus.CANCELLED, last_error=f"{stop_reason} after step {done}")
            if steered and step is None:  # if_busy="steer": the messages join the history before the model call
                history.extend(self.store.take_steering(task_id, lease_token=self.claim.token))
            if step is None:
                index += 1
                turn = self._ask_model(record, spec, provider, history, index)
                if not turn.tool_calls and self._steered_during(history, turn):
                    continue  # a steer came while the model answered: it answers that too
                if not turn.tool_calls:
                    self.tracer.end_turn()
                    return self._finish(TaskStatus.COMPLETED, final_response=turn.content,
                                        new_messages=[ChatMessage.assistant(turn.content, tool_calls=turn.tool_calls)])
                if spec.max_steps is not None and index > spec.max_steps:
                    raise _TaskFailed(f"max_steps: the task asked for step {index} but max_steps is {spec.max_steps}")
                step = self._journal_answer(turn, index)
            results = self._run_pending_calls(spec, step)
            boundary = self._complete_step(record, step, results)  # the next boundary, read by the checkpoint
            history.extend(self.open_step.messages if self.open_step else ())
            step = self.open_step = None
            _reset_retries()

    def _steered_during(self, history: list[ChatMessage], turn: AssistantTurn) -> bool:
        """A steer arrived during the final model call: store that answer and the steer; the model is asked again."""
        if not self.store.step_boundary(self.task_id)[1]:
            return False
        answer = ChatMessage.assistant(turn.content)
        self.store.append_histories(self.task_id, execution=[answer], lease_token=self.claim.token)
        history.append(answer)
        history.extend(self.store.take_steering(self.task_id, lease_token=self.claim.token))
        return True

    def _reopen_step(self, record: TaskRecord, history: list[ChatMessage]) -> Optional[OpenStep]:
        """The step a crash left open, its stored messages taken off the end of `history`; None if none."""
        # Only a turn without its checkpoint can be open: most resumes skip the query.
        step = self.store.open_step(self.task_id) if record.turn_count > record.last_step_index else None
        if step is None:
            history[:] = with_orphans_answered(history)  # a history stored by an older release or a snapshot
            return None
        del history[len(history) - len(step.stored_messages):]
        self.spend.tool_calls -= len(step.pending_calls)  # counted with the answer, run below
        self.tracer.emit("step_resumed", {"step": step.step_index, "tool_calls": len(step.calls),
                                          "pending_calls": len(step.pending_calls)})
        self.open_step = step
        return step

    def _ask_model(self, record: TaskRecord, spec: TaskSpec, provider: Provider, history: list[ChatMessage],
                   index: int) -> AssistantTurn:
        """The model's answer for step `index`; an empty one is a transient error (asked again later)."""
        check_budget(self.task_id, spec.budget, self.spend, "model call")
        tracer = self.tracer
        mark = tracer.mark()
        try:
            turn = provider.next_turn(StepContext(task_id=self.task_id, step_index=index, history=history,
                                                  model=record.model, options=self.options,
                                                  tools=allowed_tools(self.options, self.tools), emit=tracer.emit))
            if not turn.tool_calls and not turn.content.strip():
                raise TransientProviderError(f"{record.provider}: the model answered step {index} with neither "
                                             "text nor tool calls; asking again")
        except (TransientProviderError, StoreUnavailable, Shutdown) as exc:
            # Asked again later: what it streamed so far is kept here, not as content traced twice.
            chunks, partial = tracer.discard_streamed_since(mark)
            tracer.emit("model_call_restarted", {"step": index, "reason": f"{type(exc).__name__}: {exc}",
                                                 "discarded_chunks": chunks, "partial_text": partial[:2000]})
            raise
        if turn.content and not tracer.streamed_content:
            tracer.emit("content", {"text": turn.content})
        if turn.usage is not None:
            self.usage += turn.usage
            tracer.emit("usage_update", {"step": index, "turn": turn.usage.model_dump(),
                                         "total": (self.totals + self.usage).model_dump()})
        self.spend.add_model_call(turn.usage)
        return turn

    def _journal_answer(self, turn: AssistantTurn, index: int) -> OpenStep:
        """Store the answer before any of its tools runs: from here on a crash never asks the model again."""
        step = self.store.journal_answer(self.task_id, index,
                                         ChatMessage.assistant(turn.content, tool_calls=turn.tool_calls),
                                         lease_token=self.claim.token, lease_s=self.rt.settings.lease_s,
                                         traces=self.tracer.take(), usage=self.usage)
        self.totals, self.usage = self.totals + self.usage, Usage()
        self.open_step = step
        fault_point("after_answer_journaled")
        return step

    def _run_pending_calls(self, spec: TaskSpec, step: OpenStep) -> dict[int, tuple[ChatMessage, CheckpointItem]]:
        """Run the calls of `step` that lack a result, each stored as it completes but the last (the checkpoint's).

        All at once when every call is to a tool declared ``parallel=True``;
        else one after another, in the answer's order. Returns what ran, by call index.
        """
        pending = step.pending_calls
        ran: dict[int, tuple[ChatMessage, CheckpointItem]] = {}
        known = TOOLS if self.tools is None else self.tools
        parallel = len(pending) > 1 and all(getattr(known.get(call.name), "parallel", False)
                                            and not getattr(known.get(call.name), "needs_approval", False)
                                            for _, call in pending)
        for index, outcome in (self._calls_at_once if parallel else self._calls_in_turn)(spec, step, pending):
            ran[index] = outcome
            if len(ran) < len(pending):
                assert self.open_step is not None
                self.open_step = self.store.journal_result(self.open_step, index, outcome[0],
                                                           lease_token=self.claim.token, success=outcome[1].success)
                fault_point("in_parallel_batch" if parallel else "between_tools")
        fault_point("before_checkpoint")
        return ran

    def _calls_in_turn(self, spec: TaskSpec, step: OpenStep, pending: list[tuple[int, ToolCall]]
                       ) -> Iterator[tuple[int, tuple[ChatMessage, CheckpointItem]]]:
        for done, (index, call) in enumerate(pending):
            # A long answer stops at the next call, not at the end of the step; its other calls get
            # results saying they never ran. (No query before the first: a step of one call costs nothing.)
            if done and (stop_reason := self.store.cancel_reason(self.task_id)) is not None:
                raise _CancelledMidStep(
                    f"{stop_reason} during step {step.step_index}, before its tool call {index + 1}")
            self._check_approved(step, index, call)
            ctx = self._tool_context(spec, step, index)
            started = time.perf_counter()
            try:
                result = run_tool_call(call, ctx, self.tools)
            except WaitForReply as exc:
                raise _Waiting("reply", exc.question, step.step_index, index, call.name) from None
            yield index, self._tool_finished(call, ctx, result, started)

    def _check_approved(self, step: OpenStep, index: int, call: ToolCall) -> None:
        """A ``needs_approval`` tool runs only once `longhaul approve` approved this very call; else the task waits."""
        known = TOOLS if self.tools is None else self.tools
        if not getattr(known.get(call.name), "needs_approval", False):
            return
        wait = self.store.wait_of(self.task_id)
        if wait is not None and (wait.kind, wait.step, wait.call, wait.decision) == (
                "approval", step.step_index, index, "approved"):
            return
        raise _Waiting("approval", f"approve the call {call.name}({orjson.dumps(call.arguments).decode()})?",
                       step.step_index, index, call.name)

    def _calls_at_once(self, spec: TaskSpec, step: OpenStep, pending: list[tuple[int, ToolCall]]
                       ) -> Iterator[tuple[int, tuple[ChatMessage, CheckpointItem]]]:
        """Run the calls on a pool of up to `PARALLEL_TOOL_THREADS`; yield each result as it completes.

        Tracing and the store stay on this thread; the pool only runs the
        tools. The wait is cut in `TOOL_WAIT_SLICE_S` slices: Dramatiq's time
        limit (and its shutdown) is an exception raised *into this thread*,
        which Python delivers only while the thread runs bytecode, never
        inside one long wait for a future. When the batch is stopped that way
        (`_left_behind`), calls not yet started never start; calls still
        running cannot be stopped (Python cannot kill a thread): they are
        logged and traced, their results are dropped, and the task's end
        gives each pending call a synthetic result.
        """
        pool = ThreadPoolExecutor(max_workers=min(len(pending), PARALLEL_TOOL_THREADS),
                                  thread_name_prefix=f"tools-{self.task_id}")
        futures: dict[Future[ToolResult], tuple[int, ToolCall, ToolContext]] = {}
        reported: set[Future[ToolResult]] = set()
        try:
            started = time.perf_counter()
            for index, call in pending:
                ctx = self._tool_context(spec, step, index)
                futures[pool.submit(run_tool_call, call, ctx, self.tools)] = (index, call, ctx)
            waiting = set(futures)
            while waiting:
                done, waiting = wait(waiting, timeout=TOOL_WAIT_SLICE_S, return_when=FIRST_COMPLETED)
                for future in done:
                    index, call, ctx = futures[future]
                    reported.add(future)
                    try:
                        result = future.result()
                    except WaitForReply as exc:  # the calls that finished before it are journaled; the rest run again
                        raise _Waiting("reply", exc.question, step.step_index, index, call.name) from None
                    yield index, self._tool_finished(call, ctx, result, started)
        except BaseException as exc:  # a time limit, a shutdown, the generator closed by either: stop the batch
            self._left_behind(step, futures, reported, exc)
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _left_behind(self, step: OpenStep, futures: dict[Future[ToolResult], tuple[int, ToolCall, ToolContext]],
                     reported: set[Future[ToolResult]], exc: BaseException) -> None:
        """A parallel batch stopped early: cancel the calls not started; log and trace those left running."""
        not_started, running = [], []
        for future, (_index, call, ctx) in futures.items():
            if future in reported:
                continue
            about = {"tool": call.name, "call_id": call.id, "idempotency_key": ctx.idempotency_key}
            if future.cancel():
                not_started.append(about)
            elif not future.done():
                running.append(about)
        if not (not_started or running):
            return
        reason = "GeneratorExit" if isinstance(exc, GeneratorExit) else type(exc).__name__
        if running:
            logger.warning("task %r: step %d stopped (%s) with %d tool call(s) still running in their threads, "
                           "which Python cannot stop; their results will be dropped: %s", self.task_id,
                           step.step_index, reason, len(running),
                           ", ".join(f"{c['tool']} {c['idempotency_key']}" for c in running))
        self.tracer.emit("tool_calls_left_behind", {"step": step.step_index, "reason": reason,
                                                    "running": running, "not_started": not_started})

    def _tool_context(self, spec: TaskSpec, step: OpenStep, index: int) -> ToolContext:
        """The call's context, after the budget allows it and its start is traced."""
        check_budget(self.task_id, spec.budget, self.spend, "tool call")
        self.spend.tool_calls += 1
        ctx = ToolContext(task_id=self.task_id, step_index=step.step_index, call_index=index, options=self.options,
                          settings=self.rt.settings)
        call = step.calls[index]
        self.tracer.emit("tool_call_started", {"step": ctx.step_index, "tool": call.name, "call_id": call.id,
                                               "arguments": call.arguments, "idempotency_key": ctx.idempotency_key})
        return ctx

    def _tool_finished(self, call: ToolCall, ctx: ToolContext, result: ToolResult,
                       started: float) -> tuple[ChatMessage, CheckpointItem]:
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        self.tracer.emit("tool_call_completed" if result.success else "tool_call_failed",
                         {"step": ctx.step_index, "tool": call.name, "call_id": call.id, "duration_ms": duration_ms,
                          "output": result.output})  # stored once: the tool message holds it
        return tool_result(call, result.output), checkpoint_item(call, result)

    def _complete_step(self, record: TaskRecord, step: OpenStep,
                       ran: dict[int, tuple[ChatMessage, CheckpointItem]]) -> StepBoundary:
        """The checkpoint: the step's last result and its trace events, and the mark that the step is done.

        Returns the step boundary as the checkpoint's locked read saw it (`TaskStore.complete_step`).
        """
        stored = self.open_step
        assert stored is not None
        complete = stored
        for index, (message, _item) in ran.items():
            if complete.results[index] is None:
                complete = complete.with_result(index, message)
        items = [ran[index][1] if index in ran else _replayed_item(stored, index, call, result)
                 for index, (call, result) in enumerate(zip(complete.calls, complete.messages[1:], strict=True))]
        note = f"step {step.step_index} done: " + ", ".join(
            f"{item.tool_name} {'ok' if item.success else 'failed'}" for item in items)
        tracer = self.tracer
        tracer.emit("checkpoint", {"step": step.step_index, "note": note})
        tracer.emit("turn_completed", {"step": step.step_index, "tool_calls": len(items)})
        tracer.end_turn()
        boundary = self.store.complete_step(
            CheckpointUpdate(task_id=self.task_id, thread_id=record.thread_id, channel=record.channel,
                             provider=record.provider, model=record.model, step_index=step.step_index,
                             new_messages=complete.messages, items=items, checkpoint_note=note),
            journal=stored, lease_token=self.claim.token, lease_s=self.rt.settings.lease_s, traces=tracer.take(),
        )
        self.open_step = complete
        return boundary

    # -- how a run ends --------------------------------------------------------------

    def _over_budget(self, exc: BudgetExceeded) -> TaskStatus:
        """Fail the task, keeping what the step in progress already did (its answer and results are journaled)."""
        self.tracer.emit("budget_exceeded", {"limit": exc.limit, "limit_value": exc.limit_value, "used": exc.used})
        return self._finish(TaskStatus.FAILED, last_error=str(exc))

    def _wait(self, waiting: _Waiting) -> TaskStatus:
        """The task waits for the user: the step stays open with the call pending; no lease, no worker thread."""
        assert self.open_step is not None
        timeout = self.reply_timeout_s
        self.tracer.emit("waiting", {"kind": waiting.kind, "question": waiting.question, "step": waiting.step,
                                     "tool": waiting.tool, "reply_timeout_s": timeout})
        wait = Wait(kind=waiting.kind, question=waiting.question, step=waiting.step, call=waiting.call,
                    tool=waiting.tool, since=self.store.clock(), reply_timeout_s=timeout)
        try:
            self.store.append_traces(self.task_id, self.tracer.take(), lease_token=self.claim.token)
            self.store.wait_for_user(self.task_id, wait, lease_token=self.claim.token)
        except LeaseLost as exc:
            logger.warning("%s", exc)
            return TaskStatus.RUNNING
        logger.info("task %r waits for %s (step %d, %s)", self.task_id,
                    "a reply" if waiting.kind == "reply" else "an approval", waiting.step, waiting.tool)
        return TaskStatus.WAITING

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
        # The end gave the lease back: no longer one this process renews (waiting for the live output's
        # `done` below, a renewal would count it as lost).
        self.rt.untrack(self.claim)
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


def _replayed_item(step: OpenStep, index: int, call: ToolCall, result: ChatMessage) -> CheckpointItem:
    """The checkpoint item of a result journaled by an earlier run: its stored success flag, else (a row
    stored before schema 8) the flag guessed from its text."""
    succeeded = step.result_succeeded(index)
    if succeeded is None:
        succeeded = not failed_output(call, result.content)
    return CheckpointItem(tool_name=call.name, arguments=call.arguments, success=succeeded, output=result.content)


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
