"""The Python API: enqueue, run inline, resume, cancel, rerun, wait; threads: follow, fork, thread_turns.

Every CLI command is a thin shell over one function here.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from longhaul.models import (
    Budget,
    ChatMessage,
    CorruptRecord,
    InvalidInput,
    NewTask,
    NotWaiting,
    TaskNotFound,
    TaskNotResumable,
    TaskRecord,
    TaskSnapshot,
    TaskSpec,
    TaskStatus,
    TaskSummary,
    denial,
)
from longhaul.models.redact import redact_text
from longhaul.models.traces import TraceEventRecord

from .agents import get_agent
from .errors import BrokerRequired, BrokerUnavailable, TaskBusy, TaskExists
from .live import FollowedEvent, follow_stream, live_event, task_key, thread_key
from .providers import create_provider
from .recovery import find_interrupted
from .runtime import Runtime, get_runtime
from .task_options import checked_options
from .threads import IfBusy, admit, send_next_on_thread
from .tools import validate_tool_names
from .validation import strict
from .workspaces import remove_journal

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """A running task as `wait_for` reports it."""

    task_id: str
    status: TaskStatus
    step: int
    planned_steps: Optional[int]
    last_tool: Optional[str]
    elapsed_s: float


@strict
def prepare(
    rt: Runtime,
    prompt: str,
    *,
    agent: Optional[str] = None,
    thread_id: Optional[str] = None,
    task_id: Optional[str] = None,
    channel: str = "api",
    provider: Optional[str] = None,
    model: Optional[str] = None,
    tools: Optional[list[str]] = None,
    max_steps: Optional[int] = None,
    time_limit_s: Optional[float] = None,
    budget: Optional[Budget] = None,
    if_busy: IfBusy = "enqueue",
    reply_timeout_s: Optional[float] = None,
    **provider_options: Any,
) -> NewTask:
    """Validate a new task without storing it: what `submit` stores (see there for the arguments and errors).

    With `agent`, the task runs that registered agent (its definition is
    stored with the task); every other argument given overrides the
    agent's field, and `budget` limits override the agent's one by one.
    Any further keyword must be an option the provider or one of the
    task's tools declares (see `task_options`). Anything unknown, of the wrong type or naming an
    agent, provider or tool this process lacks raises `InvalidInput` naming
    it, and nothing is stored. `TaskExists` if `task_id` is taken (its
    `identical` says whether by this very task: a repeated call).

    On a thread that has an unfinished task, `if_busy` says what happens
    (see `threads.py`): ``enqueue`` (default) runs this task after it,
    ``reject`` raises `ThreadBusy` naming it and stores nothing,
    ``interrupt`` stores this task and asks the running one to stop at its
    next step boundary (it ends `cancelled`), ``steer`` stores no task and
    adds the prompt to the running task's history before its next model
    call. On a thread whose task waits for a reply, the prompt is that reply.
    `reply_timeout_s` ends the task `timed_out` if it waits longer for a reply or an approval.
    """
    defined = get_agent(agent).spec if agent is not None else None
    provider = provider or (defined.provider if defined else None) or rt.settings.default_provider
    tools = tools if tools is not None else (defined.tools if defined else None)
    if tools is not None:
        validate_tool_names({"tools": tools})  # a tool this process lacks: InvalidInput naming `tools`
    options = checked_options(provider, tools, {**(defined.options if defined else {}), **provider_options},
                              parameters=SUBMIT_PARAMETERS,
                              providers=rt.providers)  # unknown provider: fail now, not in a worker
    if tools is not None:
        options["tools"] = list(tools)
    create_provider(provider, settings=rt.settings, providers=rt.providers)
    limits = (budget or Budget()).merged_over(defined.budget if defined else None)
    spec = TaskSpec(prompt=prompt, options=options, agent=defined, budget=None if limits.is_empty else limits,
                    max_steps=max_steps if max_steps is not None else (defined.max_steps if defined else None),
                    time_limit_s=time_limit_s if time_limit_s is not None else (
                        defined.time_limit_s if defined else None), reply_timeout_s=reply_timeout_s)
    task_id = task_id or f"task-{uuid.uuid4().hex[:16]}"
    # Validate the identity fields before anything is written.
    ident = TaskSnapshot(task_id=task_id, thread_id=thread_id or task_id, channel=channel, provider=provider,
                         model=model or (defined.model if defined else None) or rt.settings.default_model,
                         status=TaskStatus.QUEUED)
    return NewTask(task_id=ident.task_id, thread_id=ident.thread_id, channel=ident.channel, provider=ident.provider,
                   model=ident.model, spec=spec)


def submit(rt: Runtime, prompt: str, **kwargs: Any) -> str:
    """Validate and store a new `queued` task (not yet sent); returns its id.

    Takes the arguments of `prepare`, which says what is refused
    (`InvalidInput` naming the field, nothing stored). `TaskExists` if the
    task id is taken (its `identical` says whether by this very task: a
    repeated call).
    """
    return _admitted(rt, prompt, **kwargs)[0]


def _admitted(rt: Runtime, prompt: str, **kwargs: Any) -> tuple[str, bool]:
    """`submit`, and whether the id returned needs a message (False: the message steered a running task)."""
    new = prepare(rt, prompt, **kwargs)
    admission = admit(rt.store, task_id=new.task_id, thread_id=new.thread_id, channel=new.channel,
                      provider=new.provider, model=new.model, spec=new.spec, if_busy=kwargs.get("if_busy", "enqueue"))
    if admission.replied_to is not None:
        return admission.replied_to, True
    if admission.steered is not None:
        return admission.steered, False
    if not admission.created:
        raise TaskExists(new.task_id, identical=is_stored_as(rt, new))
    return new.task_id, True


def is_stored_as(rt: Runtime, new: NewTask) -> bool:
    """Whether the task stored under `new.task_id` has this identity and spec (a repeated enqueue)."""
    try:
        stored, stored_spec = rt.store.summary(new.task_id), rt.store.task_spec(new.task_id)
    except (CorruptRecord, TaskNotFound):  # unreadable, or deleted since: not this task
        return False
    return ((stored.thread_id, stored.channel, stored.provider, stored.model)
            == (new.thread_id, new.channel, new.provider, new.model)
            and stored_spec.model_dump(mode="json") == new.spec.model_dump(mode="json"))


@strict
def enqueue(prompt: str, **kwargs: Any) -> str:
    """Store a task and send it to the Redis workers; returns its id at once.

    Takes the arguments of `submit`. Raises `BrokerRequired` without Redis:
    use `run_inline` to run a task in this process instead.

    Idempotent: repeating a call with the same `task_id` and the same task
    returns that id again (`TaskExists` if the stored task differs). A task
    once stored is never reported as failed: with Redis unreachable the id is
    returned and one warning logged, and a worker sends the task within one
    recovery interval of Redis being reachable again.
    """
    rt = get_runtime()
    if rt.embedded:
        raise BrokerRequired("enqueue")
    try:
        task_id, send = _admitted(rt, prompt, **kwargs)
        if not send:
            return task_id  # steered: the running task takes the message
    except TaskExists as exc:
        if not exc.identical:
            raise
        task_id = exc.task_id
        holder = rt.leases.holder(task_id)
        if holder is None or holder.token is not None or holder.delivery_due_at is not None:
            return task_id  # running, finished, or its message is on its way
    try:
        rt.send(task_id)
    except BrokerUnavailable as exc:
        logger.warning("%s", exc)
    return task_id


@strict
def run_inline(prompt: str, *, on_progress: Optional[Callable[[Progress], None]] = None, **kwargs: Any) -> TaskRecord:
    """Run one task to its end: in this process without Redis, else via the workers.

    Takes the arguments of `submit`; returns the finished record.
    """
    rt = get_runtime()
    task_id = submit(rt, prompt, **kwargs)
    _drive(rt, [task_id], on_progress=on_progress, wait=True)
    return rt.store.get(task_id)


@strict
def resume(task_id: str, *, on_progress: Optional[Callable[[Progress], None]] = None) -> TaskRecord:
    """Resume an interrupted task from its latest checkpoint.

    With Redis this re-sends its message and returns; without, it runs the
    task here until it ends. `TaskNotResumable` if the task has finished.
    """
    rt = get_runtime()
    holder = rt.leases.holder(task_id)
    if holder is None:
        raise TaskNotFound(task_id)
    if holder.status.is_terminal:
        raise TaskNotResumable(task_id, holder.status.value)
    if holder.status is TaskStatus.WAITING:
        raise NotWaiting(f"task {task_id!r}", "it waits for the user: `longhaul reply`, `approve` or `deny` resumes it,"
                         " not `resume`")
    if holder.token is not None and not any(row.task_id == task_id for row, _ in find_interrupted(rt)):
        raise TaskBusy(task_id, holder.host, holder.pid)
    _drive(rt, [task_id], on_progress=on_progress)
    return rt.store.get(task_id)


@strict
def resume_interrupted(*, on_progress: Optional[Callable[[Progress], None]] = None) -> list[TaskSummary]:
    """Resume every task that was interrupted (dead worker, expired lease, released).

    Returns summaries, not whole records: one task whose stored record is
    corrupt (failed by the worker, naming the field) must not hide the rest.
    """
    rt = get_runtime()
    task_ids = [row.task_id for row, _reason in find_interrupted(rt)]
    return _drive(rt, task_ids, on_progress=on_progress) if task_ids else []


@strict
def rerun(task_id: str, *, on_progress: Optional[Callable[[Progress], None]] = None) -> TaskRecord:
    """Run a finished task again from step 1 (its stale checkpoints and its write journal are reset)."""
    rt = get_runtime()
    rt.store.reset_for_rerun(task_id)
    remove_journal(rt.settings.workspace_root, task_id)
    _drive(rt, [task_id], on_progress=on_progress)
    return rt.store.get(task_id)


@strict
def follow_traces(task_id: str, *, follow: bool = False, poll_s: float = 0.2) -> Iterator[TraceEventRecord]:
    """The task's trace events in order; with `follow`, keep yielding new ones until the task finishes."""
    store = get_runtime().store
    last = -1
    while True:
        finished = store.summary(task_id).status.is_terminal  # read before the events: none is missed
        for event in store.traces(task_id, after_sequence=last):
            last = event.sequence
            yield event
        if not follow or finished:
            return
        time.sleep(poll_s)


@strict
def cancel(task_id: str) -> TaskStatus:
    """Cancel a task; a running one stops after its current step. Returns the status now."""
    rt = get_runtime()
    status = rt.store.request_cancel(task_id)
    if status.is_terminal and not rt.embedded:  # a queued task cancelled: the next of its thread may start
        send_next_on_thread(rt, task_id)
    return status


@strict
def reply(thread_id: str, text: str) -> str:
    """Answer the question the thread's waiting task asked (`ask_user`, `WaitForReply`); returns its id.

    `text` becomes that tool call's result and the task resumes from there.
    `NotWaiting` if no task of the thread waits for a reply. Sending the
    thread any message with `enqueue` does the same.
    """
    if not text.strip():
        raise InvalidInput("text: the reply must be non-empty text")
    rt = get_runtime()
    task_id = rt.store.waiting_task(thread_id)
    if task_id is None:
        raise NotWaiting(f"thread {thread_id!r}", "no task of it waits for a reply")
    rt.store.answer_wait(task_id, text, decision="replied", kinds=("reply",))
    _send_resumed(rt, task_id)
    return task_id


@strict
def approve(task_id: str) -> str:
    """Approve the call the task waits on (a ``needs_approval`` tool): it runs, and the task goes on."""
    rt = get_runtime()
    rt.store.approve(task_id)
    _send_resumed(rt, task_id)
    return task_id


@strict
def deny(task_id: str, *, reason: Optional[str] = None) -> str:
    """Deny the call the task waits on: its result says it was denied (with `reason`), and the task goes on."""
    if reason is not None and not reason.strip():
        raise InvalidInput("reason: give a non-empty reason, or none")
    rt = get_runtime()
    wait = rt.store.wait_of(task_id)
    rt.store.answer_wait(task_id, denial(wait.tool if wait else "the tool", reason), decision="denied",
                         kinds=("approval",))
    _send_resumed(rt, task_id)
    return task_id


def _send_resumed(rt: Runtime, task_id: str) -> None:
    """Send a task that stopped waiting; without Redis, run it here to its end (or its next wait)."""
    if rt.embedded:
        _drive(rt, [task_id], on_progress=None)
        return
    try:
        rt.send(task_id)
    except BrokerUnavailable as exc:  # it is resumable: recovery sends it
        logger.warning("%s", exc)


@strict
def thread_turns(thread_id: str) -> list[ChatMessage]:
    """The thread's story: each finished task's prompt and answer (or how it ended), in arrival order."""
    return get_runtime().store.thread_story(thread_id).turns


@strict
def follow(task_id: Optional[str] = None, *, thread_id: Optional[str] = None, after: Optional[str] = None,
           idle_timeout_s: Optional[float] = None) -> Iterator[FollowedEvent]:
    """Yield ``(cursor, event)`` for a task's (or a thread's) live output, as it happens, from any process.

    Events are dicts with a ``type``: ``started``, ``chunk`` (``text``),
    ``reasoning``, ``tool_call``, ``tool_result``, ``step``, ``resumed``
    (the step in flight restarts: drop its partial answer) and ``done``
    (``status``, ``answer``, ``error``), each with its ``task_id``. Pass
    the last cursor seen as `after` to continue after a disconnect: no
    event is repeated or skipped. A task's follow ends with its ``done``;
    a thread's runs until `idle_timeout_s` passes without an event (None:
    until the caller stops). Without Redis, or for a finished task whose
    live stream has expired, a task is followed from its stored trace (a step at a
    time; cursors ``0-N``). See `worker/live.py`.
    """
    if (task_id is None) == (thread_id is None):
        raise InvalidInput("follow: give task_id or thread_id (one of them)")
    start = after or "0-0"
    if not CURSOR.fullmatch(start):
        raise InvalidInput(f"after (--after): not a cursor longhaul gave (got {start!r}); cursors look like "
                           "'1733112000000-0' (live) or '0-12' (stored)")
    rt = get_runtime()
    finished = task_id is not None and rt.store.summary(task_id).status.is_terminal  # TaskNotFound first
    if rt.live is None or (finished and start.startswith("0-") and not rt.live.exists(task_key(str(task_id)))):
        if task_id is None:
            raise BrokerRequired("follow --thread")
        yield from _follow_stored(rt, task_id, after=start, idle_timeout_s=idle_timeout_s)
        return
    key = task_key(task_id) if task_id is not None else thread_key(str(thread_id))
    yield from follow_stream(rt.live, key, after=start, until_done_of=task_id, idle_timeout_s=idle_timeout_s,
                             ended=None if task_id is None else lambda: _stored_end(rt, str(task_id)))


def _stored_end(rt: Runtime, task_id: str) -> Optional[dict[str, Any]]:
    """A ``done`` event built from the store if the task has ended (its worker may have died before publishing it)."""
    summary = rt.store.summary(task_id)
    if not summary.status.is_terminal:
        return None
    return {"type": "done", "status": summary.status.value, "answer": redact_text(summary.final_response or ""),
            "error": summary.last_error, "task_id": task_id, "from_store": True}


def _follow_stored(rt: Runtime, task_id: str, *, after: str,
                   idle_timeout_s: Optional[float]) -> Iterator[FollowedEvent]:
    """A task's stored trace as followed events (cursor ``0-<sequence + 1>``), polled until it ends."""
    last = int(after.split("-", 1)[1]) - 1 if after.startswith("0-") else -1
    idle_since = time.monotonic()
    while True:
        finished = rt.store.summary(task_id).status.is_terminal  # read before the events: none is missed
        for record in rt.store.traces(task_id, after_sequence=last):
            last = record.sequence
            idle_since = time.monotonic()
            event = live_event(record.event_type, record.data)
            if event is not None:
                event["task_id"] = task_id
                yield f"0-{record.sequence + 1}", event
        if finished:
            return
        if idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
            return
        time.sleep(0.2)


@strict
def fork(task_id: str, *, at_step: int, thread_id: Optional[str] = None, prompt: Optional[str] = None,
         new_task_id: Optional[str] = None, on_progress: Optional[Callable[[Progress], None]] = None) -> str:
    """A new task with `task_id`'s history through step `at_step`, run from step `at_step` + 1; returns its id.

    With `prompt`, that message is added after step `at_step`. The fork goes
    on `thread_id` (default: a thread of its own, named by its id); the
    original is untouched. With Redis it is sent to the workers; without, it
    runs here to its end. `StepNotForkable` names the steps there are.
    """
    rt = get_runtime()
    new_task_id = new_task_id or f"fork-{uuid.uuid4().hex[:16]}"
    ident = TaskSnapshot(task_id=new_task_id, thread_id=thread_id or new_task_id, channel="api", provider="p",
                         model="m", status=TaskStatus.QUEUED)  # validates the ids before anything is written
    if not rt.store.fork(task_id, at_step=at_step, new_task_id=ident.task_id, thread_id=ident.thread_id,
                         prompt=prompt):
        raise TaskExists(new_task_id, identical=False)
    _drive(rt, [new_task_id], on_progress=on_progress)
    return new_task_id


#: A follow cursor: a Redis stream entry id, or ``0-N`` for stored trace events (`follow`).
CURSOR = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")

#: The keywords `submit` (and so `enqueue` and `run_inline`) declares, beside provider options.
SUBMIT_PARAMETERS = ("agent", "thread_id", "task_id", "channel", "provider", "model", "tools", "max_steps",
                     "time_limit_s", "budget", "if_busy", "reply_timeout_s")


def _drive(rt: Runtime, task_ids: list[str], *, on_progress: Optional[Callable[[Progress], None]],
           wait: bool = False) -> list[TaskSummary]:
    """Send the tasks; without Redis, run them here and wait for their ends.

    With Redis, `wait` waits for the workers to finish them; otherwise the
    records are returned as they are right after sending.
    """
    if not rt.embedded:
        for task_id in task_ids:
            rt.send(task_id)
        if not wait:
            return [rt.store.summary(task_id) for task_id in task_ids]
        return [wait_for(task_id, on_progress=on_progress) for task_id in task_ids]
    rt.start_embedded_worker()
    try:
        for task_id in task_ids:
            rt.send(task_id)
        return [wait_for(task_id, on_progress=on_progress, while_running=True) for task_id in task_ids]
    except KeyboardInterrupt:
        rt.stop_embedded_worker()  # loops stop after their current step, leases released
        raise


@strict
def wait_for(
    task_id: str,
    *,
    on_progress: Optional[Callable[[Progress], None]] = None,
    timeout_s: Optional[float] = None,
    poll_s: float = 0.1,
    while_running: bool = False,
) -> TaskSummary:
    """Poll the store until the task finishes or waits for the user (or, with `while_running`, stops running here).

    `while_running` also returns once the embedded worker is stopping and
    no thread here runs the task any more (its last step checkpointed, its
    lease released), so a caller never hangs on a task nobody is running.
    """
    rt = get_runtime()
    started = time.monotonic()
    last_step = -1
    planned_steps = _planned_steps(rt, task_id) if on_progress is not None else None
    while True:
        summary = rt.store.summary(task_id)
        if on_progress is not None and summary.checkpoint_count != last_step:
            last_step = summary.checkpoint_count
            on_progress(_progress(rt, task_id, summary.status, planned_steps, time.monotonic() - started))
        if summary.status.is_terminal or summary.status is TaskStatus.WAITING:
            return summary  # waiting: nobody runs it until the user answers
        if while_running and rt.stopping.is_set() and not rt.running_here(task_id):
            return rt.store.summary(task_id)  # after the loop's last checkpoint and release
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            return summary
        time.sleep(poll_s)


def _planned_steps(rt: Runtime, task_id: str) -> Optional[int]:
    """How many steps the task plans (the scripted ``steps`` option, else ``max_steps``), if known."""
    try:
        spec = rt.store.task_spec(task_id)
    except CorruptRecord:
        return None
    planned = spec.options.get("steps")
    return int(planned) if isinstance(planned, int) else spec.max_steps


def _progress(rt: Runtime, task_id: str, status: TaskStatus, planned_steps: Optional[int],
              elapsed_s: float) -> Progress:
    latest = rt.store.latest_checkpoint(task_id)
    return Progress(
        task_id=task_id,
        status=status,
        step=latest.step_index if latest else 0,
        planned_steps=planned_steps,
        last_tool=latest.items[-1].tool_name if latest and latest.items else None,
        elapsed_s=elapsed_s,
    )
