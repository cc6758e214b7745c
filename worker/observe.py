"""The observer seam: what a worker tells metrics and tracing, from a few places only.

The step loop does not call metrics or spans itself. A claimed run gets one
`RunObserver` (from the process's `Observer`), fed from four places:

- the provider, wrapped once (`ObservedProvider`): each model call, timed,
  with its usage, answer model and error;
- the trace writer's listener (`TraceWriter.listener`): tool calls (their
  ``tool_call_started`` / ``tool_call_completed`` events) and errors;
- the store, wrapped once (`ObservedStore`): what a checkpoint or the end of
  a task *committed* (steps, tool calls, usage, the final status), so counters
  derived from it agree with the store by construction;
- the run's own start and end (`TaskRun.run`).

Recovery and lease code report `recovery(reason)` and `takeover()` to the
process's `Observer`. `Observers` fans out to several (metrics and OTel);
`NULL_OBSERVER` does nothing, and then no wrapper is installed at all. The
process's observer is chosen from the environment by `runtime`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

from longhaul.models import ChatMessage, CheckpointItem, TaskStatus, Usage

from .providers import AssistantTurn, Provider, StepContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """The task a run is for, as metrics labels and span attributes see it."""

    task_id: str
    thread_id: str
    agent: str  # the agent's name; the provider's when the task was started from no agent
    provider: str
    model: str
    resumed: bool


@dataclass(frozen=True)
class ModelCall:
    """One provider call: when (epoch s), what it answered or why it failed."""

    step: int
    started_s: float
    ended_s: float
    usage: Optional[Usage]
    tool_calls: int
    error_type: Optional[str] = None
    content: Optional[str] = None  # the answer's text (spans hold it only when the user opts in)


@dataclass(frozen=True)
class ToolCallRun:
    """One tool call, from its trace events: when (epoch s), and whether it succeeded."""

    step: int
    tool: str
    call_id: str
    started_s: float
    ended_s: float
    success: bool


@dataclass(frozen=True)
class Committed:
    """What one store write of a run made durable: a checkpoint, or the task's end."""

    assistant_turns: int
    items: Sequence[CheckpointItem]
    usage: Optional[Usage]
    status: Optional[TaskStatus]  # set when the write finished the task


class RunObserver(Protocol):
    """Hears one claimed run of a task. Every method must be cheap and must never raise."""

    def model_call(self, call: ModelCall) -> None: ...

    def tool_call(self, call: ToolCallRun) -> None: ...

    def committed(self, commit: Committed) -> None: ...

    def ended(self, status: TaskStatus, error_type: Optional[str]) -> None:
        """The run is over: `status` is what it returned (``running``: interrupted, resumable)."""


class Observer(Protocol):
    """Hears a worker process: its runs, its recoveries and its lease takeovers."""

    def run_started(self, run: RunInfo, *, remember: TraceParentStore) -> RunObserver: ...

    def recovery(self, reason: str) -> None:
        """An interrupted task was re-sent; `reason` is a short label (`recovery.Interruption.kind`)."""

    def takeover(self) -> None:
        """This process took over a lease another holder still had on the row."""


class TraceParentStore(Protocol):
    """Where a tracer keeps a task's trace parent across runs (``<trace id>-<span id>``, hex)."""

    def trace_parent(self, task_id: str) -> Optional[str]: ...

    def keep_trace_parent(self, task_id: str, trace_parent: str) -> str: ...


class _NullRun:
    def model_call(self, call: ModelCall) -> None:
        pass

    def tool_call(self, call: ToolCallRun) -> None:
        pass

    def committed(self, commit: Committed) -> None:
        pass

    def ended(self, status: TaskStatus, error_type: Optional[str]) -> None:
        pass


class NullObserver:
    """Observes nothing: neither metrics nor tracing is configured."""

    def run_started(self, run: RunInfo, *, remember: TraceParentStore) -> RunObserver:
        return NULL_RUN

    def recovery(self, reason: str) -> None:
        pass

    def takeover(self) -> None:
        pass


NULL_RUN = _NullRun()
NULL_OBSERVER = NullObserver()


def _guarded(what: str, call: Callable[[], None]) -> None:
    """Run an observer's method; a failing observer is logged, never fails the task."""
    try:
        call()
    except Exception:
        logger.warning("observer %s failed", what, exc_info=True)


class _FanOutRun:
    def __init__(self, runs: Sequence[RunObserver]) -> None:
        self.runs = runs

    def model_call(self, call: ModelCall) -> None:
        for run in self.runs:
            _guarded("model_call", lambda run=run: run.model_call(call))

    def tool_call(self, call: ToolCallRun) -> None:
        for run in self.runs:
            _guarded("tool_call", lambda run=run: run.tool_call(call))

    def committed(self, commit: Committed) -> None:
        for run in self.runs:
            _guarded("committed", lambda run=run: run.committed(commit))

    def ended(self, status: TaskStatus, error_type: Optional[str]) -> None:
        for run in self.runs:
            _guarded("ended", lambda run=run: run.ended(status, error_type))


class Observers:
    """Several observers as one (metrics and OTel); each failure is logged and contained."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = list(observers)

    def run_started(self, run: RunInfo, *, remember: TraceParentStore) -> RunObserver:
        runs: list[RunObserver] = []
        for observer in self.observers:
            _guarded("run_started", lambda observer=observer: runs.append(observer.run_started(run, remember=remember)))
        return _FanOutRun(runs)

    def recovery(self, reason: str) -> None:
        for observer in self.observers:
            _guarded("recovery", lambda observer=observer: observer.recovery(reason))

    def takeover(self) -> None:
        for observer in self.observers:
            _guarded("takeover", lambda observer=observer: observer.takeover())


# -- the hooks ------------------------------------------------------------------------------------


class ObservedProvider:
    """A provider whose every call is timed and reported (one wrapper, installed once per run)."""

    def __init__(self, inner: Provider, run: RunObserver, clock: Callable[[], float] = time.time) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)
        self.run = run
        self.clock = clock

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        started_s = self.clock()
        try:
            turn = self.inner.next_turn(ctx)
        except BaseException as exc:
            self.run.model_call(ModelCall(step=ctx.step_index, started_s=started_s, ended_s=self.clock(),
                                          usage=None, tool_calls=0, error_type=type(exc).__name__))
            raise
        self.run.model_call(ModelCall(step=ctx.step_index, started_s=started_s, ended_s=self.clock(),
                                      usage=turn.usage, tool_calls=len(turn.tool_calls), content=turn.content))
        return turn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ObservedStore:
    """The run's view of the store: its step writes (`journal_answer`, `record_checkpoint`, `complete_step`) and
    `finish` report what they committed.

    Reported only once the write returned, so a write refused (lease lost,
    store down) or a process killed before the commit counts nothing, and
    a step that runs again after a crash counts once. Every other method is
    the store's own.
    """

    def __init__(self, inner: Any, run: RunObserver) -> None:
        self.inner = inner
        self.run = run

    def record_checkpoint(self, update: Any, **kwargs: Any) -> Any:
        result = self.inner.record_checkpoint(update, **kwargs)
        self._step_committed(update, kwargs.get("usage"))
        return result

    def complete_step(self, update: Any, **kwargs: Any) -> Any:
        result = self.inner.complete_step(update, **kwargs)
        self._step_committed(update, None)  # a journaled step's usage went in (and was counted) with its answer
        return result

    def _step_committed(self, update: Any, usage: Any) -> None:
        self.run.committed(Committed(assistant_turns=_assistant_turns(update.new_messages), items=update.items,
                                     usage=usage, status=None))

    def journal_answer(self, task_id: str, step_index: int, answer: ChatMessage, **kwargs: Any) -> Any:
        # The answer's usage is stored here (its step is counted when `complete_step` completes it).
        result = self.inner.journal_answer(task_id, step_index, answer, **kwargs)
        self.run.committed(Committed(assistant_turns=0, items=(), usage=kwargs.get("usage"), status=None))
        return result

    def finish(self, task_id: str, status: TaskStatus, **kwargs: Any) -> Any:
        result = self.inner.finish(task_id, status, **kwargs)
        self.run.committed(Committed(assistant_turns=_assistant_turns(kwargs.get("new_messages", ())), items=(),
                                     usage=kwargs.get("usage"), status=status))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _assistant_turns(messages: Sequence[ChatMessage]) -> int:
    return sum(1 for message in messages if message.role == "assistant")


class ToolCallListener:
    """A `TraceWriter.listener`: turns tool-call events into `ToolCallRun`s, and remembers the last error."""

    def __init__(self, run: RunObserver) -> None:
        self.run = run
        self.started: dict[tuple[int, str, str], float] = {}
        self.error_type: Optional[str] = None

    def __call__(self, event_type: str, data: dict[str, Any], now_s: float) -> None:
        if event_type == "tool_call_started":
            self.started[(data.get("step", 0), str(data.get("tool")), str(data.get("call_id")))] = now_s
        elif event_type in ("tool_call_completed", "tool_call_failed"):
            key = (data.get("step", 0), str(data.get("tool")), str(data.get("call_id")))
            started_s = self.started.pop(key, now_s - float(data.get("duration_ms", 0)) / 1000)
            self.run.tool_call(ToolCallRun(step=key[0], tool=key[1], call_id=key[2], started_s=started_s,
                                           ended_s=now_s, success=event_type == "tool_call_completed"))
        elif event_type == "error":
            self.error_type = str(data.get("error") or "error")
        elif event_type == "budget_exceeded":
            self.error_type = "BudgetExceeded"
