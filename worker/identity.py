"""Who this worker process is, and whether another one is still alive."""

from __future__ import annotations

import os
import uuid
from typing import Optional

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


def holder_is_dead(row: LeaseRow, *, host: str) -> bool:
    """True if a process of `host` (this one's) holds the task's lease and that process is gone.

    Only this host's processes can be checked; a lease held on another host
    is given up by waiting for it to expire.
    """
    return (row.token is not None and row.host == host and row.pid is not None
            and not is_process_alive(row.pid, row.pid_started_at))


def current_claimant(host: str) -> Claimant:
    """This process, as recorded on the leases it takes."""
    pid = os.getpid()
    return Claimant(
        owner=f"{host}:{pid}:{uuid.uuid4().hex[:8]}",
        host=host,
        pid=pid,
        pid_started_at=process_started_at(pid),
    )
