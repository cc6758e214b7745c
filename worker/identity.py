"""Who this worker process is, and whether another one is still alive."""

from __future__ import annotations

import os
import uuid
from typing import Callable, Optional

import psutil

from longhaul.models import Claimant, LeaseRow


def process_started_at(pid: int) -> Optional[float]:
    """When process `pid` started (epoch seconds), or None if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_process_alive(pid: int, started_at: Optional[float]) -> bool:
    """True if `pid` runs and is the process that started at `started_at`.

    Comparing start times guards against a recycled pid (a restarted
    container often gives the new worker the dead one's pid). A zombie, killed
    but not yet reaped, counts as dead.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True
    return started_at is None or abs(created - started_at) < 0.5


#: Answers whether a process (pid, start time) is alive: `is_process_alive`, or a `LivenessView` of it.
Liveness = Callable[[int, Optional[float]], bool]


class LivenessView:
    """`is_process_alive`, each (pid, start time) asked of the OS once: what one recovery pass knows.

    A pass looks at every unfinished task, and a thousand tasks in flight
    are held by a handful of processes; asking the OS once per task cost a
    `psutil.Process` (several /proc reads) each. A view lives for one pass
    only: a process that dies meanwhile is seen dead by the next one.
    """

    def __init__(self) -> None:
        self._alive: dict[tuple[int, Optional[float]], bool] = {}

    def __call__(self, pid: int, started_at: Optional[float]) -> bool:
        key = (pid, started_at)
        alive = self._alive.get(key)
        if alive is None:
            alive = self._alive[key] = is_process_alive(pid, started_at)
        return alive


def holder_is_dead(row: LeaseRow, *, host: str, alive: Optional[Liveness] = None) -> bool:
    """True if a process of `host` (this one's) holds the task's lease and that process is gone.

    Only this host's processes can be checked; a lease held on another host
    is given up by waiting for it to expire. `alive` answers for the OS (a
    `LivenessView` shared by one pass), `is_process_alive` by default.
    """
    if row.token is None or row.host != host or row.pid is None:
        return False
    return not (alive or is_process_alive)(row.pid, row.pid_started_at)


def current_claimant(host: str) -> Claimant:
    """This process, as recorded on the leases it takes."""
    pid = os.getpid()
    return Claimant(
        owner=f"{host}:{pid}:{uuid.uuid4().hex[:8]}",
        host=host,
        pid=pid,
        pid_started_at=process_started_at(pid),
    )
