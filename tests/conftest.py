"""Shared fixtures: a fresh store per test (SQLite, or PostgreSQL where a module asks), real Redis, real workers.

A test runs on SQLite unless its module (or the test) is marked
``@pytest.mark.backends("sqlite", "postgres")``: it then runs once per
backend, each PostgreSQL run in a fresh, empty schema of one database on
the session's server. ``@pytest.mark.sqlite_only(reason)`` skips the
PostgreSQL run of a test that checks something only SQLite has.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import pytest

from longhaul.models import (
    ChatMessage,
    CheckpointItem,
    CheckpointUpdate,
    TaskSnapshot,
    TaskSpec,
    TaskStatus,
    TaskStore,
    ToolCall,
)
from longhaul.models.traces import TraceWriter
from longhaul.worker.testing import IN_CI, FakeClock, PostgresServer, RedisServer, WorkerProcess

if TYPE_CHECKING:
    from longhaul.worker import Runtime

BACKENDS = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run tests marked ``backends(...)`` once per named backend (the PostgreSQL run of ``sqlite_only`` skipped)."""
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is None or "backend" not in metafunc.fixturenames:
        return
    unknown = set(marker.args) - set(BACKENDS)
    assert marker.args and not unknown, f"backends(...) takes some of {BACKENDS}, got {marker.args}"
    sqlite_only = metafunc.definition.get_closest_marker("sqlite_only")
    params = [
        pytest.param(name, marks=pytest.mark.skip(reason=f"SQLite only: {sqlite_only.args[0]}"))
        if sqlite_only is not None and name != "sqlite" else name
        for name in marker.args
    ]
    metafunc.parametrize("backend", params, indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every PostgreSQL run ``postgres``, so ``-m "not postgres"`` leaves them all out."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgres":
            item.add_marker(pytest.mark.postgres)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The store backend of this test run: ``sqlite`` unless the test is marked ``backends(...)``."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL cluster for the session: skipped locally when absent, a failure in CI."""
    if PostgresServer.find_bin_dir() is None:
        if IN_CI:
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed; .ci/run must install them")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_database(postgres_server: PostgresServer) -> str:
    """The database that holds every test's schema."""
    postgres_server.create_database("longhaul_tests")
    return "longhaul_tests"


_schema_numbers = itertools.count(1)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty store for this test.

    SQLite: a new file (not :memory:, so every thread sees it). PostgreSQL:
    a new schema on the session's server (a URL whose connections use it),
    dropped afterwards; ~5 ms where a database copied from a template
    costs ~300 ms.
    """
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'state' / 'tasks.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    database: str = request.getfixturevalue("postgres_database")
    schema = f"test_{next(_schema_numbers)}"
    yield server.create_schema(database, schema)
    server.drop_schema(database, schema)


@pytest.fixture
def store(db_url: str):
    task_store = TaskStore(db_url)
    yield task_store
    task_store.close_all()


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
    task_store.close_all()


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
    """Count rows of a table (`task`, `checkpoint`, `message`, `trace_batch`) from SQL, optionally of one task."""

    def count(task_store: TaskStore, table: str, *, task_id: Optional[str] = None) -> int:
        assert table in ("task", "checkpoint", "message", "trace_batch", "schema_version")
        if task_id is None:
            return task_store.db.execute_sql(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
        p = task_store.db.param
        if table == "task":
            sql = f'SELECT COUNT(*) FROM "task" WHERE "task_id" = {p}'
        else:
            sql = f'SELECT COUNT(*) FROM "{table}" WHERE "task_id" IN (SELECT "id" FROM "task" WHERE "task_id" = {p})'
        return task_store.db.execute_sql(sql, (task_id,)).fetchone()[0]

    return count


@pytest.fixture
def refuse_messages(backend: str) -> Callable[[TaskStore, str], None]:
    """Make the database reject (``injected failure``, an integrity error) any message with this content.

    A trigger on either backend: the failure comes from the database in the
    middle of a store transaction, as a full disk or a constraint would.
    """

    def install(task_store: TaskStore, content: str) -> None:
        quoted = content.replace("'", "''")
        if backend == "sqlite":
            task_store.db.execute_sql(
                f'CREATE TRIGGER refuse_messages BEFORE INSERT ON "message" WHEN NEW."content" = \'{quoted}\' '
                "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
            )
            return
        task_store.db.execute_sql(
            "CREATE FUNCTION refuse_messages() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.\"content\" = '{quoted}' THEN "
            "RAISE EXCEPTION 'injected failure' USING ERRCODE = 'check_violation'; END IF; "
            "RETURN NEW; END $$"
        )
        task_store.db.execute_sql(
            'CREATE TRIGGER refuse_messages BEFORE INSERT ON "message" FOR EACH ROW EXECUTE FUNCTION refuse_messages()'
        )

    return install


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
    from longhaul.worker import Runtime, load_settings, set_runtime

    runtime = Runtime(load_settings(database_url=db_url, redis_url=redis_server.url, lease_s=5))
    set_runtime(runtime)
    yield runtime
    set_runtime(None)
    runtime.broker.close()


@pytest.fixture
def make_runtime(db_url: str) -> Iterator[Callable[..., "Runtime"]]:
    """Build an embedded (in-process broker) runtime with settings overrides, made process-wide."""
    from longhaul.worker import Runtime, load_settings, set_runtime

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


# -- Chaos suite: the raw database file and the raw Redis queue ---------------


@pytest.fixture
def db_path(db_url: str) -> Path:
    """The SQLite file behind `db_url`, for raw `sqlite3` connections (faults, integrity checks)."""
    from longhaul.models.db import sqlite_path_from_url

    path = sqlite_path_from_url(db_url)
    assert path is not None
    return path


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[Any]:
    """A plain redis-py client on the test's Redis, to read and write Dramatiq's keys directly."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


# -- Traces and exports: tasks with a known history, the CLI as a subprocess ---


@pytest.fixture
def make_stepped_task(clocked_store: TaskStore, clock: FakeClock) -> Callable[..., str]:
    """Store a task as the step loop would have, on `clocked_store`; returns its id.

    The history opens with the prompt; in step i the assistant asks for
    `calls` ``shell`` calls (ids ``call_0``...), each answered by a tool
    message ``tool_output(i, call)``, and the checkpoint records them (the
    ``(step, call)`` pairs in `failing` failed). The trace opens with
    ``session_started`` (a row of its own) and holds each call's
    ``tool_call_completed``/``tool_call_failed`` with ``duration_ms`` =
    10 x step + call + 0.5. Every step is one clock second after the last;
    `finish` completes the task with a final answer one second later.
    """

    def make(task_id: str = "task-1", *, steps: int = 3, calls: int = 1,
             tool_output: Callable[[int, int], str] = lambda step, call: f"output {step}.{call}",
             failing: tuple[tuple[int, int], ...] = (), finish: bool = True, provider: str = "scripted",
             prompt: str = "do it") -> str:
        store = clocked_store
        store.create_task(task_id=task_id, thread_id=task_id, channel="test", provider=provider, model="m",
                          spec=TaskSpec(prompt=prompt))
        store.append_messages(task_id, [ChatMessage.user(prompt)])
        tracer = TraceWriter(agent=provider, model="m", job_type="agent_task",
                             next_sequence=store.next_trace_sequence(task_id), started_at=clock(), clock=clock)
        tracer.emit("session_started", {"thread_id": task_id})
        store.append_traces(task_id, tracer.take())
        for step in range(1, steps + 1):
            clock.advance(1)
            tool_calls = [ToolCall(id=f"call_{call}", name="shell", arguments={"command": f"echo {step}"})
                          for call in range(calls)]
            messages, items = [ChatMessage.assistant(f"step {step}", tool_calls=tool_calls)], []
            for call in range(calls):
                ok = (step, call) not in failing
                output = tool_output(step, call)
                tracer.emit("tool_call_completed" if ok else "tool_call_failed",
                            {"step": step, "tool": "shell", "call_id": f"call_{call}",
                             "duration_ms": 10 * step + call + 0.5})
                messages.append(ChatMessage(role="tool", content=output, tool_call_id=f"call_{call}", name="shell"))
                items.append(CheckpointItem(tool_name="shell", success=ok, output=output))
            store.record_checkpoint(
                CheckpointUpdate(task_id=task_id, thread_id=task_id, channel="test", provider=provider, model="m",
                                 step_index=step, new_messages=messages, items=items),
                traces=tracer.take(),
            )
        if finish:
            clock.advance(1)
            tracer.emit("done", {"status": "completed"})
            store.finish(task_id, TaskStatus.COMPLETED, final_response=f"done after {steps} steps",
                         new_messages=[ChatMessage.assistant(f"done after {steps} steps")], traces=tracer.take())
        return task_id

    return make


#: The `longhaul` console script, independent of PATH.
LONGHAUL = [sys.executable, "-c", "from longhaul.worker.cli import main; main()"]


@pytest.fixture
def cli_env(db_url: str) -> dict[str, str]:
    """The environment of a fresh machine: this test's database, no Redis, no other settings."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("LONGHAUL_") and key != "REDIS_URL"}
    env["LONGHAUL_DATABASE_URL"] = db_url
    return env


@pytest.fixture
def longhaul(cli_env: dict[str, str], tmp_path: Path) -> Callable[..., "subprocess.CompletedProcess[str]"]:
    """Run one `longhaul` command to its end; extra keyword arguments set environment variables."""

    def run(*args: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LONGHAUL, *args], env={**cli_env, **env}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=timeout_s)

    return run


def _as_in_a_terminal() -> None:
    """Give the child the SIGINT a terminal gives it.

    A command started in the background by a non-interactive shell (as a CI
    script may start pytest) inherits SIGINT *ignored*, and Python then
    installs no KeyboardInterrupt handler: Ctrl-C could not be tested.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Background:
    """A `longhaul` command left running, its output in files."""

    def __init__(self, args: tuple[str, ...], env: dict[str, str], workdir: Path, name: str) -> None:
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([*LONGHAUL, *args], env=env, cwd=workdir, stdout=out, stderr=err,
                                         preexec_fn=_as_in_a_terminal)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture
def start_longhaul(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Background]]:
    """Start `longhaul` commands in the background; any still running are killed at teardown."""
    started: list[Background] = []

    def start(*args: str) -> Background:
        started.append(Background(args, cli_env, tmp_path, f"longhaul-{len(started)}"))
        return started[-1]

    yield start
    for background in started:
        if background.proc.poll() is None:
            background.proc.kill()
            background.proc.wait()
