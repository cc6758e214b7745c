"""Real parts for tests and benchmarks: a throwaway Redis, worker processes, ledgers.

Used by longhaul's own test suite and `bench/`; useful to anyone testing
tasks built on longhaul against real processes rather than mocks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

#: True under CI: a missing real server is then a failure, not a skip.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class FakeClock:
    """A clock (seconds since the epoch) that moves only when a test moves it.

    Pass it as ``TaskStore(url, clock=FakeClock())``: leases expire when the
    test says so, not after a sleep.
    """

    def __init__(self, start_s: float = 1_700_000_000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> float:
        self.now_s += seconds
        return self.now_s


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], *, timeout_s: float, what: str, poll_s: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; `AssertionError` naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def ledger_counts(path: Path) -> Counter[str]:
    """How often each ledger line (``<task_id> step <i>``) was written."""
    if not path.exists():
        return Counter()
    return Counter(line for line in path.read_text().splitlines() if line)


class RedisServer:
    """A redis-server on a free loopback port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.pings, timeout_s=10, what="redis-server to answer PING")
        return self

    def pings(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart_empty(self) -> None:
        """Lose every queued message, as a crashed broker without persistence does."""
        self.stop()
        self.start()


class WorkerProcess:
    """``dramatiq worker.actors`` in its own process group, killable as a whole."""

    def __init__(self, env: dict[str, str], *, processes: int, threads: int, log_path: Path) -> None:
        self.env = env
        self.processes = processes
        self.threads = threads
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.started_at = 0.0  # time.monotonic() at start

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dramatiq", "worker.actors", "--processes", str(self.processes),
                 "--threads", str(self.threads)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its worker processes."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def terminate(self, *, timeout_s: float = 60) -> int:
        """SIGTERM, as a deploy does; waits for the graceful exit and returns its code."""
        assert self.proc is not None, "worker not running"
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
