"""One run at a time per thread: what a worker does when a thread is busy or frees up, and double texting.

The rule itself is in the store (`models/threads.py`): a queued task is
claimed only while its thread is free. Here: a delivery that finds its
thread busy parks the task (no lease, no worker thread held, no message on
its way), and a task that ends sends the next one of its thread. If the
worker dies between the end and the send, any worker's recovery pass finds
the next task once the thread is free (`LeaseBook.unfinished`).

`if_busy` chooses what a new message on a busy thread does (LangGraph's
"double texting" strategies): ``enqueue`` runs it after the tasks ahead,
``reject`` refuses it (`ThreadBusy`, nothing stored), ``interrupt`` asks the
running task to stop at its next step boundary (it ends `cancelled`,
"interrupted by task X after step N", its work kept in the story) and runs
the new one after it, ``steer`` adds the message to the running task's
history before its next model call (no new task). A message to a thread
whose task waits for a reply is that reply, whatever `if_busy` says. The
check is atomic (`models/thread_admission.py`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

from longhaul.models import TaskStore
from longhaul.models.thread_admission import Admission

from .context import WorkerContext
from .errors import BrokerUnavailable, ThreadBusy

logger = logging.getLogger(__name__)

#: The `if_busy` strategies; the store checks them too.
IfBusy = Literal["enqueue", "reject", "interrupt", "steer"]


def park_waiting_task(rt: WorkerContext, task_id: str) -> None:
    """The delivery found the task's thread busy: drop the message; the thread's current task sends it later."""
    if rt.leases.park(task_id):
        logger.info("task %r waits for its thread (an earlier task runs or waits); parked", task_id)


def send_next_on_thread(rt: WorkerContext, task_id: str) -> Optional[str]:
    """`task_id` has ended: send the task of its thread that may start now, if any; returns its id.

    Never raises for the broker: an unsent task is found by recovery.
    """
    following = rt.store.next_startable(task_id)
    if following is None:
        return None
    try:
        rt.send(following)
    except BrokerUnavailable as exc:
        logger.warning("%s", exc)
    return following


def admit(store: TaskStore, *, if_busy: str, **task: Any) -> Admission:
    """Store a new task on its thread as `if_busy` says (`TaskStore.admit_task`); what it did.

    Not created: its id is taken, or the message was the reply of the
    thread's waiting task (`replied_to`), or steered the running one (`steered`).

    `ThreadBusy` (nothing stored) for ``reject`` on a thread with an
    unfinished task. The check and the insert are one transaction with the
    thread locked, so two messages arriving at the same instant never both pass.
    """
    admission = store.admit_task(if_busy=if_busy, **task)
    if admission.refused_by is not None:
        busy_id, status = admission.refused_by
        raise ThreadBusy(task["thread_id"], busy_id, status.value)
    for interrupted in admission.interrupted:
        logger.info("task %r interrupted by %r: it stops at its next step boundary", interrupted, task["task_id"])
    return admission

