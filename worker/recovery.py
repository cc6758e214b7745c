"""Resuming interrupted tasks, and keeping this process's leases alive.

Recovery re-enqueues rather than running tasks itself (so a task is always
run by a worker thread that claimed its lease), and each re-send is a
compare-and-set on the task's ``delivery_due_at``: when every worker process
scans at boot, each interrupted task is re-sent once.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from longhaul.models import LeaseRow, LonghaulError, StoreUnavailable, TaskStatus

from .broker_errors import BROKER_ERRORS
from .context import WorkerContext
from .errors import BrokerUnavailable
from .identity import Liveness, LivenessView, holder_is_dead
from .threads import send_next_on_thread

logger = logging.getLogger(__name__)

#: Interrupted tasks re-sent per broker round trip and store write (`Runtime.send_many`).
RESEND_BATCH = 500
#: Interrupted tasks taken for redelivery in one store transaction at most.
TAKE_BATCH = 200


class Interruption(str):
    """Why a task needs a new delivery: a sentence for the log, with a short `kind` for metrics labels."""

    kind: str

    def __new__(cls, kind: str, sentence: str) -> Interruption:
        made = super().__new__(cls, sentence)
        made.kind = kind
        return made


def interruption(row: LeaseRow, *, host: str, now: float, grace_s: float,
                 message_held: Optional[bool] = None, alive: Optional[Liveness] = None) -> Optional[Interruption]:
    """Why the task needs a new delivery now, or None if it does not.

    Without a lease, a task waits for a message: none is due (a graceful
    shutdown released it, or the broker refused it), or the one sent is
    lost. `message_held` says whether the broker still holds it (None: not
    known, for a message sent without its id recorded or when Redis cannot
    be asked); a message held is waiting in the queue, however long, and
    one gone was lost with Redis's data. Unknown, the message counts as
    lost once it is overdue by `grace_s` (lost with the broker, or
    stranded in a dead worker's prefetch). With a lease, its holder must be alive: not
    expired, and on this host a live process (`alive` asks the OS; see
    `holder_is_dead`).
    """
    if row.token is None:
        if row.delivery_due_at is None:
            if row.status is TaskStatus.QUEUED:
                return Interruption("unsent", "no message was sent for it (the broker was unreachable)")
            return Interruption("released", "it was interrupted and released")
        if message_held is not None:
            return None if message_held else Interruption(
                "message_lost", "the broker no longer holds its message (Redis restarted empty?)")
        if row.delivery_due_at + grace_s <= now:
            return Interruption("message_overdue", "its message is overdue (lost by the broker?)")
        return None
    if row.expires_at is not None and row.expires_at <= now:
        return Interruption("lease_expired", "its lease expired")
    if holder_is_dead(row, host=host, alive=alive):
        return Interruption("holder_dead", f"its worker process {row.pid} on this host is gone")
    return None


def find_interrupted(rt: WorkerContext) -> list[tuple[LeaseRow, Interruption]]:
    """Unfinished tasks that nobody is running and no message is coming for."""
    now, host, grace_s = rt.store.clock(), rt.claimant.host, rt.settings.redelivery_grace_s
    rows = rt.leases.unfinished()
    held = _held_messages(rt, rows)
    alive = LivenessView()  # the OS asked once per holding process, not once per task
    found = []
    for row in rows:
        reason = interruption(row, host=host, now=now, grace_s=grace_s, alive=alive,
                              message_held=held.get(row.message_id) if row.message_id is not None else None)
        if reason is not None:
            found.append((row, reason))
    return found


def _held_messages(rt: WorkerContext, rows: list[LeaseRow]) -> dict[str, bool]:
    """Whether the broker still holds each recorded message of an unleased task, by message id.

    Empty without Redis, or when Redis cannot be asked: the grace period
    then decides, as for messages sent without their id recorded.
    """
    holds = getattr(rt.broker, "holds_messages", None)
    waiting = [row.message_id for row in rows if row.token is None and row.message_id is not None]
    if holds is None or not waiting:
        return {}
    try:
        return dict(zip(waiting, holds(rt.settings.queue_name, waiting), strict=True))
    except BROKER_ERRORS as exc:
        logger.info("could not ask Redis which queued messages it holds (%s: %s)", type(exc).__name__, exc)
        return {}


def resend_interrupted(rt: WorkerContext) -> list[str]:
    """Re-send a message for every interrupted task this process wins; returns their ids.

    First, on Redis, requeue what dead consumers had fetched but never
    claimed (`LonghaulRedisBroker.requeue_stale_acks`).
    """
    requeue = getattr(rt.broker, "requeue_stale_acks", None)
    if requeue is not None:
        requeue(stale_after_s=rt.settings.broker_stale_consumer_s)
    end_expired_waits(rt)
    taken_ids = []
    found = find_interrupted(rt)
    for start in range(0, len(found), TAKE_BATCH):
        batch = found[start:start + TAKE_BATCH]
        for row, reason in _take(rt, batch):
            logger.info("resuming task %r: %s", row.task_id, reason)
            rt.observer.recovery(reason.kind)
            if row.token is not None:  # a lease its holder still had on the row (expired, or a dead process)
                rt.observer.takeover()
            taken_ids.append(row.task_id)
    # One broker round trip and one store write for all of them: a host restarted with a thousand
    # tasks in flight re-sends them in a second, not one task at a time.
    sent = []
    for start in range(0, len(taken_ids), RESEND_BATCH):
        batch = taken_ids[start:start + RESEND_BATCH]
        try:
            rt.send_many(batch)
        except BrokerUnavailable as exc:  # marked unsent again (each batch tried: none is left taken but unsent)
            logger.warning("recovery pass could not send %d task(s), the next pass does: %s", len(batch), exc)
            continue
        sent += batch
    return sent


def _take(rt: WorkerContext, batch: list[tuple[LeaseRow, Interruption]]) -> list[tuple[LeaseRow, Interruption]]:
    """The interrupted tasks of `batch` this process takes for redelivery: in one transaction, else one by one.

    One by one when the batch met a row lock held too long (a paused
    worker's): every other row is still taken, that one on a later pass.
    """
    try:
        taken = set(rt.leases.take_all_for_redelivery([row for row, _reason in batch]))
    except StoreUnavailable:
        return _take_one_by_one(rt, batch)
    return [(row, reason) for row, reason in batch if row.task_id in taken]


def _take_one_by_one(rt: WorkerContext,
                     batch: list[tuple[LeaseRow, Interruption]]) -> list[tuple[LeaseRow, Interruption]]:
    won = []
    for row, reason in batch:
        try:
            if rt.leases.take_for_redelivery(row):
                won.append((row, reason))
        except StoreUnavailable as exc:  # its row is locked by a writer (a paused worker?): next pass
            logger.info("task %r: skipped this recovery pass (%s)", row.task_id, exc.problem)
    return won


def end_expired_waits(rt: WorkerContext) -> list[str]:
    """End the waiting tasks whose reply timeout passed (`timed_out`) and send the next task of each thread."""
    try:
        ended = rt.store.expire_waits()
    except StoreUnavailable as exc:
        logger.info("could not end expired waits this pass (%s)", exc.problem)
        return []
    for task_id in ended:
        logger.warning("task %r timed out waiting for a reply", task_id)
        send_next_on_thread(rt, task_id)
    return ended


class _Every(threading.Thread):
    """Calls `work` every `interval_s` seconds on a thread of its own (so a database connection of its own)."""

    def __init__(self, name: str, work: Callable[[], object], *, interval_s: float, first_after_s: float) -> None:
        super().__init__(name=name, daemon=True)
        self.work = work
        self.interval_s = interval_s
        self.first_after_s = first_after_s
        self.stopped = threading.Event()

    def run(self) -> None:
        delay_s = self.first_after_s
        while not self.stopped.wait(delay_s):
            try:
                self.work()
            except LonghaulError as exc:  # a store or broker outage: said once per pass, no traceback
                logger.warning("%s pass failed (%s); retrying in %.1f s", self.name, exc, self.interval_s)
            except Exception:
                logger.exception("%s pass failed; retrying in %.1f s", self.name, self.interval_s)
            delay_s = self.interval_s


class Maintenance:
    """Renews the leases this process holds; with `recover`, resumes interrupted tasks.

    Renewal and recovery run on two threads, each with its own database
    connection: a recovery pass may wait (up to its row-lock timeout) on a
    task row that a paused or stuck worker holds locked, and renewal must
    never wait behind it, or this process's own live tasks would lose their
    leases. Each renewal also measures the offset from the database
    server's clock again (`TaskStore.sync_clock`), so lease times stay on
    the server's clock however this host's drifts.

    The first recovery pass runs at worker boot (`LonghaulMiddleware`), which
    is what makes a restarted worker pick up its predecessor's tasks within a
    second or two instead of waiting for the broker's redelivery timeout;
    the recovery thread repeats it every `recovery_interval_s` for tasks whose
    leases expire later (another host died).
    """

    def __init__(self, rt: WorkerContext, *, recover: bool) -> None:
        self.rt = rt
        settings = rt.settings
        self.threads = [_Every("longhaul-lease-renewal", self._renew, interval_s=settings.heartbeat_every_s,
                               first_after_s=0.0)]
        if recover:
            # A worker shutting down resumes nothing: what it just released is for the next worker.
            self.threads.append(_Every("longhaul-recovery", lambda: rt.stopping.is_set() or resend_interrupted(rt),
                                       interval_s=settings.recovery_interval_s,
                                       first_after_s=settings.recovery_interval_s))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def is_alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def stop(self) -> None:
        for thread in self.threads:
            thread.stopped.set()
        for thread in self.threads:
            thread.join(timeout=5)

    def _renew(self) -> None:
        self.rt.store.sync_clock()
        tokens = self.rt.held_tokens()
        held = self.rt.leases.renew(tokens, lease_s=self.rt.settings.lease_s)
        # A task that finished meanwhile gave its lease back: not a loss. With hundreds in flight, some do.
        still_held = len(set(tokens).intersection(self.rt.held_tokens()))
        if held < still_held:
            logger.warning("%d of %d leases were lost; their tasks stop at their next checkpoint",
                           still_held - held, still_held)
