"""`longhaul worker`: a pool of worker processes that replaces the ones that die.

Dramatiq's own command (``dramatiq longhaul.worker.actors --processes N``)
stops the whole pool when one worker process dies ("exited unexpectedly
... Shutting down"), so one OOM kill takes a host's every worker down; and
its worker processes die mid-step on the second SIGTERM a process-group
signal delivers. This supervisor keeps N `worker.worker_process` children
running instead:

- A child that exits while the pool is not stopping is replaced at once;
  one that keeps dying within `HEALTHY_AFTER_S` of its start is restarted
  after a growing delay (up to `MAX_RESTART_DELAY_S`), so a crash loop
  does not spin. That includes a child that cannot open the store (exit
  code 2, say while PostgreSQL restarts): the pool keeps trying, and
  `longhaul health` reports the store as down meanwhile.
- SIGTERM or SIGINT, sent to the supervisor or to the whole process group
  (``kill -TERM -- -PGID``, what systemd, honcho and docker send), is a
  graceful stop: each child finishes its current steps, checkpoints and
  releases its leases; the supervisor exits 0 once every child has.
- SIGHUP restarts the children gracefully (new code, new settings); the
  supervisor itself keeps running.
- A supervisor that is SIGKILLed leaves no orphans: each child notices
  its parent is gone and stops gracefully.

Children run in the supervisor's process group, so a supervisor that
signals the group reaches them all; the supervisor forwards the signal
too, which a child treats as the same request.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Callable, Optional

logger = logging.getLogger(__name__)

#: Exit code of a child that cannot open its store (see `worker.actors`).
EXIT_CANNOT_START = 2
#: A child that lived this long was healthy: its death is not part of a crash loop.
HEALTHY_AFTER_S = 10.0
#: The first restart delay of a crash loop, doubled at each quick death, in seconds.
FIRST_RESTART_DELAY_S = 0.5
#: The longest delay between restarts of a child that keeps dying, in seconds.
MAX_RESTART_DELAY_S = 30.0
#: How often the supervisor looks at its children, in seconds.
POLL_S = 0.1
#: The module a child runs, by worker pool (`Settings.worker_pool`).
WORKER_MODULES = {"greenlets": "longhaul.worker.greenlet_process", "threads": "longhaul.worker.worker_process"}


@dataclass
class Slot:
    """One place in the pool: the child running there, and how its predecessors died."""

    index: int
    child: Optional[subprocess.Popen[bytes]] = None
    started_at_s: float = 0.0  # time.monotonic() when `child` started
    quick_deaths: int = 0  # deaths in a row within HEALTHY_AFTER_S of their start
    restart_at_s: float = field(default=0.0)  # time.monotonic() from which a new child may start


class Supervisor:
    """Runs `processes` worker processes of `threads` threads each until asked to stop.

    `pool` is what a process runs its tasks on: ``greenlets``
    (`greenlet_process`) or OS ``threads`` (`worker_process`).
    """

    def __init__(self, *, processes: int, threads: int, pool: str = "greenlets", python: str = sys.executable,
                 on_child_exit: Optional[Callable[[int], None]] = None) -> None:
        if processes < 1 or threads < 1:
            raise ValueError("processes and threads: must be at least 1")
        if pool not in WORKER_MODULES:
            raise ValueError(f"pool: one of {', '.join(WORKER_MODULES)}, got {pool!r}")
        self.threads = threads
        self.module = WORKER_MODULES[pool]
        #: Told the pid of each child that exited (the metrics endpoint drops its live gauges).
        self.on_child_exit = on_child_exit
        self.python = python
        self.slots = [Slot(index) for index in range(processes)]
        # Set by the signal handlers, acted on (and logged) by the loop: a handler that logged could
        # interrupt a log write of the main thread and fail with a reentrant call.
        self._stop_signal: Optional[int] = None
        self._restart_requested = False

    # -- signals -----------------------------------------------------------------------------

    def _on_stop(self, signum: int, _frame: Optional[FrameType]) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum

    def _on_restart(self, _signum: int, _frame: Optional[FrameType]) -> None:
        self._restart_requested = True

    # -- children ----------------------------------------------------------------------------

    def live_children(self) -> list[subprocess.Popen[bytes]]:
        return [slot.child for slot in self.slots if slot.child is not None and slot.child.poll() is None]

    def _start(self, slot: Slot) -> None:
        argv = [self.python, "-m", self.module, "--threads", str(self.threads),
                "--supervisor-pid", str(os.getpid())]
        slot.child = subprocess.Popen(argv)
        slot.started_at_s = time.monotonic()
        logger.info("worker process %d started (pid %d)", slot.index, slot.child.pid)

    def _signal_children(self, signum: signal.Signals) -> None:
        for child in self.live_children():
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    def _reap(self, slot: Slot, now_s: float) -> None:
        """Forget a child that exited and schedule its replacement."""
        assert slot.child is not None
        code = slot.child.returncode
        pid = slot.child.pid
        slot.child = None
        if self.on_child_exit is not None:
            self.on_child_exit(pid)
        lived_s = now_s - slot.started_at_s
        slot.quick_deaths = slot.quick_deaths + 1 if lived_s < HEALTHY_AFTER_S else 0
        delay_s = 0.0 if slot.quick_deaths <= 1 else min(
            MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2 ** (slot.quick_deaths - 2))
        slot.restart_at_s = now_s + delay_s
        if code < 0:
            how = f"was killed by {signal.Signals(-code).name if -code in signal.valid_signals() else -code}"
        elif code == EXIT_CANNOT_START:
            how = "could not open the task store (exit code 2, its log says why)"
        else:
            how = f"exited with code {code}"
        log = logger.info if code == 0 else logger.warning
        log("worker process %d (pid %d) %s after %.1f s; starting a replacement%s", slot.index, pid, how, lived_s,
            f" in {delay_s:.1f} s" if delay_s else "")

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; returns the exit code (0: every child stopped gracefully)."""
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_restart)
        for slot in self.slots:
            self._start(slot)
        while self._stop_signal is None:
            now_s = time.monotonic()
            if self._restart_requested:
                self._restart_requested = False
                logger.info("SIGHUP: restarting the worker processes after their current steps")
                self._signal_children(signal.SIGTERM)
            for slot in self.slots:
                if self._stop_signal is not None:
                    break
                if slot.child is not None and slot.child.poll() is not None:
                    self._reap(slot, now_s)
                if slot.child is None and now_s >= slot.restart_at_s:
                    self._start(slot)
            time.sleep(POLL_S)
        logger.info("%s: stopping %d worker process(es) after their current steps",
                    signal.Signals(self._stop_signal).name, len(self.live_children()))
        self._signal_children(signal.SIGTERM)
        for child in [slot.child for slot in self.slots if slot.child is not None]:
            child.wait()
            if self.on_child_exit is not None:
                self.on_child_exit(child.pid)
        logger.info("every worker process stopped")
        return 0


def supervise(*, processes: int, threads: int, pool: str = "greenlets",
              on_child_exit: Optional[Callable[[int], None]] = None) -> int:
    """Run a supervised pool of worker processes in this process; returns its exit code."""
    return Supervisor(processes=processes, threads=threads, pool=pool, on_child_exit=on_child_exit).run()
