"""Opening a store: `longhaul migrate`, schema versions, PostgreSQL connections and their errors."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Iterator

import pytest

from longhaul.models import ChatMessage, Claimant, StoreUnavailable, TaskSpec, TaskStatus, TaskStore, ToolCall
from longhaul.models.tables import SCHEMA_VERSION
from longhaul.worker.testing import free_port, wait_until

#: Columns schema 2 added to `task`; dropping them (and the trace table) turns a store back into schema 1.
V2_TASK_COLUMNS = ("turn_count", "tool_call_count", "input_tokens", "output_tokens", "cache_read_tokens",
                   "cache_creation_tokens", "reasoning_tokens", "request_count", "cost_usd")


def set_schema_version(task_store: TaskStore, version: int) -> None:
    p = task_store.db.param
    with task_store.db.atomic():
        task_store.db.execute_sql('DELETE FROM "schema_version"')
        task_store.db.execute_sql(f'INSERT INTO "schema_version" ("version", "applied_at") VALUES ({p}, 0)',
                                  (version,))


def migrate_from(version: int, longhaul) -> None:
    """Run `longhaul migrate` on a store at schema `version`; it must say it upgraded it to the current one."""
    upgraded = longhaul("migrate")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.startswith(f"schema upgraded from version {version} to {SCHEMA_VERSION} (")


@pytest.fixture
def newer_store(db_url: str) -> str:
    """A store whose schema a later longhaul wrote; returns its URL."""
    with TaskStore(db_url) as store:
        set_schema_version(store, SCHEMA_VERSION + 1)
    return db_url


# -- longhaul migrate, on both backends ---------------------------------------------------


@pytest.mark.backends("sqlite", "postgres")
def test_migrate_creates_the_schema_once_and_then_reports_it_current(longhaul, backend):
    created = longhaul("migrate", "--json")
    assert created.returncode == 0, created.stderr
    report = json.loads(created.stdout)
    assert (report["from_version"], report["to_version"], report["changed"]) == (0, SCHEMA_VERSION, True)
    assert report["backend"] == {"sqlite": "sqlite", "postgres": "postgresql"}[backend]

    again = longhaul("migrate")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"schema up to date at version {SCHEMA_VERSION} (")


@pytest.mark.backends("sqlite", "postgres")
def test_migrate_upgrades_a_version_1_store_and_keeps_its_tasks(db_url, make_update, longhaul):
    with TaskStore(db_url) as store:
        store.record_checkpoint(make_update(1, new_messages=[ChatMessage.assistant("a"), ChatMessage.assistant("b")]))
        for column in V2_TASK_COLUMNS:
            store.db.execute_sql(f'ALTER TABLE "task" DROP COLUMN "{column}"')
        store.db.execute_sql('DROP TABLE "trace_batch"')
        set_schema_version(store, 1)

    migrate_from(1, longhaul)
    with TaskStore(db_url) as store:
        assert store.schema_version() == SCHEMA_VERSION
        record = store.get("task-1")
        assert (record.checkpoint_count, record.turn_count, record.usage.total_tokens) == (1, 2, 0)
        assert store.traces("task-1") == []


@pytest.mark.backends("sqlite", "postgres")
def test_migrate_adds_the_tool_success_flag_to_a_version_8_store_whose_journaled_results_then_have_none(
    db_url, make_update, longhaul
):
    with TaskStore(db_url) as store:
        store.record_checkpoint(make_update(1, new_messages=[ChatMessage.assistant("a")]))
        answer = ChatMessage.assistant("go", tool_calls=[ToolCall(id=f"c{i}", name="note") for i in range(2)])
        step = store.journal_answer("task-1", 2, answer)
        store.journal_result(step, 0, ChatMessage(role="tool", content="done", tool_call_id="c0", name="note"),
                             success=True)
        store.db.execute_sql('ALTER TABLE "message" DROP COLUMN "tool_succeeded"')
        set_schema_version(store, 8)

    migrate_from(8, longhaul)
    with TaskStore(db_url) as store:
        reopened = store.open_step("task-1")
        assert reopened is not None and [c for c, _ in reopened.pending_calls] == [1]
        assert reopened.succeeded == (None, None)  # stored before the flag: the loop guesses from the text
        assert store.journal_result(reopened, 1, ChatMessage(role="tool", content="x", tool_call_id="c1", name="note"),
                                    success=False).succeeded == (None, False)
        assert store.open_step("task-1").succeeded == (None, False)


@pytest.mark.backends("sqlite", "postgres")
def test_migrate_brings_a_version_7_store_to_waiting_and_steering_and_keeps_its_tasks(db_url, make_update, longhaul):
    with TaskStore(db_url) as store:
        store.record_checkpoint(make_update(1, new_messages=[ChatMessage.assistant("a")]))
        for column in ("waiting_for", "reply_due_at", "steering", "steered"):
            store.db.execute_sql(f'ALTER TABLE "task" DROP COLUMN "{column}"')
        store.db.execute_sql('ALTER TABLE "message" DROP COLUMN "tool_succeeded"')
        set_schema_version(store, 7)

    migrate_from(7, longhaul)
    with TaskStore(db_url) as store:
        columns = {column.name for column in store.db.get_columns("task")}
        assert {"waiting_for", "reply_due_at", "steering", "steered"} <= columns
        record = store.get("task-1")
        assert (record.checkpoint_count, [m.content for m in record.execution_history]) == (1, ["a"])
        assert store.wait_of("task-1") is None and store.step_boundary("task-1") == (None, False)
        assert [t.task_id for t in store.list_tasks(status="waiting")] == []
        store.admit_task(task_id="new", thread_id="t7", channel="api", provider="scripted", model="m",
                         spec=TaskSpec(prompt="hi"))
        store.finish("new", TaskStatus.COMPLETED, final_response="hello")
        assert [(m.role, m.content) for m in store.thread_story("t7").turns] == [  # the story reads the new column
            ("user", "hi"), ("assistant", "hello")]


@pytest.mark.backends("sqlite", "postgres")
def test_migrate_refuses_a_schema_newer_than_it_knows(newer_store, longhaul):
    refused = longhaul("migrate")
    assert refused.returncode == 1
    assert f"database schema version {SCHEMA_VERSION + 1} is newer than this longhaul supports" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.backends("postgres")
def test_hosts_opening_a_fresh_postgres_database_together_create_the_schema_once(db_url, tmp_path: Path):
    opener = (
        "import sys, time\nfrom pathlib import Path\nfrom longhaul.models import TaskStore\n"
        "go = Path(sys.argv[2])\n(go.parent / f'ready-{sys.argv[3]}').touch()\n"
        "while not go.exists(): time.sleep(0.005)\n"
        "with TaskStore(sys.argv[1]) as store: print(store.schema_migration.from_version)\n"
    )
    go = tmp_path / "go"
    openers = [subprocess.Popen([sys.executable, "-c", opener, db_url, str(go), str(n)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for n in range(4)]
    wait_until(lambda: all((tmp_path / f"ready-{n}").exists() for n in range(4)), timeout_s=60,
               what="every opener to be ready")
    go.touch()
    outcomes = [proc.communicate(timeout=60) for proc in openers]

    assert [proc.returncode for proc in openers] == [0, 0, 0, 0], [err for _, err in outcomes]
    # Exactly one of them found the database empty; the others found the schema it created.
    assert sorted(out.strip() for out, _ in outcomes) == ["0"] + [str(SCHEMA_VERSION)] * 3
    with TaskStore(db_url) as store:
        assert store.db.execute_sql('SELECT COUNT(*) FROM "schema_version"').fetchone()[0] == 1


# -- workers refuse what they cannot run -------------------------------------------------------


@pytest.fixture
def worker_start_env(cli_env: dict[str, str]) -> dict[str, str]:
    """A worker's environment whose Redis is never reached: the store is checked first."""
    return {**cli_env, "LONGHAUL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}


@pytest.mark.backends("sqlite", "postgres")
def test_workers_refuse_to_start_against_a_newer_schema_with_one_clear_line(newer_store, worker_start_env, longhaul):
    dramatiq = subprocess.run([sys.executable, "-m", "dramatiq", "longhaul.worker.actors", "--processes", "2",
                               "--threads", "1"], env=worker_start_env, capture_output=True, text=True, timeout=120)
    logged = dramatiq.stdout + dramatiq.stderr
    assert dramatiq.returncode == 2, logged
    assert (f"cannot start a longhaul worker: database schema version {SCHEMA_VERSION + 1} is newer than this "
            "longhaul supports") in logged
    assert "Traceback" not in logged

    cli = longhaul("worker", "--processes", "1", LONGHAUL_REDIS_URL=worker_start_env["LONGHAUL_REDIS_URL"])
    assert cli.returncode == 1
    assert cli.stderr.startswith(f"error: database schema version {SCHEMA_VERSION + 1} is newer")


def test_an_unreachable_postgres_server_is_one_clear_error_without_the_password(longhaul):
    url = f"postgresql://longhaul:s3cret-pw@127.0.0.1:{free_port()}/tasks"

    listed = longhaul("tasks", LONGHAUL_DATABASE_URL=url)

    assert listed.returncode == 2
    assert "cannot connect to PostgreSQL" in listed.stderr and "postgresql://longhaul:***@" in listed.stderr
    assert "s3cret-pw" not in listed.stderr + listed.stdout
    assert "Traceback" not in listed.stderr


def test_postgres_without_its_driver_is_one_clear_error(cli_env: dict[str, str], tmp_path: Path):
    without_psycopg = "import sys; sys.modules['psycopg'] = None; from longhaul.worker.cli import main; main()"
    env = {**cli_env, "LONGHAUL_DATABASE_URL": "postgresql://longhaul@127.0.0.1:5432/tasks"}

    listed = subprocess.run([sys.executable, "-c", without_psycopg, "tasks"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)

    assert listed.returncode == 2
    assert "PostgreSQL needs the psycopg driver: pip install 'psycopg[binary]'" in listed.stderr


@pytest.mark.parametrize("url", ["mysql://user:pw@db/tasks", "postgresql://user:pw@db:5432/"])
def test_database_urls_longhaul_cannot_use_are_refused_naming_the_problem(longhaul, url):
    refused = longhaul("tasks", LONGHAUL_DATABASE_URL=url)
    assert refused.returncode == 2
    assert ("unsupported scheme 'mysql'" in refused.stderr) or ("names no database" in refused.stderr)
    assert ":pw@" not in refused.stderr


# -- PostgreSQL connections ------------------------------------------------------------------

postgres_only = pytest.mark.backends("postgres")


@postgres_only
def test_a_connection_the_server_dropped_is_replaced_at_the_next_call(store, postgres_server, make_update):
    store.record_checkpoint(make_update(1))
    backend_pid = store.db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    postgres_server.execute(f"SELECT pg_terminate_backend({backend_pid})")

    # The call that finds the connection gone replaces it and sends its statement again: nothing fails.
    assert store.summary("task-1").checkpoint_count == 1
    assert store.record_checkpoint(make_update(2)) is True
    backend_pid = store.db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    postgres_server.execute(f"SELECT pg_terminate_backend({backend_pid})")
    assert store.record_checkpoint(make_update(3)) is True  # a write: its BEGIN met the dead connection


@postgres_only
def test_threads_that_ended_give_their_pooled_connections_back(db_url, make_update):
    with TaskStore(db_url, pool_size=2) as store:
        store.record_checkpoint(make_update(1))
        failures: list[BaseException] = []

        def read() -> None:
            try:
                store.summary("task-1")
            except BaseException as exc:  # noqa: B036 (collected for the assertion)
                failures.append(exc)

        for _ in range(10):  # five times the pool, one short-lived thread after another
            thread = threading.Thread(target=read)
            thread.start()
            thread.join()

        assert failures == []


def test_a_connection_a_thread_ended_holding_goes_to_the_next_thread_that_needs_one(db_url, make_update):
    # The pool is full (one slot, held by a thread gone): the next call takes that slot, it does not wait out
    # POOL_WAIT_S and fail. Twice: the second comes right after the first, within a reclaim interval.
    with TaskStore(db_url, pool_size=1) as store:
        store.record_checkpoint(make_update(1))
        for _ in range(2):
            holder = threading.Thread(target=lambda: store.db.connect(reuse_if_open=True))
            holder.start()
            holder.join()

            assert store.summary("task-1").checkpoint_count == 1


@postgres_only
def test_a_pool_too_small_for_the_threads_names_the_setting(make_runtime, make_update, monkeypatch):
    monkeypatch.setattr("longhaul.models.db.POOL_WAIT_S", 1)
    monkeypatch.setenv("LONGHAUL_DB_POOL_SIZE", "1")
    store = make_runtime().store  # the runtime reads LONGHAUL_DB_POOL_SIZE and sizes its store's pool
    store.record_checkpoint(make_update(1))
    failures: list[BaseException] = []
    with store.read_snapshot():  # this thread holds the only connection until the transaction ends
        store.summary("task-1")
        thread = threading.Thread(target=lambda: failures.extend(_raised(lambda: store.summary("task-1"))))
        thread.start()
        thread.join(timeout=30)

    assert len(failures) == 1 and isinstance(failures[0], StoreUnavailable)
    assert "raise LONGHAUL_DB_POOL_SIZE" in str(failures[0])


def _raised(call) -> list[BaseException]:  # type: ignore[no-untyped-def]
    try:
        call()
    except BaseException as exc:  # noqa: B036
        return [exc]
    return []


@pytest.mark.backends("sqlite", "postgres")
def test_a_hundred_threads_share_a_pool_of_two_each_borrowing_a_connection_only_per_call(db_url, make_update,
                                                                                           monkeypatch):
    # Before, a thread kept its connection from its first call until it ended: the third thread would wait
    # out the pool and fail; a thousand tasks in flight needed a thousand connections.
    monkeypatch.setattr("longhaul.models.db.POOL_WAIT_S", 2)
    threads, steps = 100, 3
    with TaskStore(db_url, pool_size=2) as store:
        failures: list[BaseException] = []
        start = threading.Barrier(threads)

        def run(index: int) -> None:
            start.wait()
            for step in range(1, steps + 1):
                update = make_update(step, task_id=f"pooled-{index}", thread_id=f"pooled-{index}")
                failures.extend(_raised(lambda: store.record_checkpoint(update)))  # noqa: B023 (called at once)

        workers = [threading.Thread(target=run, args=(index,)) for index in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)

        assert failures == []
        assert [store.summary(f"pooled-{i}").checkpoint_count for i in range(threads)] == [steps] * threads
        db = store.db
        assert len(db._in_use) + len(db._connections) <= 2  # type: ignore[attr-defined]


def _parked_in_the_store(thread: threading.Thread) -> bool:
    """True once `thread` is blocked inside the store (waiting for a lock or a pooled connection)."""
    frame = sys._current_frames().get(thread.ident or -1)
    return frame is not None and frame.f_code.co_filename.endswith(("db.py", "pool.py", "threading.py"))


@contextlib.contextmanager
def _writer_lock_held(store: TaskStore) -> Iterator[None]:
    """This process's SQLite writer lock held by another thread (in an open write transaction) until exit."""
    writing, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.context.call(), store.db.atomic():  # BEGIN IMMEDIATE: the writer lock, then the file's
            writing.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert writing.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join(timeout=60)


def test_a_new_pooled_sqlite_connection_opens_while_a_write_is_in_progress(tmp_path: Path, make_update):
    # Before, every new connection ran `journal_mode=wal`, which waits for the file's write lock, inside peewee's
    # database-wide lock: one new connection behind a long write stalled every connect and close of the process.
    with TaskStore(f"sqlite:///{tmp_path / 'tasks.db'}", pool_size=4) as store:
        store.record_checkpoint(make_update(1))
        read: list[int] = []
        with _writer_lock_held(store):  # holds the pool's only connection so far: the read needs a new one
            reader = threading.Thread(target=lambda: read.append(store.summary("task-1").checkpoint_count))
            reader.start()
            wait_until(lambda: read == [1], timeout_s=10, what="a read on a new connection during a write")
        reader.join(timeout=60)
        assert store.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_writers_waiting_their_turn_hold_no_pooled_connection(tmp_path: Path, make_update):
    # Before, each writer queued on the process's writer lock held a pooled connection: a queue as long as the
    # pool emptied it, and a read waited for the write in progress (with 1,000 tasks resuming at once, calls
    # met "all 16 pooled database connections ... in use for 30 s").
    with TaskStore(f"sqlite:///{tmp_path / 'tasks.db'}", pool_size=2) as store:
        store.record_checkpoint(make_update(1))
        failures: list[BaseException] = []
        read: list[int] = []
        with _writer_lock_held(store):
            writers = [threading.Thread(target=lambda i=i: failures.extend(_raised(
                lambda: store.record_checkpoint(make_update(1, task_id=f"queued-{i}", thread_id=f"queued-{i}")))))
                for i in range(3)]
            for writer in writers:
                writer.start()
            wait_until(lambda: all(_parked_in_the_store(writer) for writer in writers), timeout_s=10,
                       what="the writers to queue")
            reader = threading.Thread(target=lambda: read.append(store.summary("task-1").checkpoint_count))
            reader.start()
            wait_until(lambda: read == [1], timeout_s=10, what="a read while three writers wait their turn")
        for thread in (reader, *writers):
            thread.join(timeout=60)

        assert failures == []
        assert [store.summary(f"queued-{i}").checkpoint_count for i in range(3)] == [1, 1, 1]


@pytest.mark.backends("sqlite", "postgres")
def test_pooled_connections_go_to_the_threads_waiting_longest(db_url, make_update):
    # peewee's pool let a thread that had just arrived take a freed connection ahead of the threads waiting for
    # one: with 1,000 threads some waited out the whole 30 s pool wait, and Dramatiq retried them with backoff.
    with TaskStore(db_url, pool_size=1) as store:
        store.record_checkpoint(make_update(1))
        db, order = store.db, []
        db.connect()  # this thread holds the only connection

        def borrow() -> None:
            with store.context.call():
                order.append("waiting first")

        waiter = threading.Thread(target=borrow)
        waiter.start()
        wait_until(lambda: _parked_in_the_store(waiter), timeout_s=10, what="the other thread to wait")
        db.close()  # given back, and asked for again at once: the waiting thread's turn comes first
        db.connect()
        order.append("arrived later")
        db.close()
        waiter.join(timeout=60)

        assert order == ["waiting first", "arrived later"]


class _Interrupted(BaseException):
    """What a greenlet process's time limit is to a call: raised into it wherever it waits."""


class _InterruptedWait(threading.Event):
    def wait(self, timeout: float | None = None) -> bool:
        raise _Interrupted()


def test_a_call_interrupted_while_it_waits_for_a_connection_leaves_no_slot_promised_to_it(db_url, monkeypatch):
    # In a greenlet process Dramatiq's time limit is thrown into the wait itself: the interrupted call's turn
    # stayed in line, the freed connection was promised to it, and every later call waited 30 s for nothing.
    import longhaul.models.db as db_module

    with TaskStore(db_url, pool_size=1) as store:
        db, raised = store.db, []
        db.connect()  # this thread holds the only connection

        def interrupted_call() -> None:
            try:
                store.count_tasks()
            except _Interrupted:
                raised.append(True)

        monkeypatch.setattr(db_module, "threading", types.SimpleNamespace(**{**vars(threading),
                                                                             "Event": _InterruptedWait}))
        caller = threading.Thread(target=interrupted_call)
        caller.start()
        caller.join(timeout=30)
        monkeypatch.undo()
        db.close()  # the connection given back, to nobody waiting
        counted: list[int] = []
        later = threading.Thread(target=lambda: counted.append(store.count_tasks()))
        later.start()
        wait_until(lambda: counted == [0], timeout_s=10, what="a later call to get the free connection")
        later.join(timeout=60)

        assert raised == [True]
        assert db._promised == 0 and not db._waiting


def test_a_task_s_start_is_served_ahead_of_the_other_calls_waiting_for_a_connection(db_url):
    # A thousand tasks delivered at once: in plain arrival order the started tasks' next calls queued ahead of
    # the claims still waiting, and the last task was claimed only as the last start finished.
    with TaskStore(db_url, pool_size=1) as store:
        assert store.create_task(task_id="claimed", thread_id="t", channel="c", provider="p", model="m",
                                 spec=TaskSpec(prompt="go"))
        db, order = store.db, []
        db.connect()  # this thread holds the only connection

        def other_call() -> None:
            store.summary("claimed")
            order.append("other call")

        def start() -> None:
            assert store.start("claimed", Claimant(owner="w:1:x", host="w", pid=1), lease_s=30) is not None
            order.append("start")

        waiting = []
        for target in (other_call, other_call, start):  # the start arrives last
            waiting.append(threading.Thread(target=target))
            waiting[-1].start()
            wait_until(lambda: _parked_in_the_store(waiting[-1]), timeout_s=10, what="the thread to wait")
        db.close()
        for thread in waiting:
            thread.join(timeout=60)

        assert order == ["start", "other call", "other call"]
