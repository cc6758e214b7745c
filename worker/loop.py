"""The agent step loop: ask the provider, run the tools, checkpoint, repeat.

The loop runs a task whose lease this process holds. It starts at the step
after the latest checkpoint, so a resumed task never repeats a completed
step; only a step in flight when the process died can run twice. Every
interruption is caught here and nowhere else, and each leaves the task
either finished or resumable.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from dramatiq.middleware import CurrentMessage, Shutdown, TimeLimitExceeded
from peewee import DatabaseError, InterfaceError

from models import (
    ChatMessage,
    CheckpointUpdate,
    Claim,
    CorruptRecord,
    LeaseLost,
    LonghaulError,
    TaskRecord,
    TaskSpec,
    TaskStatus,
    load_resumable_state,
    strip_tool_call_tags,
)

from .providers import (
    PermanentProviderError,
    Provider,
    StepContext,
    TransientProviderError,
    UnknownProvider,
    create_provider,
)
from .runtime import Runtime
from .tools import ToolContext, allowed_tools, checkpoint_item, run_tool_call

logger = logging.getLogger(__name__)


class StoreUnavailable(LonghaulError):
    """A checkpoint could not be written; the task stays resumable and is retried."""

    def __init__(self, task_id: str, problem: str) -> None:
        super().__init__(
            f"task {task_id!r}: the task store could not be written ({problem}); "
            "nothing of the step was stored and the task resumes from its latest checkpoint"
        )
        self.task_id = task_id


#: Errors worth a Dramatiq retry (with backoff) from the latest checkpoint.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (TransientProviderError, StoreUnavailable)


class _TaskFailed(Exception):
    """Internal: stop the loop and mark the task failed with this message."""


def run_claimed_task(rt: Runtime, claim: Claim) -> TaskStatus:
    """Run the task until it finishes or is interrupted; returns its status then.

    `running` means the task was interrupted and is resumable (shutdown,
    lease lost). Transient errors release the lease and re-raise, so that
    Dramatiq's Retries middleware redelivers the message after a backoff.
    """
    store, task_id, token = rt.store, claim.task_id, claim.token
    try:
        record = store.get(task_id)
        _check_startable(rt, claim, record)
        assert record.spec is not None
        provider = create_provider(record.provider)
        history = list(record.execution_history) or _open_histories(rt, record, record.spec, token)
        return _step_until_done(rt, claim, record, record.spec, provider, history)
    except (_TaskFailed, CorruptRecord, UnknownProvider, PermanentProviderError) as exc:
        return _finish(rt, claim, TaskStatus.FAILED, last_error=str(exc))
    except TimeLimitExceeded:
        return _finish(rt, claim, TaskStatus.TIMED_OUT, last_error="time limit exceeded")
    except LeaseLost as exc:
        logger.warning("%s", exc)
        return TaskStatus.RUNNING
    except Shutdown:
        _release(rt, claim, redeliver_at=None)
        raise
    except TransientProviderError:
        _release(rt, claim, redeliver_at=_retry_due_at(rt))
        raise
    except (DatabaseError, InterfaceError) as exc:
        _release(rt, claim, redeliver_at=_retry_due_at(rt))
        raise StoreUnavailable(task_id, f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # a bug in a provider or tool: fail the task, never leave it leased
        logger.exception("task %r: unexpected error", task_id)
        return _finish(rt, claim, TaskStatus.FAILED, last_error=f"{type(exc).__name__}: {exc}")


def _check_startable(rt: Runtime, claim: Claim, record: TaskRecord) -> None:
    settings = rt.settings
    if claim.recovery_count > settings.max_recoveries:
        raise _TaskFailed(
            f"gave up after {claim.recovery_count} recoveries (limit {settings.max_recoveries}, "
            f"LONGHAUL_MAX_RECOVERIES): the task keeps getting interrupted at step "
            f"{record.last_step_index + 1}; last error: {record.last_error or 'none recorded'}"
        )
    if record.spec is None:
        raise _TaskFailed("the task has no spec (it was stored by save_snapshot, not enqueued); nothing to run")
    limit_s = record.spec.time_limit_s
    if limit_s is not None and record.started_at is not None:
        used_s = rt.store.clock() - record.started_at.timestamp()
        if used_s > limit_s:
            raise TimeLimitExceeded()


def _open_histories(rt: Runtime, record: TaskRecord, spec: TaskSpec, token: str) -> list[ChatMessage]:
    """The first messages of a task: its thread's turns so far, then the prompt."""
    prior = load_resumable_state(rt.store, record.thread_id, exclude_task_id=record.task_id)
    turns, note = prior if prior is not None else ([], None)
    execution = list(turns)
    if note:
        execution.append(ChatMessage.system(f"Latest checkpoint of this thread: {note}"))
    prompt = ChatMessage.user(spec.prompt)
    execution.append(prompt)
    with rt.store.db.atomic():
        rt.store.append_messages(record.task_id, execution, lease_token=token)
        rt.store.append_messages(record.task_id, [*turns, prompt], history="resumable", lease_token=token)
    return execution


def _step_until_done(
    rt: Runtime, claim: Claim, record: TaskRecord, spec: TaskSpec, provider: Provider,
    history: list[ChatMessage],
) -> TaskStatus:
    store, task_id = rt.store, claim.task_id
    options: dict[str, Any] = dict(spec.options)
    tools = allowed_tools(options)
    step = record.last_step_index
    while True:
        if rt.stopping.is_set():
            logger.info("task %r: worker shutting down; stopping after step %d", task_id, step)
            _release(rt, claim, redeliver_at=None)
            return TaskStatus.RUNNING
        if store.is_cancel_requested(task_id):
            return _finish(rt, claim, TaskStatus.CANCELLED, last_error=f"cancelled after step {step}")
        step += 1
        turn = provider.next_turn(StepContext(task_id=task_id, step_index=step, history=history,
                                              model=record.model, options=options, tools=tools))
        assistant = ChatMessage.assistant(turn.content, tool_calls=turn.tool_calls)
        if not turn.tool_calls:
            return _finish(rt, claim, TaskStatus.COMPLETED, final_response=turn.content,
                           new_messages=[assistant])
        if spec.max_steps is not None and step > spec.max_steps:
            raise _TaskFailed(f"max_steps: the task asked for step {step} but max_steps is {spec.max_steps}")
        new_messages = [assistant]
        items = []
        for call_index, call in enumerate(turn.tool_calls):
            result = run_tool_call(call, ToolContext(task_id=task_id, step_index=step, call_index=call_index,
                                                     options=options))
            new_messages.append(ChatMessage(role="tool", content=result.output, tool_call_id=call.id or None,
                                            name=call.name))
            items.append(checkpoint_item(call, result))
        store.record_checkpoint(
            CheckpointUpdate(
                task_id=task_id, thread_id=record.thread_id, channel=record.channel,
                provider=record.provider, model=record.model, step_index=step,
                new_messages=new_messages, items=items,
                checkpoint_note=f"step {step} done: " + ", ".join(
                    f"{item.tool_name} {'ok' if item.success else 'failed'}" for item in items),
            ),
            lease_token=claim.token,
            lease_expires_at=store.clock() + rt.settings.lease_s,
        )
        history.extend(new_messages)


def _finish(rt: Runtime, claim: Claim, status: TaskStatus, *, final_response: Optional[str] = None,
            last_error: Optional[str] = None, new_messages: list[ChatMessage] = ()) -> TaskStatus:  # type: ignore[assignment]
    resumable = []
    if final_response:
        visible = strip_tool_call_tags(final_response)
        if visible:
            resumable.append(ChatMessage.assistant(visible))
    try:
        rt.store.finish(claim.task_id, status, final_response=final_response, last_error=last_error,
                        new_messages=new_messages, resumable_messages=resumable, lease_token=claim.token)
    except LeaseLost as exc:
        logger.warning("%s", exc)
        return TaskStatus.RUNNING
    if status is TaskStatus.COMPLETED:
        logger.info("task %r completed", claim.task_id)
    else:
        logger.warning("task %r %s: %s", claim.task_id, status.value, last_error)
    return status


def _release(rt: Runtime, claim: Claim, *, redeliver_at: Optional[float]) -> None:
    """Give the lease back so the task resumes elsewhere; never raises (we are already failing)."""
    try:
        rt.leases.release(claim.task_id, claim.token, redeliver_at=redeliver_at)
    except Exception:  # the lease then simply expires
        logger.warning("task %r: could not release its lease; it resumes when the lease expires",
                       claim.task_id, exc_info=True)


def _retry_due_at(rt: Runtime) -> float:
    """When Dramatiq's retry of the current message will be delivered at the latest."""
    message = CurrentMessage.get_current_message()
    retries = int(message.options.get("retries", 0)) if message is not None else 0
    settings = rt.settings
    backoff_ms = min(settings.min_backoff_ms * 2 ** min(retries, 32), settings.max_backoff_ms)
    return rt.store.clock() + backoff_ms / 1000
