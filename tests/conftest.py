"""Shared fixtures: a fresh SQLite store per test, real Redis, real workers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import pytest

from models import ChatMessage, CheckpointItem, CheckpointUpdate, TaskSnapshot, TaskStatus, TaskStore
from worker.testing import IN_CI, FakeClock, RedisServer, WorkerProcess

if TYPE_CHECKING:
    from worker import Runtime



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

#: The identity fields the seed's tests use for every task.
TASK_IDENTITY: dict[str, str] = dict(
    task_id="task-1", thread_id="thread-1", channel="telegram", provider="openai", model="gpt-test"
)


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


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server: skipped locally when absent, a failure in CI."""
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is not installed; .ci/run must install it")
        pytest.skip("redis-server not installed")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


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
