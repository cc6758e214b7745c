"""Everyday database faults never fail, stall or repeat a task (issue 13, points 1-5 and 8).

Each test runs real servers and real worker processes: PostgreSQL restarted
and stopped under `pg_ctl` while tasks run, SQLite under a thousand
claimers, a worker host skewed by libfaketime, a worker SIGSTOPped inside
its checkpoint transaction, NUL bytes on both backends. Run them with
``pytest tests/test_store_faults.py -s`` to see the figures each prints.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

from longhaul import worker
from longhaul.models import TaskStatus
from longhaul.worker.testing import PostgresServer, RedisServer, WorkerProcess, missing_prerequisite, wait_until
from tests.fixtures.chaos import all_finished, assert_each_step_checkpointed_once, enqueue_tasks, repeated_steps

if TYPE_CHECKING:
    from longhaul.worker import Runtime

pytestmark = [pytest.mark.chaos]


# -- fixtures: a PostgreSQL cluster of the test's own, which it may restart and stop ----------------------


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster only this test uses, so restarting or stopping it disturbs no other test."""
    if PostgresServer.find_bin_dir() is None:
        missing_prerequisite("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    server = PostgresServer().start()
    server.create_database("faults")
    yield server
    server.stop()


@pytest.fixture
def fault_env(redis_server: RedisServer) -> Callable[[str], dict[str, str]]:
    """Environment for worker processes on this test's Redis and the given store."""

    def env(db_url: str, **extra: str) -> dict[str, str]:
        values = dict(os.environ)
        values.update(
            LONGHAUL_DATABASE_URL=db_url, LONGHAUL_REDIS_URL=redis_server.url, LONGHAUL_LEASE_S="5",
            LONGHAUL_RECOVERY_INTERVAL_S="0.5", LONGHAUL_MIN_BACKOFF_MS="100", LONGHAUL_MAX_BACKOFF_MS="2000",
            LONGHAUL_LOG_LEVEL="INFO", dramatiq_queue_prefetch="4",
        )
        values.update(extra)
        return values

    return env


@pytest.fixture
def start_workers(spawn_workers: Callable[..., WorkerProcess]) -> Callable[..., WorkerProcess]:
    """Worker processes for the fault tests: eight threads unless told otherwise."""
    return functools.partial(spawn_workers, threads=8)


def failed_tasks(rt: Runtime, task_ids: list[str]) -> dict[str, str]:
    """task id -> last error of every task among `task_ids` that did not complete."""
    found = {}
    for task_id in task_ids:
        summary = rt.store.summary(task_id)
        if summary.status is not TaskStatus.COMPLETED:
            found[task_id] = f"{summary.status.value}: {summary.last_error}"
    return found


def hold_fault_for(seconds: float, *, workers: list[WorkerProcess]) -> None:
    """Keep a fault in place for `seconds`, checking all the while that every worker process stays up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for process in workers:
            assert process.proc is not None and process.proc.poll() is None, process.log()[-3000:]
        time.sleep(0.25)


# -- 1. PostgreSQL restarted or down while workers run ----------------------------------------------------

RESTART_STEPS = 6


@pytest.mark.postgres
@pytest.mark.redis
def test_tasks_survive_a_postgres_restart_under_idle_pooled_connections_and_during_a_run_and_an_outage(
    own_postgres: PostgresServer, redis_server: RedisServer, fault_env, start_workers, client_for, tmp_path: Path
):
    db_url = own_postgres.url_for("faults")
    rt = client_for(db_url, redis_server.url)
    ledger = tmp_path / "ledger.txt"
    workers = [start_workers(fault_env(db_url), threads=8)]
    # Eight threads with a pooled connection each, then idle.
    warm = enqueue_tasks(8, prefix="warm", steps=1, ledger=ledger, step_delay_s=0.3)
    wait_until(lambda: all_finished(rt.store, warm), timeout_s=60, what="the warm-up tasks")
    rt.store.close_all()

    own_postgres.restart()
    after_idle = enqueue_tasks(8, prefix="idle", steps=2, ledger=ledger)
    wait_until(lambda: all_finished(rt.store, after_idle), timeout_s=90, what="the tasks sent after the restart")
    idle_failed = failed_tasks(rt, after_idle)
    # Not even a first delivery may fail on a pooled connection the restart killed.
    failed_deliveries = workers[0].log().count("Failed to process message longhaul.run_task('idle-")

    during = enqueue_tasks(20, prefix="run", steps=RESTART_STEPS, ledger=ledger, step_delay_s=0.2)
    wait_until(lambda: sum(rt.store.summary(t).checkpoint_count for t in during) >= 20, timeout_s=60,
               what="the run to be under way")
    own_postgres.restart()
    rt.store.close_all()
    wait_until(lambda: sum(rt.store.summary(t).checkpoint_count for t in during) >= 60, timeout_s=60,
               what="the run to go on after the restart")
    own_postgres.stop_server()
    outage_started = time.monotonic()
    hold_fault_for(20, workers=workers)
    own_postgres.start_server()
    rt.store.close_all()
    wait_until(lambda: all_finished(rt.store, during), timeout_s=180, what="every task after the outage")
    recovered_s = time.monotonic() - outage_started - 20
    run_failed = failed_tasks(rt, during)

    assert idle_failed == {}, idle_failed
    assert failed_deliveries == 0
    assert run_failed == {}, run_failed
    assert_each_step_checkpointed_once(rt.store, during, RESTART_STEPS)
    repeats = sum(repeated_steps(ledger, during, RESTART_STEPS).values())
    assert repeats <= 2 * 8  # at most the step each of the 8 threads had in flight, per fault
    print(f"postgres faults: 8 tasks after a restart under 8 idle pooled connections, {len(idle_failed)} failed, "
          f"{failed_deliveries} deliveries failed; "
          f"20 tasks x {RESTART_STEPS} steps through a restart and a 20 s outage, {len(run_failed)} failed, "
          f"{repeats} steps re-run (in flight at a fault), all done {recovered_s:.1f} s after the server was back")
    assert workers[0].proc is not None and workers[0].proc.poll() is None


# -- 2. SQLite under a thousand claimers --------------------------------------------------------------------

CLAIMERS_PROCESSES, CLAIMERS_THREADS = 4, 250


@pytest.mark.redis
@pytest.mark.timeout(480)  # its own deadline below is 420 s: on a loaded machine the retries' backoff outlasts 300 s
def test_a_thousand_claimers_on_sqlite_meet_database_is_locked_as_a_delay_never_a_failed_task(
    redis_server: RedisServer, fault_env, start_workers, client_for, tmp_path: Path
):
    db_url = f"sqlite:///{tmp_path / 'state' / 'tasks.db'}"
    rt = client_for(db_url, redis_server.url)
    ledger = tmp_path / "ledger.txt"
    # A 50 ms busy timeout makes hundreds of BEGIN IMMEDIATE waiters run out of patience at once.
    env = fault_env(db_url, LONGHAUL_SQLITE_BUSY_TIMEOUT_MS="50", LONGHAUL_LEASE_S="30",
                    dramatiq_queue_prefetch=str(CLAIMERS_THREADS))
    workers = [start_workers(env, threads=CLAIMERS_THREADS) for _ in range(CLAIMERS_PROCESSES)]
    started = time.monotonic()
    task_ids = enqueue_tasks(CLAIMERS_PROCESSES * CLAIMERS_THREADS, prefix="crowd", steps=1, ledger=ledger,
                             step_delay_s=1.0)  # a slow model: every thread holds a task at once
    wait_until(lambda: all_finished(rt.store, task_ids), timeout_s=420, what="every task of the crowd")
    elapsed_s = time.monotonic() - started
    locked = sum(process.log().count("database is locked") for process in workers)

    failed = failed_tasks(rt, task_ids)
    assert failed == {}, dict(list(failed.items())[:5])
    assert_each_step_checkpointed_once(rt.store, task_ids, 1)
    print(f"sqlite crowd: {len(task_ids)} tasks on {CLAIMERS_PROCESSES} processes x {CLAIMERS_THREADS} threads, "
          f"busy timeout 50 ms: {locked} 'database is locked' met and retried, 0 failed, "
          f"done in {elapsed_s:.1f} s")
    assert locked > 0, "the contention never bit; the test proves nothing"


# -- 3. Counters measure trouble, not age ---------------------------------------------------------------------

RATE_LIMITED_STEPS = 1000


def test_a_task_meeting_a_rate_limit_at_each_of_a_thousand_steps_completes(make_runtime, tmp_path: Path):
    rt = make_runtime(min_backoff_ms=1, max_backoff_ms=5, max_retries=8)
    rt.start_embedded_worker(worker_threads=1, worker_timeout_ms=5)
    limits, ledger = tmp_path / "limits", tmp_path / "ledger.txt"
    limits.mkdir()
    started = time.monotonic()
    record = worker.run_inline("keep going", task_id="patient", steps=RATE_LIMITED_STEPS, ledger_path=str(ledger),
                               rate_limit_each_step_dir=str(limits))
    elapsed_s = time.monotonic() - started

    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert record.checkpoint_count == RATE_LIMITED_STEPS
    rate_limits = len(list(limits.iterdir()))
    assert rate_limits == RATE_LIMITED_STEPS + 1  # one per step and one before the final answer
    assert sum(repeated_steps(ledger, ["patient"], RATE_LIMITED_STEPS).values()) == 0
    print(f"rate limits: {rate_limits} 429s, one per step, with LONGHAUL_MAX_RETRIES=8: completed "
          f"{RATE_LIMITED_STEPS} steps in {elapsed_s:.1f} s, recovery_count {record.recovery_count}")


DEPLOYS = 100
REAL_DEPLOYS = 4
DEPLOYED_STEPS = 40


@pytest.mark.redis
def test_a_task_survives_a_hundred_deploys_because_a_graceful_release_is_not_a_recovery(
    redis_server: RedisServer, fault_env, start_workers, client_for, tmp_path: Path
):
    from longhaul.models import Claimant
    from longhaul.worker.api import submit

    db_url = f"sqlite:///{tmp_path / 'state' / 'tasks.db'}"
    rt = client_for(db_url, redis_server.url)
    ledger = tmp_path / "ledger.txt"
    task_id = submit(rt, "deployed often", task_id="deployed", steps=DEPLOYED_STEPS,
                            ledger_path=str(ledger), step_delay_s=0.3)
    # What a deploy does to the task row: the old worker gives the lease back, a new one claims it.
    for deploy in range(DEPLOYS):
        claim = rt.leases.claim(task_id, Claimant(owner=f"deploy-{deploy}", host="old-host", pid=10_000 + deploy),
                                lease_s=30)
        assert claim is not None and claim.recovery_count == 0, claim
        assert rt.leases.release(task_id, claim.token)
    # Then real deploys: SIGTERM a worker mid-task, start the next one.
    env = fault_env(db_url)
    terminated = []
    rt.send(task_id)
    for deploy in range(REAL_DEPLOYS):
        process = start_workers(env, threads=2)
        done_before = rt.store.summary(task_id).checkpoint_count
        wait_until(lambda done=done_before: rt.store.summary(task_id).checkpoint_count > done, timeout_s=60,
                   what=f"a step under deploy {deploy}")
        terminated.append(process.terminate())
    start_workers(env, threads=2)
    wait_until(lambda: rt.store.summary(task_id).status.is_terminal, timeout_s=120, what="the task to end")

    summary = rt.store.summary(task_id)
    assert summary.status is TaskStatus.COMPLETED, summary.last_error
    assert summary.recovery_count == 0
    assert terminated == [0] * REAL_DEPLOYS
    assert sum(repeated_steps(ledger, [task_id], DEPLOYED_STEPS).values()) == 0
    print(f"deploys: {DEPLOYS} release+reclaim cycles and {REAL_DEPLOYS} SIGTERM deploys mid-task: completed, "
          f"recovery_count {summary.recovery_count} (limit 20), no step re-run")


# -- 4. One clock: a host a minute fast takes over nothing --------------------------------------------------------

SKEWED_TASKS, SKEWED_STEPS = 4, 40


def log_clock_ahead_s(log: str, marker: str) -> float:
    """How far ahead of this host's clock the worker's clock was when it logged the line holding `marker`."""
    from datetime import datetime

    line = next(line for line in log.splitlines() if marker in line)
    logged = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    return (logged - datetime.now()).total_seconds()


@pytest.mark.postgres
@pytest.mark.redis
def test_a_worker_host_sixty_seconds_fast_takes_over_no_live_task(
    own_postgres: PostgresServer, redis_server: RedisServer, fault_env, start_workers, client_for, tmp_path: Path
):
    if shutil.which("faketime") is None:
        missing_prerequisite("faketime is not installed (apt-get install -y faketime)")
    db_url = own_postgres.url_for("faults")
    rt = client_for(db_url, redis_server.url)
    ledger = tmp_path / "ledger.txt"
    on_time = start_workers(fault_env(db_url, LONGHAUL_WORKER_HOST="host-on-time"), threads=SKEWED_TASKS)
    task_ids = enqueue_tasks(SKEWED_TASKS, prefix="skew", steps=SKEWED_STEPS, ledger=ledger, step_delay_s=0.25)
    wait_until(lambda: all(rt.leases.holder(t).host == "host-on-time" for t in task_ids), timeout_s=60,
               what="the on-time host to run every task")
    fast = start_workers(fault_env(db_url, LONGHAUL_WORKER_HOST="host-fast"), threads=SKEWED_TASKS,
                         argv_prefix=("faketime", "-f", "+60s"))
    wait_until(lambda: "ready for action" in fast.log(),
               timeout_s=60, what="the fast host's worker to boot")
    assert log_clock_ahead_s(fast.log(), "ready for action") > 50, "faketime did not skew the worker's clock"
    steps_left = SKEWED_TASKS * SKEWED_STEPS - sum(rt.store.summary(t).checkpoint_count for t in task_ids)
    assert steps_left >= SKEWED_TASKS * 10, "the tasks were nearly done before the fast host came up"
    taken = set()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and not all_finished(rt.store, task_ids):
        taken |= {t for t in task_ids if (rt.leases.holder(t).host or "") == "host-fast"}
        time.sleep(0.1)
    wait_until(lambda: all_finished(rt.store, task_ids), timeout_s=120, what="every task to finish")

    repeats = sum(repeated_steps(ledger, task_ids, SKEWED_STEPS).values())
    assert fast.proc is not None and fast.proc.poll() is None, fast.log()[-3000:]
    assert taken == set(), f"the fast host took over live tasks {sorted(taken)}"
    # Nor did it judge the on-time host's Redis heartbeats stale and requeue the messages it was running.
    assert "requeued" not in fast.log(), fast.log()[-2000:]
    assert repeats == 0
    assert_each_step_checkpointed_once(rt.store, task_ids, SKEWED_STEPS)
    print(f"clock skew: a host 60 s fast beside {SKEWED_TASKS} live tasks ({steps_left} steps to go) for 6 s "
          f"took over {len(taken)}, {repeats} steps ran twice")
    assert on_time.proc is not None and on_time.proc.poll() is None


# -- 5. A worker paused inside its checkpoint transaction stalls nobody else ------------------------------------

PAUSE_S, HEALTHY_TASKS, HEALTHY_STEPS, HEALTHY_STEP_S = 12.0, 2, 2, 6.0


def install_slow_checkpoint(server: PostgresServer, database: str, *, task_id: str, step_index: int) -> None:
    """A trigger that holds one checkpoint's transaction (and its task row lock) in ``pg_sleep`` for 3 s."""
    server.execute(
        "CREATE FUNCTION slow_checkpoint() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.step_index = {step_index} AND (SELECT task_id FROM task WHERE id = NEW.task_id) = '{task_id}' "
        "THEN PERFORM pg_sleep(3); END IF; RETURN NEW; END $$", database=database)
    server.execute("CREATE TRIGGER slow_checkpoint BEFORE INSERT ON checkpoint FOR EACH ROW "
                   "EXECUTE FUNCTION slow_checkpoint()", database=database)


def signal_group(process: WorkerProcess, signum: int) -> None:
    assert process.proc is not None
    os.killpg(process.proc.pid, signum)


@pytest.mark.postgres
@pytest.mark.redis
def test_a_worker_stopped_inside_its_checkpoint_transaction_does_not_stop_another_from_renewing(
    own_postgres: PostgresServer, redis_server: RedisServer, fault_env, start_workers, client_for, tmp_path: Path
):
    import signal

    db_url = own_postgres.url_for("faults")
    rt = client_for(db_url, redis_server.url)
    ledger = tmp_path / "ledger.txt"
    install_slow_checkpoint(own_postgres, "faults", task_id="victim-00", step_index=2)
    paused = start_workers(fault_env(db_url, LONGHAUL_WORKER_HOST="host-paused", dramatiq_queue_prefetch="1"),
                           threads=1)
    victim = enqueue_tasks(1, prefix="victim", steps=4, ledger=ledger)
    wait_until(lambda: own_postgres.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
                                            database="faults")[0] == 1,
               timeout_s=60, what="the victim's checkpoint to hold its row lock")
    signal_group(paused, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        healthy_worker = start_workers(fault_env(db_url, LONGHAUL_WORKER_HOST="host-healthy"), threads=4)
        healthy = enqueue_tasks(HEALTHY_TASKS, prefix="healthy", steps=HEALTHY_STEPS, ledger=ledger,
                                step_delay_s=HEALTHY_STEP_S)  # each step outlasts the 5 s lease: only renewal helps
        wait_until(lambda: all(rt.leases.holder(t).host == "host-healthy" for t in healthy), timeout_s=30,
                   what="the healthy worker to run its tasks")
        tokens = {t: rt.leases.holder(t).token for t in healthy}
        latest_expiry = {t: 0.0 for t in healthy}
        while time.monotonic() - stopped_at < PAUSE_S:
            for task_id in healthy:
                row = rt.leases.holder(task_id)
                if row.token == tokens[task_id] and row.expires_at is not None:
                    latest_expiry[task_id] = max(latest_expiry[task_id], row.expires_at)
            time.sleep(0.25)
        renewed_until = {t: latest_expiry[t] - rt.store.clock() for t in healthy}
    finally:
        signal_group(paused, signal.SIGCONT)
    wait_until(lambda: all_finished(rt.store, victim + healthy), timeout_s=120, what="every task to finish")

    lost = healthy_worker.log().count("leases were lost")
    repeats = repeated_steps(ledger, healthy, HEALTHY_STEPS) + repeated_steps(ledger, victim, 4)
    assert lost == 0
    assert all(seconds > 0 for seconds in renewed_until.values()), renewed_until
    assert dict(repeats) == {}
    for task_id, steps in [(victim[0], 4), *((t, HEALTHY_STEPS) for t in healthy)]:
        assert_each_step_checkpointed_once(rt.store, [task_id], steps)
    print(f"paused worker: SIGSTOP {PAUSE_S:.0f} s inside a checkpoint transaction holding its task row lock; "
          f"the healthy worker kept renewing (leases good for {min(renewed_until.values()):.1f} s more at the end), "
          f"{lost} leases lost, {sum(repeats.values())} steps ran twice")


# -- 8. NUL bytes: stored faithfully on both backends, refused in identifiers ----------------------------------


NUL_TEXT = "before\x00after \x10 DLE \x100 escaped-looking \x00\x00 end"


@pytest.mark.backends("sqlite", "postgres")
def test_text_holding_nul_round_trips_byte_exact_and_a_nul_in_an_id_is_refused_naming_the_field(
    make_runtime, backend: str
):
    from longhaul.models import ChatMessage, CheckpointUpdate, InvalidInput

    rt = make_runtime()
    store = rt.store
    record = worker.run_inline(f"echo {NUL_TEXT}", task_id="nul-task", steps=2)
    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert record.execution_history[0].content == f"echo {NUL_TEXT}"
    assert record.spec is not None and record.spec.prompt == f"echo {NUL_TEXT}"

    update = CheckpointUpdate(task_id="nul-task-2", thread_id="t", channel="c", provider="scripted",
                              model="scripted-v1", step_index=1, checkpoint_note=NUL_TEXT,
                              new_messages=[ChatMessage.assistant(NUL_TEXT), ChatMessage.user(NUL_TEXT * 40)])
    assert store.record_checkpoint(update)
    store.finish("nul-task-2", TaskStatus.FAILED, final_response=NUL_TEXT, last_error=NUL_TEXT)
    stored = store.get("nul-task-2")
    assert [m.content for m in stored.execution_history] == [NUL_TEXT, NUL_TEXT * 40]
    assert stored.checkpoints[0].checkpoint_note == NUL_TEXT
    assert (stored.final_response, stored.last_error) == (NUL_TEXT, NUL_TEXT)

    refused = {}
    for field in ("task_id", "thread_id", "channel"):
        fields = dict(task_id="ok-id", thread_id="ok-thread", channel="ok")
        fields[field] = "bad\x00id"
        with pytest.raises(InvalidInput) as caught:
            store.create_task(provider="scripted", model="scripted-v1", spec=record.spec, **fields)
        refused[field] = str(caught.value)
        with pytest.raises(InvalidInput, match=field):
            store.record_checkpoint(update.model_copy(update={**fields, "step_index": 2}))
    assert all(message.startswith(f"{field}: must not contain a NUL") for field, message in refused.items())
    assert store.count_tasks() == 2  # nothing of the refused calls was stored
    print(f"NUL on {backend}: prompt, messages, note, final response and error round-trip byte-exact; "
          f"ids refused: {refused['task_id']}")


@pytest.mark.postgres
def test_a_data_error_from_postgres_is_unstorable_input_never_a_store_outage():
    import psycopg

    from longhaul.models import StoreUnavailable, UnstorableValue
    from longhaul.models.dialect import StoreFailures

    with pytest.raises(UnstorableValue):
        with StoreFailures("t"):
            raise psycopg.errors.NumericValueOutOfRange("integer out of range")
    with pytest.raises(StoreUnavailable):
        with StoreFailures("t"):
            raise psycopg.errors.AdminShutdown("terminating connection due to administrator command")


# -- SQLite durability: NORMAL by default, FULL on request ------------------------------------------------------


def test_sqlite_runs_synchronous_normal_by_default_and_full_when_asked(tmp_path: Path):
    from longhaul.models import InvalidInput, TaskStore
    from longhaul.worker import load_settings

    levels = {}
    for level in ("normal", "full"):
        settings = load_settings(database_url=f"sqlite:///{tmp_path / level / 'tasks.db'}", sqlite_synchronous=level)
        with TaskStore(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous) as store:
            levels[level] = store.db.execute_sql("PRAGMA synchronous").fetchone()[0]
    assert levels == {"normal": 1, "full": 2}
    assert load_settings().sqlite_synchronous == "normal"
    with pytest.raises(InvalidInput, match="LONGHAUL_SQLITE_SYNCHRONOUS"):
        load_settings(sqlite_synchronous="sometimes")
