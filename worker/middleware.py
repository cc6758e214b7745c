"""`LonghaulMiddleware`: Dramatiq's worker lifecycle, wired to the runtime."""

from __future__ import annotations

import gc
import logging
from typing import Any, Optional

from dramatiq import Broker, Message, Worker
from dramatiq.middleware import Middleware

from longhaul.models import LonghaulError, TaskStatus

from .context import WorkerContext
from .recovery import resend_interrupted

logger = logging.getLogger(__name__)


def freeze_boot_heap() -> None:
    """Take what is alive after boot out of the garbage collector's rounds (`gc.freeze`).

    Modules, classes and settings live as long as the worker process, yet
    every full collection walks them again; resuming a long task builds
    thousands of messages at once, which triggers full collections: 20-40 ms
    pauses on a ~14 ms rebuild (bench/checkpoint_cost.py). Only for worker
    processes: frozen objects that later become cyclic garbage are never
    collected, which is fine for boot objects and not for a test process.
    """
    gc.collect()
    gc.freeze()


class LonghaulMiddleware(Middleware):
    """Starts lease renewal and recovery on boot; stops loops between steps on shutdown.

    Dramatiq's `ShutdownNotifications` would interrupt a step mid-way; a
    step of an agent task is worth finishing, so on shutdown this sets the
    runtime's `stopping` flag instead and each loop stops after its current
    step, checkpointed, with its lease released for the next worker.
    """

    def __init__(self, runtime: WorkerContext) -> None:
        self.rt = runtime

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        """Re-send interrupted tasks before the consumers start, so their first fetch finds them."""
        self.rt.stopping.clear()
        if not self.rt.embedded:
            try:
                resend_interrupted(self.rt)
            except LonghaulError:
                logger.exception("boot recovery pass failed; the maintenance thread retries it")

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        if not self.rt.embedded:
            freeze_boot_heap()
        self.rt.start_maintenance(recover=not self.rt.embedded)

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self.rt.stopping.set()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self.rt.stop_maintenance()
        if self.rt.live is not None:  # what the last steps streamed reaches followers before the process exits
            self.rt.live.flush()

    def after_process_message(
        self, broker: Broker, message: Message, *, result: Any = None, exception: Optional[BaseException] = None
    ) -> None:
        """When Dramatiq gives up on a message (retries exhausted), fail its task with the reason."""
        if exception is None or not message.failed or not message.args or not isinstance(message.args[0], str):
            return
        task_id = message.args[0]
        # Retries has already counted this failed attempt; the retries that ran are one fewer.
        retries = max(0, int(message.options.get("retries", 1)) - 1)
        reason = f"gave up after {retries} retries: {type(exception).__name__}: {exception}"
        try:
            claim = self.rt.leases.claim(task_id, self.rt.claimant, lease_s=self.rt.settings.lease_s)
            if claim is not None:
                self.rt.store.finish(task_id, TaskStatus.FAILED, last_error=reason, lease_token=claim.token)
                logger.error("task %r failed: %s", task_id, reason)
        except LonghaulError:
            logger.exception("task %r: could not record its failure", task_id)
