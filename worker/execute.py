"""One delivery of a task message: claim the lease, run the loop, let go."""

from __future__ import annotations

import logging
from typing import Optional

from longhaul.models import Claim, TaskStatus

from .context import WorkerContext
from .identity import holder_is_dead
from .loop import run_claimed_task
from .threads import park_waiting_task, send_next_on_thread

logger = logging.getLogger(__name__)


def execute_task(rt: WorkerContext, task_id: str) -> Optional[TaskStatus]:
    """Run the task if this delivery wins its lease; None if it is not ours to run.

    A duplicate delivery (a redelivered message, a recovery re-send racing an
    operator's resume) finds the lease taken and returns at once.
    """
    claim = acquire_lease(rt, task_id)
    if claim is None:
        return None
    rt.track(claim)
    try:
        status = run_claimed_task(rt, claim)
    finally:
        rt.untrack(claim)
    if status.is_terminal:  # the thread is free: its next task starts now, not at the next recovery pass
        send_next_on_thread(rt, task_id)
    return status


def acquire_lease(rt: WorkerContext, task_id: str) -> Optional[Claim]:
    """Claim the task, taking it over from a dead process on this host if need be."""
    lease_s = rt.settings.lease_s
    claim = rt.store.start(task_id, rt.claimant, lease_s=lease_s)  # the claim with the record the run starts from
    if claim is not None:
        if claim.took_over:  # its holder's lease had expired
            logger.info("task %r: took over an expired lease", task_id)
            rt.observer.takeover()
        return claim
    holder = rt.leases.holder(task_id)
    if holder is None:
        logger.error("task %r: no such task in the store; dropping the message", task_id)
        return None
    if holder.status.is_terminal:
        logger.info("task %r is already %s; dropping duplicate delivery", task_id, holder.status.value)
        return None
    if holder.status is TaskStatus.WAITING:
        logger.info("task %r waits for the user; dropping the delivery (a reply resends it)", task_id)
        return None
    if holder.status is TaskStatus.QUEUED and holder.token is None:  # free to claim but for its thread
        park_waiting_task(rt, task_id)
        return None
    if holder_is_dead(holder, host=rt.claimant.host):
        claim = rt.store.start(task_id, rt.claimant, lease_s=lease_s, steal_token=holder.token)
        if claim is not None:
            logger.info("task %r: took over from dead process %d on this host", task_id, holder.pid)
            rt.observer.takeover()
            return claim
    logger.info("task %r is leased by a live worker (%s pid %s); dropping duplicate delivery",
                task_id, holder.host, holder.pid)
    return None
