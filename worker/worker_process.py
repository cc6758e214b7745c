"""One worker process of a `longhaul worker` pool: Dramatiq's worker threads, stopped only gracefully.

Run by `worker.supervisor` as ``python -m longhaul.worker.worker_process
--threads N``. It builds the runtime (`worker.actors`; exit code 2 when the
store cannot be opened), starts a Dramatiq `Worker` on it, and runs until
SIGTERM, SIGINT or SIGHUP.

Every one of those signals, however often it arrives, asks for the same
graceful stop: running loops finish their current step, checkpoint and
release their lease, then the process exits 0. Dramatiq's own worker
processes exit at once on a *second* SIGTERM ("Killing worker process"),
and a supervisor that signals the whole process group
(``kill -TERM -- -PGID``: systemd, honcho, docker's init) delivers two, one
direct and one forwarded by Dramatiq's parent, which cut the step in
flight and left its lease to a dead pid.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Optional, Sequence

from dramatiq import Worker

logger = logging.getLogger("longhaul.worker.worker_process")  # also when run as __main__

#: The signals that stop a worker process gracefully.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: How long a stopping process waits for its running steps, in milliseconds (a step is worth finishing).
SHUTDOWN_TIMEOUT_MS = 24 * 3600 * 1000
#: How often the main thread looks whether a stop was asked for, in seconds.
POLL_S = 0.2


def configure_logging() -> None:
    """Log lines with the process id, at `LONGHAUL_LOG_LEVEL` (default INFO, as Dramatiq's workers)."""
    name = os.environ.get("LONGHAUL_LOG_LEVEL", "INFO").upper()
    level = logging.getLevelName(name)
    logging.basicConfig(level=level if isinstance(level, int) else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [pid %(process)d] %(levelname)s %(name)s: %(message)s")
    if not isinstance(level, int):
        logger.warning("LONGHAUL_LOG_LEVEL: %r is not a level (DEBUG, INFO, WARNING, ERROR); using INFO", name)


def run_worker_process(*, threads: int, supervisor_pid: Optional[int] = None) -> int:
    """Serve longhaul's queue with `threads` worker threads until a stop signal; returns the exit code.

    With `supervisor_pid`, the process also stops (gracefully) once that
    process is no longer its parent: a SIGKILLed supervisor leaves no
    orphaned workers serving on unsupervised.
    """
    stop = threading.Event()
    stop_signals: list[int] = []

    def request_stop(signum: int, _frame: Optional[FrameType]) -> None:
        # Only note it: logging here could interrupt a log write of this thread (a reentrant call).
        stop_signals.append(signum)
        stop.set()

    # Installed before the runtime is built: a stop asked for while booting is honoured once booted.
    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)

    from . import actors  # builds the runtime; exits with code 2 if the store cannot be opened

    broker = actors.broker
    broker.emit_after("process_boot")
    worker = Worker(broker, worker_threads=threads)
    worker.start()
    logger.info("worker process ready: %d thread(s) on queue %r", threads, actors.runtime.settings.queue_name)
    while not stop.wait(POLL_S):
        if supervisor_pid is not None and os.getppid() != supervisor_pid:
            logger.warning("the supervisor (pid %d) is gone; stopping after the current steps", supervisor_pid)
            break
    if stop_signals:
        logger.info("%s: stopping after the current steps", signal.Signals(stop_signals[0]).name)
    worker.stop(timeout=SHUTDOWN_TIMEOUT_MS)
    broker.close()
    logger.info("worker process stopped")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m longhaul.worker.worker_process", description=__doc__)
    parser.add_argument("--threads", type=int, default=4, help="worker threads (at least 1)")
    parser.add_argument("--supervisor-pid", type=int, help="stop when this process is no longer the parent")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads: must be at least 1")
    configure_logging()
    sys.exit(run_worker_process(threads=args.threads, supervisor_pid=args.supervisor_pid))


if __name__ == "__main__":
    main()
