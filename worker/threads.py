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
running task to stop at its next step boundary (it ends `cancelled`, its
turns kept in the story) and runs the new one after it.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

from longhaul.models import TaskStatus, TaskStore

from .context import WorkerContext
from .errors import BrokerUnavailable, ThreadBusy

logger = logging.getLogger(__name__)

#: The `if_busy` strategies (``steer`` comes with the journaled turns of issue 14).
IfBusy = Literal["enqueue", "reject", "interrupt"]
IF_BUSY_CHOICES: tuple[str, ...] = ("enqueue", "reject", "interrupt")


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


def check_if_busy(store: TaskStore, thread_id: str, if_busy: str) -> list[str]:
    """Before a new task is stored on `thread_id`: raise `ThreadBusy` (reject), or return the tasks to interrupt.

    `reject` checks the thread as it is now: two messages arriving at the
    same instant may both pass (the second then waits its turn).
    """
    busy = store.thread_busy(thread_id)
    if not busy or if_busy == "enqueue":
        return []
    if if_busy == "reject":
        task_id, status = busy[0]
        raise ThreadBusy(thread_id, task_id, status.value)
    return [task_id for task_id, status in busy if status is TaskStatus.RUNNING]


def interrupt_tasks(store: TaskStore, task_ids: list[str], *, by_task_id: str) -> None:
    """Ask each running task to stop at its next step boundary (as `cancel` does), naming the newer task."""
    for task_id in task_ids:
        status = store.request_cancel(task_id)
        logger.info("task %r interrupted by %r (now %s)", task_id, by_task_id, status.value)
