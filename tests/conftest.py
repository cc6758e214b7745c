"""Shared fixtures: a fresh SQLite store per test, real Redis, real workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import TaskStore


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A fresh SQLite database file (not :memory:, so every thread sees it)."""
    return f"sqlite:///{tmp_path / 'state' / 'tasks.db'}"


@pytest.fixture
def store(db_url: str):
    task_store = TaskStore(db_url)
    yield task_store
    task_store.close()


# -- Models test suite: a fixed clock, record factories, row counts ----------

from typing import Any, Callable, Optional  # noqa: E402

from models import ChatMessage, CheckpointItem, CheckpointUpdate, TaskSnapshot, TaskStatus  # noqa: E402

#: The identity fields the seed's tests use for every task.
TASK_IDENTITY: dict[str, str] = dict(
    task_id="task-1", thread_id="thread-1", channel="telegram", provider="openai", model="gpt-test"
)


class FakeClock:
    """A clock (seconds since the epoch) that moves only when a test moves it."""

    def __init__(self, start_s: float = 1_700_000_000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> float:
        self.now_s += seconds
        return self.now_s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked_store(db_url: str, clock: FakeClock):
    """A store whose timestamps (and lease expiries) follow `clock`."""
    task_store = TaskStore(db_url, clock=clock)
    yield task_store
    task_store.close()


@pytest.fixture
def make_snapshot() -> Callable[..., TaskSnapshot]:
    """Build a `TaskSnapshot` like the seed's `sample_snapshot`; keywords override fields."""

    def make(status: TaskStatus | str = TaskStatus.RUNNING, **overrides: Any) -> TaskSnapshot:
        fields: dict[str, Any] = dict(
            TASK_IDENTITY,
            status=status,
            execution_history=[ChatMessage.user("hello")],
            resumable_history=[ChatMessage.user("hello"), ChatMessage.assistant("working on it")],
            latest_checkpoint_note="Resume from the latest confirmed step.",
        )
        fields.update(overrides)
        return TaskSnapshot(**fields)

    return make


@pytest.fixture
def make_update() -> Callable[..., CheckpointUpdate]:
    """Build a `CheckpointUpdate` for one step: two new messages and one tool item by default."""

    def make(step_index: int = 1, *, new_messages: Optional[list[ChatMessage]] = None,
             **overrides: Any) -> CheckpointUpdate:
        fields: dict[str, Any] = dict(
            TASK_IDENTITY,
            step_index=step_index,
            new_messages=(
                [ChatMessage.assistant(f"step {step_index}"),
                 ChatMessage(role="tool", content=f"result {step_index}", tool_call_id=f"call-{step_index}")]
                if new_messages is None else new_messages
            ),
            checkpoint_note=f"after step {step_index}",
            items=[CheckpointItem(tool_name="shell", arguments={"command": f"echo {step_index}"},
                                  success=True, output="ok")],
        )
        fields.update(overrides)
        return CheckpointUpdate(**fields)

    return make


@pytest.fixture
def count_rows() -> Callable[..., int]:
    """Count rows of a table (`task`, `checkpoint`, `message`) straight from SQL, optionally for one task."""

    def count(task_store: TaskStore, table: str, *, task_id: Optional[str] = None) -> int:
        assert table in ("task", "checkpoint", "message", "schema_version")
        if task_id is None:
            return task_store.db.execute_sql(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
        if table == "task":
            sql = 'SELECT COUNT(*) FROM "task" WHERE "task_id" = ?'
        else:
            sql = f'SELECT COUNT(*) FROM "{table}" WHERE "task_id" IN (SELECT "id" FROM "task" WHERE "task_id" = ?)'
        return task_store.db.execute_sql(sql, (task_id,)).fetchone()[0]

    return count


# -- real servers and worker processes ----------------------------------------

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Callable, Iterator, Optional

if TYPE_CHECKING:
    from worker import Runtime

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], object], *, timeout_s: float, what: str, poll_s: float = 0.05) -> object:
    """Poll `predicate` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), timeout_s=10, what="redis-server to answer PING")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart_empty(self) -> None:
        """Lose every queued message, as a crashed broker without persistence does."""
        self.stop()
        self.start()


def _pings(client) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server: skipped locally when absent, a failure in CI."""
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is not installed; .ci/run must install it")
        pytest.skip("redis-server not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


class WorkerProcess:
    """`dramatiq worker.actors` in its own process group, killable as a whole."""

    def __init__(self, env: dict[str, str], *, processes: int, threads: int, log_path: Path) -> None:
        self.env = env
        self.processes = processes
        self.threads = threads
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.started_at = 0.0

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "worker.actors", "--processes", str(self.processes),
             "--threads", str(self.threads)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its worker processes."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def terminate(self, *, timeout_s: float = 60) -> int:
        """SIGTERM, as a deploy does, and wait for a graceful exit."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def worker_env(db_url: str, redis_server: RedisServer, tmp_path: Path) -> dict[str, str]:
    """Environment for worker processes and CLI calls sharing this test's store and Redis."""
    env = dict(os.environ)
    env.update(
        LONGHAUL_DATABASE_URL=db_url,
        LONGHAUL_REDIS_URL=redis_server.url,
        LONGHAUL_LEASE_S="5",
        LONGHAUL_RECOVERY_INTERVAL_S="0.5",
        LONGHAUL_MIN_BACKOFF_MS="100",
        LONGHAUL_LOG_LEVEL="INFO",
        # Prefetch no more than the threads can run: a killed worker then strands
        # no queued message in its Redis ack set (see README, "Recovery").
        dramatiq_queue_prefetch="4",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    return env


@pytest.fixture
def start_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start dramatiq worker processes; every one still running is killed at teardown."""
    started: list[WorkerProcess] = []

    def start(processes: int = 1, threads: int = 4, **env: str) -> WorkerProcess:
        worker = WorkerProcess({**worker_env, **env}, processes=processes, threads=threads,
                               log_path=tmp_path / f"worker-{len(started)}.log")
        started.append(worker.start())
        return worker

    yield start
    for worker in started:
        worker.kill()


def ledger_counts(path: Path) -> Counter[str]:
    """How often each ledger line (``<task_id> step <i>``) was written."""
    if not path.exists():
        return Counter()
    return Counter(line for line in path.read_text().splitlines() if line)


@pytest.fixture
def client_runtime(db_url: str, redis_server: RedisServer) -> Iterator["Runtime"]:
    """This test process as a Redis client: `worker.enqueue` sends to the real broker."""
    from worker import Runtime, load_settings, set_runtime

    runtime = Runtime(load_settings(database_url=db_url, redis_url=redis_server.url, lease_s=5))
    set_runtime(runtime)
    yield runtime
    set_runtime(None)
    runtime.broker.close()


@pytest.fixture
def make_runtime(db_url: str) -> Iterator[Callable[..., "Runtime"]]:
    """Build an embedded (in-process broker) runtime with settings overrides, made process-wide."""
    from worker import Runtime, load_settings, set_runtime

    built: list[Runtime] = []

    def make(**overrides: object) -> Runtime:
        settings = load_settings(**{"database_url": db_url, "redis_url": None, "min_backoff_ms": 10,
                                    "max_backoff_ms": 100, **overrides})
        runtime = Runtime(settings, embedded=True)
        set_runtime(runtime)
        built.append(runtime)
        return runtime

    yield make
    set_runtime(None)
    for runtime in built:
        runtime.stop_embedded_worker()
        runtime.stop_maintenance()


@pytest.fixture
def embedded_runtime(make_runtime: Callable[..., "Runtime"]) -> "Runtime":
    """An embedded runtime with default settings (fast retries)."""
    return make_runtime()
