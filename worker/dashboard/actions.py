"""What an operator can do from the dashboard: each action, the one place it meets the public API.

An `Action` says which tasks it applies to, what its confirmation asks and
what it calls (a function of `worker.api`). The views render every action
of `ACTIONS` the same way: a button, a confirmation page, a CSRF-checked
POST, then back to the task with what happened. Adding one (reply,
approve, deny, fork at a step, once threads have them) is one more entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from longhaul.models import LonghaulError, TaskStatus, TaskSummary

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


def _running(task: TaskSummary) -> bool:
    return not task.status.is_terminal


ACTIONS: dict[str, Action] = {action.name: action for action in (
    Action("cancel", "Cancel", "Cancel task {task_id}? A running task stops after its current step.",
           applies=_running, perform=_cancel),
    Action("resume", "Resume", "Resume task {task_id} from its latest checkpoint?",
           applies=lambda task: _running(task) and task.lease is None, perform=_resume),
    Action("rerun", "Rerun", "Run task {task_id} again from step 1? Its checkpoints are reset.",
           applies=lambda task: task.status.is_terminal, perform=_rerun),
)}


def perform(name: str, task_id: str, form: Mapping[str, str]) -> tuple[bool, str]:
    """(succeeded, what to tell the operator) for action `name` on the task."""
    action = ACTIONS[name]
    try:
        return True, f"{action.label}: {action.perform(task_id, form)}"
    except LonghaulError as exc:
        return False, f"{action.label} refused: {exc}"
