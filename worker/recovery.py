"""Resuming interrupted tasks, and keeping this process's leases alive.

Recovery re-enqueues rather than running tasks itself (so a task is always
run by a worker thread that claimed its lease), and each re-send is a
compare-and-set on the task's ``delivery_due_at``: when every worker process
scans at boot, each interrupted task is re-sent once.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

from longhaul.models import LeaseRow

from .context import WorkerContext
from .identity import holder_is_dead

logger = logging.getLogger(__name__)


def interruption(row: LeaseRow, *, host: str, now: float, grace_s: float) -> Optional[str]:
    """Why the task needs a new delivery now, or None if it does not.

    Without a lease, a task waits for a message: none is due (a graceful
    shutdown released it), or the one due is overdue by `grace_s` (lost
    with the broker, or stranded in a dead worker's prefetch). With a
    lease, its holder must be alive: not expired, and on this host a live
    process.
    """
    if row.token is None:
        if row.delivery_due_at is None:
            return "it was interrupted and released"
        if row.delivery_due_at + grace_s <= now:
            return "its message is overdue (lost by the broker?)"
        return None
    if row.expires_at is not None and row.expires_at <= now:
        return "its lease expired"
    if holder_is_dead(row, host=host):
        return f"its worker process {row.pid} on this host is gone"
    return None


def find_interrupted(rt: WorkerContext) -> list[tuple[LeaseRow, str]]:
    """Unfinished tasks that nobody is running and no message is coming for."""
    now, host, grace_s = rt.store.clock(), rt.claimant.host, rt.settings.redelivery_grace_s
    found = []
    for row in rt.leases.unfinished():
        reason = interruption(row, host=host, now=now, grace_s=grace_s)
        if reason is not None:
            found.append((row, reason))
    return found


def resend_interrupted(rt: WorkerContext) -> list[str]:
    """Re-send a message for every interrupted task this process wins; returns their ids.

    First, on Redis, requeue what dead consumers had fetched but never
    claimed (`LonghaulRedisBroker.requeue_stale_acks`).
    """
    requeue = getattr(rt.broker, "requeue_stale_acks", None)
    if requeue is not None:
        requeue(stale_after_s=rt.settings.broker_stale_consumer_s)
    sent = []
    for row, reason in find_interrupted(rt):
        if rt.leases.take_for_redelivery(row):
            logger.info("resuming task %r: %s", row.task_id, reason)
            rt.actor.send_with_options(args=(row.task_id,), time_limit=rt.remaining_time_limit_ms(row.task_id))
            sent.append(row.task_id)
    return sent


class Maintenance(threading.Thread):
    """Renews the leases this process holds; with `recover`, resumes interrupted tasks.

    The first recovery pass runs at worker boot (`LonghaulMiddleware`), which
    is what makes a restarted worker pick up its predecessor's tasks within a
    second or two instead of waiting for the broker's redelivery timeout;
    this thread repeats it every `recovery_interval_s` for tasks whose
    leases expire later (another host died).
    """

    def __init__(self, rt: WorkerContext, *, recover: bool) -> None:
        super().__init__(name="longhaul-maintenance", daemon=True)
        self.rt = rt
        self.recover = recover
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def run(self) -> None:
        settings = self.rt.settings
        tick_s = min(settings.heartbeat_every_s, settings.recovery_interval_s)
        next_renew = 0.0
        next_recovery = self.rt.store.clock() + settings.recovery_interval_s
        while not self._stop_event.is_set():
            now = self.rt.store.clock()
            try:
                if now >= next_renew:
                    self._renew()
                    next_renew = now + settings.heartbeat_every_s
                if self.recover and now >= next_recovery:
                    resend_interrupted(self.rt)
                    next_recovery = now + settings.recovery_interval_s
            except Exception:  # keep renewing through transient store or broker errors
                logger.exception("maintenance pass failed; retrying in %.1f s", tick_s)
            self._stop_event.wait(tick_s)

    def _renew(self) -> None:
        tokens = self.rt.held_tokens()
        held = self.rt.leases.renew(tokens, lease_s=self.rt.settings.lease_s)
        if held < len(tokens):
            logger.warning("%d of %d leases were lost; their tasks stop at their next checkpoint",
                           len(tokens) - held, len(tokens))
