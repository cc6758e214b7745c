"""What an operator can do from the dashboard: each action, the one place it meets the public API.

An `Action` says which tasks it applies to, what its confirmation asks and
what it calls (a function of `worker.api`). The views render every action
of `ACTIONS` the same way: a button, a confirmation page, a CSRF-checked
POST, then back to the task with what happened: cancel, resume, rerun;
reply, approve and deny for a waiting task; fork at a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from longhaul.models import InvalidInput, LonghaulError, TaskStatus, TaskSummary

from .. import api
from ..errors import BrokerRequired
from ..runtime import get_runtime


@dataclass(frozen=True)
class Action:
    """One operator action on a task."""

    name: str
    label: str
    #: The confirmation question ({task_id} is filled in).
    confirm: str
    #: Whether the task, as listed, admits the action.
    applies: Callable[[TaskSummary], bool]
    #: Does it; returns what to tell the operator. Raises `LonghaulError` (shown, not a traceback).
    perform: Callable[[str, Mapping[str, str]], str]
    #: Form fields the confirmation page asks for (name -> label), e.g. a reply's text.
    fields: Mapping[str, str] = field(default_factory=dict)


def _sent_to_workers(what: str) -> None:
    """Resume and rerun from the dashboard only hand the task to the Redis workers: never run it here."""
    if get_runtime().embedded:
        raise BrokerRequired(f"{what} from the dashboard")


def _cancel(task_id: str, form: Mapping[str, str]) -> str:
    status = api.cancel(task_id)
    if status is TaskStatus.CANCELLED:
        return "cancelled"
    return f"cancel requested: it stops after its current step (status now {status.value})"


def _resume(task_id: str, form: Mapping[str, str]) -> str:
    _sent_to_workers("resume")
    api.resume(task_id)
    return "sent to the workers: it resumes from its latest checkpoint"


def _rerun(task_id: str, form: Mapping[str, str]) -> str:
    _sent_to_workers("rerun")
    api.rerun(task_id)
    return "sent to the workers: it runs again from step 1"


def _reply(task_id: str, form: Mapping[str, str]) -> str:
    _sent_to_workers("reply")
    api.reply(get_runtime().store.summary(task_id).thread_id, form.get("text", ""))
    return "replied: the task resumes with your text as its answer"


def _approve(task_id: str, form: Mapping[str, str]) -> str:
    _sent_to_workers("approve")
    api.approve(task_id)
    return "approved: the tool runs and the task goes on"


def _deny(task_id: str, form: Mapping[str, str]) -> str:
    _sent_to_workers("deny")
    api.deny(task_id, reason=form.get("reason") or None)
    return "denied: the model is told so and the task goes on"


def _fork(task_id: str, form: Mapping[str, str]) -> str:
    _sent_to_workers("fork")
    try:
        step = int(form.get("step", ""))
    except ValueError:
        raise InvalidInput(f"step: a step number, got {form.get('step')!r}") from None
    new_id = api.fork(task_id, at_step=step, prompt=form.get("prompt") or None)
    return f"forked at step {step} as task {new_id}"


def _waiting(task: TaskSummary) -> bool:
    return task.status is TaskStatus.WAITING


def _running(task: TaskSummary) -> bool:
    return not task.status.is_terminal


ACTIONS: dict[str, Action] = {action.name: action for action in (
    Action("cancel", "Cancel", "Cancel task {task_id}? A running task stops after its current step.",
           applies=_running, perform=_cancel),
    Action("resume", "Resume", "Resume task {task_id} from its latest checkpoint?",
           applies=lambda task: _running(task) and task.lease is None, perform=_resume),
    Action("rerun", "Rerun", "Run task {task_id} again from step 1? Its checkpoints are reset.",
           applies=lambda task: task.status.is_terminal, perform=_rerun),
    Action("reply", "Reply", "Reply to the question task {task_id} asked?", applies=_waiting, perform=_reply,
           fields={"text": "Your reply"}),
    Action("approve", "Approve", "Approve the tool call task {task_id} waits on? The tool runs.",
           applies=_waiting, perform=_approve),
    Action("deny", "Deny", "Deny the tool call task {task_id} waits on?", applies=_waiting, perform=_deny,
           fields={"reason": "Reason (told to the model)"}),
    Action("fork", "Fork", "Fork task {task_id} at a step into a new task?",
           applies=lambda task: task.checkpoint_count > 0, perform=_fork,
           fields={"step": "At step", "prompt": "New prompt (optional)"}),
)}


def perform(name: str, task_id: str, form: Mapping[str, str]) -> tuple[bool, str]:
    """(succeeded, what to tell the operator) for action `name` on the task."""
    action = ACTIONS[name]
    try:
        return True, f"{action.label}: {action.perform(task_id, form)}"
    except LonghaulError as exc:
        return False, f"{action.label} refused: {exc}"
