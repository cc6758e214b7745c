"""`ThreadAdmission`: a new task on a thread, its `if_busy` check and its insert in one transaction.

A message for a thread that has an unfinished task does what `if_busy`
says (``enqueue``: store it to run after; ``reject``: store nothing;
``interrupt``: store it and ask the running task to stop at its next step
boundary, naming the new task; ``steer``: store no task, add the message to
the running task's history before its next model call). Whatever
`if_busy` says, a message to a thread whose task waits for a reply is that
reply (`Waiting.answer`: no new task). The check and the insert (and the
interrupt request) are one write transaction with the thread locked
(`Dialect.lock_thread`): on SQLite ``BEGIN IMMEDIATE`` serialises it with
every other writer; on PostgreSQL a transaction-scoped advisory lock on the
thread does, and because READ COMMITTED gives each statement a fresh
snapshot, the check after the lock sees every task an earlier admission
committed. So of two messages arriving at the same instant on an idle thread
with ``reject``, exactly one is stored. Every admission to a thread takes the
lock, so a thread's row ids are also handed out in commit order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .context import StoreContext
from .schemas import TaskSpec, TaskStatus
from .tasks import TaskWrites
from .threads import ThreadReads
from .waiting import Waiting

#: What a message on a busy thread does.
IF_BUSY_CHOICES: tuple[str, ...] = ("enqueue", "reject", "interrupt", "steer")


@dataclass(frozen=True)
class Admission:
    """What `ThreadAdmission.admit` did: stored the task or not, and why not; which tasks it interrupted."""

    created: bool
    #: ``reject`` on a busy thread: the unfinished task that refused it (nothing was stored).
    refused_by: Optional[tuple[str, TaskStatus]] = None
    #: ``interrupt``: the running tasks asked to stop.
    interrupted: list[str] = field(default_factory=list)
    #: The thread's task was waiting for a reply: the message was that reply (nothing new stored).
    replied_to: Optional[str] = None
    #: ``steer``: the running task the message was added to (nothing new stored).
    steered: Optional[str] = None


def interrupt_reason(by_task_id: str) -> str:
    """The `cancel_reason` of a task interrupted by a newer one: its end reads ``"<this> after step N"``."""
    return f"interrupted by task {by_task_id!r}"


class ThreadAdmission:
    """Adding tasks to threads under `if_busy`."""

    def __init__(self, ctx: StoreContext, tasks: TaskWrites, threads: ThreadReads, waiting: Waiting) -> None:
        self.ctx = ctx
        self.tasks = tasks
        self.threads = threads
        self.waiting = waiting

    def admit(self, *, task_id: str, thread_id: str, channel: str, provider: str, model: str, spec: TaskSpec,
              if_busy: str) -> Admission:
        """Check the thread and store the task as `if_busy` says, in one transaction (see the module docstring)."""
        if if_busy not in IF_BUSY_CHOICES:
            raise ValueError(f"if_busy must be one of {', '.join(IF_BUSY_CHOICES)}, got {if_busy!r}")
        ctx = self.ctx
        with ctx.db.atomic():
            ctx.dialect.lock_thread(thread_id)
            waiting = self.waiting.waiting_task(thread_id)
            if waiting is not None and waiting != task_id:
                wait = self.waiting.wait_of(waiting)
                if wait is not None and wait.kind == "reply":  # a message to a thread that waits is the reply
                    self.waiting.answer(waiting, spec.prompt, decision="replied", kinds=("reply",))
                    return Admission(created=False, replied_to=waiting)
            busy = self.threads.busy(thread_id, excluding=task_id) if if_busy != "enqueue" else []
            if busy and if_busy == "reject":
                return Admission(created=False, refused_by=busy[0])
            running = [busy_id for busy_id, status in busy if status is TaskStatus.RUNNING]
            if running and if_busy == "steer" and self.waiting.steer(running[0], spec.prompt):
                return Admission(created=False, steered=running[0])
            if not self.tasks.create(task_id=task_id, thread_id=thread_id, channel=channel, provider=provider,
                                     model=model, spec=spec):
                return Admission(created=False)
            for running_id in (running if if_busy == "interrupt" else []):
                self.tasks.request_cancel(running_id, reason=interrupt_reason(task_id))
            return Admission(created=True, interrupted=running)
