"""Chaos and reliability: kill storms, write contention, broker loss, bad input, a failing disk.

Run them alone with ``pytest -m chaos -s`` to see the figures each test prints.
Random choices (kill times, victims, step delays) come from one seed, printed
by the test and fixed with ``LONGHAUL_CHAOS_SEED=<seed>`` to replay a run.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
import uuid
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import psutil
import pytest

from longhaul import worker
from longhaul.models import (
    CorruptRecord,
    TaskStatus,
    TaskStore,
)
from longhaul.worker.testing import WorkerProcess, ledger_counts, run_released_together, wait_until
from tests.fixtures.chaos import (
    QUEUE_KEY,
    all_finished,
    assert_each_step_checkpointed_once,
    enqueue_tasks,
    integrity_check,
    repeated_steps,
)

if TYPE_CHECKING:
    from longhaul.worker import Runtime

pytestmark = [pytest.mark.chaos]

# -- Kill storm ------------------------------------------------------------------

STORM_TASKS, STORM_STEPS, STORM_KILLS, STORM_THREADS = 40, 20, 15, 4


@dataclass(frozen=True)
class Kill:
    """One SIGKILL: when it landed (between two epoch times) and the steps the victim then held."""

    landed_not_before: float
    landed_not_after: float
    leased_steps: list[tuple[str, int]]


def kill_at_random_moment(victim: WorkerProcess, rt: Runtime) -> Kill:
    """SIGKILL the worker wherever it is, mid-step or mid-transaction alike.

    The steps it held are read just after the kill, so one recovered by
    another worker in between goes uncounted: a figure to print, not to assert on.
    """
    assert victim.proc is not None
    root = psutil.Process(victim.proc.pid)
    pids = {root.pid, *(child.pid for child in root.children(recursive=True))}
    not_before = time.time()
    victim.kill()
    not_after = time.time()
    held = [(row.task_id, rt.store.summary(row.task_id).checkpoint_count + 1)
            for row in rt.leases.unfinished() if row.pid in pids]
    return Kill(landed_not_before=not_before, landed_not_after=not_after, leased_steps=held)


def assert_only_steps_in_flight_repeated(store: TaskStore, task_ids: Iterable[str], steps: int, ledger: Path,
                                         kills: list[Kill]) -> int:
    """A step may run again only once per kill that landed while it was in flight; returns the re-executions.

    Step s of a task was in flight from its previous checkpoint (or the task's
    creation) until its own checkpoint was stamped; each checkpoint's time is
    taken before its transaction starts, so a successor's is always after the kill.
    """
    extra = repeated_steps(ledger, task_ids, steps)
    for (task_id, step), times in extra.items():
        record = store.get(task_id)
        stamped = {c.step_index: c.created_at.timestamp() for c in record.checkpoints}
        began, ended = stamped.get(step - 1, record.created_at.timestamp()), stamped[step]
        during = sum(kill.landed_not_before <= ended and began <= kill.landed_not_after for kill in kills)
        assert times <= during, f"{task_id} step {step} ran {times + 1} times but only {during} kills hit it mid-step"
    return sum(extra.values())


@pytest.mark.redis
@pytest.mark.crash
def test_a_kill_storm_loses_no_task_and_repeats_only_the_steps_in_flight(
    client_runtime, start_worker, db_path: Path, rng: random.Random, tmp_path: Path
):
    store, ledger = client_runtime.store, tmp_path / "ledger.txt"
    workers = [start_worker(processes=1, threads=STORM_THREADS) for _ in range(2)]
    started = time.monotonic()
    task_ids = enqueue_tasks(STORM_TASKS, prefix="storm", steps=STORM_STEPS, ledger=ledger,
                             step_delay_s=lambda: round(rng.uniform(0.02, 0.05), 3))

    kills: list[Kill] = []
    drained_at = None
    for _ in range(STORM_KILLS):
        next_kill = time.monotonic() + rng.uniform(1.0, 2.0)
        while time.monotonic() < next_kill:
            if drained_at is None and all_finished(store, task_ids):
                drained_at = time.monotonic()
            time.sleep(0.05)
        victim = rng.choice(workers)
        kills.append(kill_at_random_moment(victim, client_runtime))
        victim.start()
    wait_until(lambda: all_finished(store, task_ids), timeout_s=60, what="every task to finish after the storm")
    drained_s = (drained_at or time.monotonic()) - started

    assert_each_step_checkpointed_once(store, task_ids, STORM_STEPS)
    repeats = assert_only_steps_in_flight_repeated(store, task_ids, STORM_STEPS, ledger, kills)
    assert repeats <= STORM_KILLS * STORM_THREADS
    assert integrity_check(db_path) == ["ok"]
    mid_step = [kill for kill in kills if kill.leased_steps]
    print(f"kill storm: {len(task_ids)} tasks x {STORM_STEPS} steps, {len(kills)} kills ({len(mid_step)} with steps "
          f"in flight, {sum(len(kill.leased_steps) for kill in mid_step)} steps in all), {repeats} steps "
          f"re-executed, drained {drained_s:.1f} s after the first enqueue")


#: The storm with many tasks in flight on one process: every kill cuts all of them mid-step.
CROWD_TASKS, CROWD_STEPS, CROWD_KILLS = 200, 6, 3


@pytest.mark.redis
@pytest.mark.crash
def test_a_kill_storm_with_200_tasks_in_flight_on_one_process_loses_none_and_each_restart_resumes_them_all(
    client_runtime, start_worker, db_path: Path, rng: random.Random, tmp_path: Path
):
    store, ledger = client_runtime.store, tmp_path / "ledger.txt"
    # The host as shipped: `longhaul worker`, its process running the tasks as greenlets.
    host = start_worker(processes=1, threads=CROWD_TASKS, supervised=True, dramatiq_queue_prefetch=str(CROWD_TASKS))
    task_ids = enqueue_tasks(CROWD_TASKS, prefix="crowd", steps=CROWD_STEPS, ledger=ledger,
                             step_delay_s=lambda: round(rng.uniform(0.4, 0.8), 3))
    kills: list[Kill] = []
    resumed_after_s: list[float] = []
    def crowded() -> bool:
        """Half the tasks in flight; once the storm has drained some, half of those left (a loaded machine
        admits them more slowly than the first burst, and the survivors then finish before a full crowd forms)."""
        rows = client_runtime.leases.unfinished()
        return sum(row.token is not None for row in rows) >= min(CROWD_TASKS, len(rows)) // 2

    for _ in range(CROWD_KILLS):
        wait_until(crowded, timeout_s=60, what="half the unfinished tasks in flight before the kill")
        time.sleep(rng.uniform(0.0, 1.0))
        kills.append(kill_at_random_moment(host, client_runtime))
        progress = {task_id: store.summary(task_id).checkpoint_count for task_id in task_ids}
        host.start()
        restarted = time.monotonic()
        # Resumed: every task the kill interrupted stored a step since (or finished).
        wait_until(lambda progress=progress: all(  # type: ignore[misc]
                       store.summary(task_id).checkpoint_count > count or store.summary(task_id).status.is_terminal
                       for task_id, count in progress.items()),
                   timeout_s=60, what="every interrupted task to store a step after the restart")
        resumed_after_s.append(time.monotonic() - restarted)
    wait_until(lambda: all_finished(store, task_ids), timeout_s=120, what="every task to finish after the storm")

    assert_each_step_checkpointed_once(store, task_ids, CROWD_STEPS)
    repeats = assert_only_steps_in_flight_repeated(store, task_ids, CROWD_STEPS, ledger, kills)
    assert integrity_check(db_path) == ["ok"]
    print(f"crowded kill storm: {CROWD_TASKS} tasks x {CROWD_STEPS} steps on one process, {len(kills)} kills with "
          f"{[len(kill.leased_steps) for kill in kills]} steps in flight, {repeats} steps re-executed; every "
          f"interrupted task stored a step {', '.join(f'{s:.1f}' for s in resumed_after_s)} s after each restart")


@pytest.mark.redis
@pytest.mark.crash
def test_a_message_fetched_by_a_worker_killed_before_its_claim_is_delivered_again_within_seconds(
    client_runtime, start_worker, redis_client, tmp_path: Path
):
    (task_id,) = enqueue_tasks(1, prefix="stranded", steps=2, ledger=tmp_path / "ledger.txt")
    # The Redis state a SIGKILL leaves when it lands between the fetch and the claim.
    dead_consumer = f"killed-{uuid.uuid4()}"
    message_id = redis_client.lpop(QUEUE_KEY)
    redis_client.sadd(f"dramatiq:__acks__.{dead_consumer}.longhaul", message_id)
    redis_client.zadd("dramatiq:__heartbeats__", {dead_consumer: int(time.time() * 1000)})
    assert client_runtime.store.summary(task_id).status is TaskStatus.QUEUED

    start_worker(processes=1, threads=2)
    wait_until(lambda: all_finished(client_runtime.store, [task_id]), timeout_s=15,
               what="the stranded task to be delivered again")


# -- Write contention --------------------------------------------------------------

#: Records checkpoints from `threads` threads until `duration_s` has passed; prints what it did as JSON.
#: Each thread writes its own task (steps 1, 2, ... and every 10th step twice, the repeat a no-op) and
#: interleaves steps of one task shared by every thread of every process.
CONTENTION_WRITER = r"""
import json, sys, threading, time
from pathlib import Path
from longhaul.models import ChatMessage, CheckpointItem, CheckpointUpdate, TaskStore
from longhaul.worker.testing import wait_for_go

db_url, process, threads, writers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
duration_s, go = float(sys.argv[5]), Path(sys.argv[6])
store = TaskStore(db_url)
wait_for_go(go, process)
deadline = time.monotonic() + duration_s
report = {"errors": [], "own": {}, "shared": [], "repeats_refused": 0}
lock = threading.Lock()

def update(task_id, step, label):
    return CheckpointUpdate(
        task_id=task_id, thread_id=task_id, channel="chaos", provider="stub", model="m", step_index=step,
        checkpoint_note=label,
        new_messages=[ChatMessage.assistant(label + " asked"), ChatMessage(role="tool", content=label + " done")],
        items=[CheckpointItem(tool_name="ledger", arguments={"line": label}, success=True, output="ok")],
    )

def write(thread):
    me = process * threads + thread
    own, shared, refused, errors = 0, [], 0, []
    try:
        while time.monotonic() < deadline:
            own += 1
            store.record_checkpoint(update(f"own-{me}", own, f"w{me}s{own}"))
            if own % 10 == 0:
                refused += not store.record_checkpoint(update(f"own-{me}", own, "repeat"))
            step = 1 + me + writers * len(shared)
            store.record_checkpoint(update("shared", step, f"w{me}x{step}"))
            shared.append(step)
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        store.close()
    with lock:
        report["own"][f"own-{me}"] = own
        report["shared"].extend(shared)
        report["repeats_refused"] += refused
        report["errors"].extend(errors)

pool = [threading.Thread(target=write, args=(t,)) for t in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join()
print(json.dumps(report))
"""


def test_four_processes_of_eight_threads_write_one_database_for_ten_seconds_without_an_error(
    db_url: str, db_path: Path, tmp_path: Path
):
    processes, threads, duration_s = 4, 8, 10.0
    writers = processes * threads
    TaskStore(db_url).close()  # the schema exists before the clock starts
    outputs = run_released_together(
        [[CONTENTION_WRITER, db_url, str(p), str(threads), str(writers), str(duration_s), str(tmp_path / "go")]
         for p in range(processes)],
        workdir=tmp_path, timeout_s=duration_s + 60,
    )
    reports = [json.loads(output) for output in outputs]

    assert [error for report in reports for error in report["errors"]] == []  # no "database is locked"
    own = {task_id: steps for report in reports for task_id, steps in report["own"].items()}
    shared = sorted(step for report in reports for step in report["shared"])
    assert len(own) == writers and min(own.values()) > 0
    with TaskStore(db_url) as store:
        for task_id, steps in own.items():
            record = store.get(task_id)
            assert [c.step_index for c in record.checkpoints] == list(range(1, steps + 1)), task_id
            assert all(c.checkpoint_note != "repeat" for c in record.checkpoints), "a repeated step overwrote"
            assert [m.content for m in record.execution_history] == [
                f"w{task_id[4:]}s{step} {part}" for step in range(1, steps + 1) for part in ("asked", "done")]
        record = store.get("shared")
        assert [c.step_index for c in record.checkpoints] == shared
        assert record.message_count == len(record.execution_history) == 2 * len(shared)
        checkpoints = store.db.execute_sql('SELECT COUNT(*) FROM "checkpoint"').fetchone()[0]
        messages = store.db.execute_sql('SELECT COUNT(*) FROM "message"').fetchone()[0]
    assert checkpoints == sum(own.values()) + len(shared)
    assert messages == 2 * checkpoints
    assert sum(report["repeats_refused"] for report in reports) == sum(steps // 10 for steps in own.values())
    assert integrity_check(db_path) == ["ok"]
    print(f"\nwrite contention: {processes} processes x {threads} threads for {duration_s:.0f} s: "
          f"{checkpoints} checkpoints ({checkpoints / duration_s:,.0f}/s, {messages} messages), 0 errors")


# -- Broker loss ---------------------------------------------------------------------


@pytest.mark.redis
def test_every_task_completes_when_redis_restarts_empty_while_tasks_run(
    client_runtime, start_worker, redis_server, redis_client, tmp_path: Path
):
    store, ledger, steps = client_runtime.store, tmp_path / "ledger.txt", 10
    # Lost messages of queued tasks are presumed lost 2 s after they were due, and re-sent.
    workers = [start_worker(processes=1, threads=4, LONGHAUL_REDELIVERY_GRACE_S="2") for _ in range(2)]
    task_ids = enqueue_tasks(24, prefix="loss", steps=steps, ledger=ledger, step_delay_s=0.1)
    wait_until(lambda: sum(store.summary(t).checkpoint_count for t in task_ids) >= 16, timeout_s=60,
               what="the first tasks to be under way")

    queued_messages = redis_client.llen(QUEUE_KEY)
    running = [t for t in task_ids if store.summary(t).lease is not None]
    assert queued_messages > 0 and running, "the broker should be lost with messages queued and tasks running"
    redis_server.restart_empty()
    restarted = time.monotonic()
    assert redis_client.llen(QUEUE_KEY) == 0

    wait_until(lambda: all_finished(store, task_ids), timeout_s=90, what="every task to finish after the loss")
    recovered_s = time.monotonic() - restarted
    assert_each_step_checkpointed_once(store, task_ids, steps)
    assert repeated_steps(ledger, task_ids, steps) == Counter(), "no process died, so no step may run twice"
    assert all(w.proc is not None and w.proc.poll() is None for w in workers), "a worker died with the broker"
    # Recovery sees the recorded Redis message ids gone and re-sends at once, before the grace period runs out.
    assert any("the broker no longer holds its message" in w.log() for w in workers), \
        "the lost tasks were not re-sent from the store"
    print(f"\nbroker loss: Redis restarted empty with {queued_messages} messages queued and {len(running)} tasks "
          f"running; all {len(task_ids)} tasks completed {recovered_s:.1f} s later, no step repeated")


# -- Bad input: a corrupt cell in the database ---------------------------------------------


def rows_of(db_path: Path, task_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every stored row of one task (task, checkpoints, messages), straight from SQL."""
    with closing(sqlite3.connect(db_path, timeout=30)) as conn:
        (pk,) = conn.execute("SELECT id FROM task WHERE task_id = ?", (task_id,)).fetchone()
        return {
            "task": conn.execute("SELECT * FROM task WHERE id = ?", (pk,)).fetchall(),
            "checkpoint": conn.execute("SELECT * FROM checkpoint WHERE task_id = ? ORDER BY id", (pk,)).fetchall(),
            "message": conn.execute("SELECT * FROM message WHERE task_id = ? ORDER BY id", (pk,)).fetchall(),
        }


def corrupt(db_path: Path, sql: str, task_id: str) -> None:
    """Run one UPDATE that damages exactly one cell of the task."""
    with closing(sqlite3.connect(db_path, timeout=30)) as conn, conn:
        assert conn.execute(sql, (task_id,)).rowcount == 1, sql


def run_embedded(rt: Runtime, task_ids: list[str], *, timeout_s: float = 30) -> None:
    """Send the tasks to the runtime's in-process worker and wait until each has finished."""
    rt.start_embedded_worker(worker_threads=4)
    for task_id in task_ids:
        rt.send(task_id)
    wait_until(lambda: all_finished(rt.store, task_ids), timeout_s=timeout_s, what=f"tasks {task_ids}")


@dataclass(frozen=True)
class Interrupted:
    """A finished bystander task, and a victim stopped by a deploy after a few of its steps."""

    bystander: str
    victim: str
    ledger: Path


@pytest.fixture
def interrupted(make_runtime, tmp_path: Path) -> Interrupted:
    ledger = tmp_path / "ledger.txt"
    rt = make_runtime()
    bystander = worker.submit(rt, "finished before", task_id="bystander", steps=2, ledger_path=str(ledger))
    victim = worker.submit(rt, "interrupted", task_id="victim", steps=6, step_delay_s=0.1, ledger_path=str(ledger))
    run_embedded(rt, [bystander])
    rt.send(victim)
    wait_until(lambda: rt.store.summary(victim).checkpoint_count >= 2, timeout_s=30, what="two steps of the victim")
    rt.stop_embedded_worker()  # the victim stops after its current step, resumable
    assert rt.store.summary(victim).status is TaskStatus.RUNNING
    return Interrupted(bystander=bystander, victim=victim, ledger=ledger)


#: SQL damaging one cell of the task ``?`` that resuming it must read, and the field its error names.
CORRUPTIONS = {
    "spec": ("UPDATE task SET spec = '{bad' WHERE task_id = ?", "'spec'"),
    "message role": (
        "UPDATE message SET role = 'robot' WHERE step_index = 1 AND role = 'tool' "
        "AND task_id = (SELECT id FROM task WHERE task_id = ?)", "'message'"),
    "message tool calls": (
        "UPDATE message SET tool_calls = 'not json' WHERE step_index = 1 AND tool_calls IS NOT NULL "
        "AND task_id = (SELECT id FROM task WHERE task_id = ?)", "'message.tool_calls'"),
}
CORRUPT_ITEMS = ("UPDATE checkpoint SET items = '[{\"tool_name\": 3' WHERE step_index = 1 "
                 "AND task_id = (SELECT id FROM task WHERE task_id = ?)")


@pytest.mark.parametrize("cell", list(CORRUPTIONS))
def test_a_corrupt_cell_fails_only_its_own_task_naming_the_field(
    make_runtime, interrupted: Interrupted, db_path: Path, cell: str
):
    bystander, victim = interrupted.bystander, interrupted.victim
    sql, field = CORRUPTIONS[cell]
    corrupt(db_path, sql, victim)
    before = {task_id: rows_of(db_path, task_id) for task_id in (bystander, victim)}

    rt = make_runtime()  # the next worker resumes the victim, then serves a new task
    run_embedded(rt, [victim])
    neighbour = worker.submit(rt, "runs next", task_id="neighbour", steps=3, ledger_path=str(interrupted.ledger))
    run_embedded(rt, [neighbour])

    failed = rt.store.summary(victim)
    assert failed.status is TaskStatus.FAILED
    assert field in failed.last_error and "corrupt" in failed.last_error, failed.last_error
    assert rows_of(db_path, bystander) == before[bystander], "another task's data changed"
    after = rows_of(db_path, victim)
    assert (after["checkpoint"], after["message"]) == (before[victim]["checkpoint"], before[victim]["message"])
    assert_each_step_checkpointed_once(rt.store, [neighbour], steps=3)


def test_a_corrupt_checkpoint_item_does_not_stop_its_task_and_reading_it_names_the_field(
    make_runtime, interrupted: Interrupted, db_path: Path
):
    # Resuming needs the histories, not the tool items of old checkpoints.
    corrupt(db_path, CORRUPT_ITEMS, interrupted.victim)
    bystander_before = rows_of(db_path, interrupted.bystander)

    rt = make_runtime()
    run_embedded(rt, [interrupted.victim])

    assert rt.store.summary(interrupted.victim).status is TaskStatus.COMPLETED
    with pytest.raises(CorruptRecord, match=r"'checkpoint\[1\]\.items'"):
        rt.store.get(interrupted.victim)
    assert rows_of(db_path, interrupted.bystander) == bystander_before


def test_a_task_found_corrupt_can_be_failed_while_other_workers_write(store, db_path: Path, make_update):
    for step in (1, 2):
        store.record_checkpoint(make_update(step, task_id="victim", thread_id="victim"))
    store.record_checkpoint(make_update(1, task_id="other", thread_id="other"))
    corrupt(db_path, CORRUPT_ITEMS, "victim")

    try:
        store.get("victim")
    except CorruptRecord as exc:  # fail the task while handling the error, as a worker does
        with closing(sqlite3.connect(db_path, timeout=30)) as conn, conn:  # meanwhile another worker commits
            conn.execute("UPDATE task SET updated_at = updated_at + 1 WHERE task_id = 'other'")
        store.finish("victim", TaskStatus.FAILED, last_error=str(exc))
    assert store.summary("victim").status is TaskStatus.FAILED


# -- Disk full: a checkpoint that cannot be written ----------------------------------------

#: Triggers that make one statement of a step's writes fail, as a full disk would: the journaled answer
#: (stored before the tool runs), or one statement of the checkpoint: its row, the step's last tool result,
#: the task's counters.
WRITE_FAULTS = {
    "journaled answer": "BEFORE INSERT ON message WHEN NEW.step_index IS NOT NULL AND NEW.role = 'assistant'",
    "checkpoint row": "BEFORE INSERT ON checkpoint",
    "step messages": "BEFORE INSERT ON message WHEN NEW.step_index IS NOT NULL AND NEW.role = 'tool'",
    "task counters": "BEFORE UPDATE OF checkpoint_count ON task WHEN NEW.checkpoint_count > OLD.checkpoint_count",
}


@pytest.fixture
def write_fault(db_path: Path) -> Iterator[Any]:
    """``install(when)`` makes the statements `when` names fail with 'disk full'; ``remove()`` heals the disk."""

    class WriteFault:
        def install(self, when: str) -> None:
            self._run(f"CREATE TRIGGER chaos_disk_full {when} BEGIN SELECT RAISE(FAIL, 'disk full'); END")

        def remove(self) -> None:
            self._run("DROP TRIGGER IF EXISTS chaos_disk_full")

        @staticmethod
        def _run(sql: str) -> None:
            with closing(sqlite3.connect(db_path, timeout=30, isolation_level=None)) as conn:
                conn.execute(sql)

    fault = WriteFault()
    yield fault
    fault.remove()


def messages_by_step(db_path: Path, task_id: str) -> dict[Any, int]:
    """How many execution-history messages each step stored (None: the prompt and the final answer)."""
    with closing(sqlite3.connect(db_path, timeout=30)) as conn:
        return dict(conn.execute(
            "SELECT step_index, COUNT(*) FROM message WHERE history = 0 "
            "AND task_id = (SELECT id FROM task WHERE task_id = ?) GROUP BY step_index", (task_id,)).fetchall())


@pytest.mark.parametrize("failing", list(WRITE_FAULTS))
def test_a_checkpoint_that_cannot_be_written_fails_the_step_loudly_and_the_task_resumes_intact(
    make_runtime, write_fault, db_path: Path, tmp_path: Path, caplog, failing: str
):
    ledger, steps = tmp_path / "ledger.txt", 8
    # Fast retries, and enough of them to outlast the fault.
    rt = make_runtime(max_retries=50, min_backoff_ms=20, max_backoff_ms=100)
    task_id = worker.submit(rt, "write through a full disk", task_id="disk", steps=steps, step_delay_s=0.05,
                            ledger_path=str(ledger))
    rt.start_embedded_worker(worker_threads=2)
    rt.send(task_id)
    wait_until(lambda: rt.store.summary(task_id).checkpoint_count >= 2, timeout_s=30, what="two steps")

    write_fault.install(WRITE_FAULTS[failing])
    # The step after the last checkpoint fails to store and is retried: wait for two retries.
    wait_until(lambda: caplog.text.count("the task store could not be written (IntegrityError: disk full)") >= 3,
               timeout_s=30, what="the same step to be tried three times")
    stuck = rt.store.get(task_id)
    failing_step = stuck.last_step_index + 1
    assert stuck.status is TaskStatus.RUNNING, (stuck.status, stuck.last_error)
    assert [c.step_index for c in stuck.checkpoints] == list(range(1, failing_step))
    before_answer = failing == "journaled answer"
    tried = ledger_counts(ledger)[f"{task_id} step {failing_step}"]
    # An answer that cannot be stored is never acted on; one stored is, and waits for its result's checkpoint.
    assert (tried == 0) if before_answer else (tried >= 3)
    open_step = {} if before_answer else {failing_step: 1}
    assert messages_by_step(db_path, task_id) == {None: 1, **{step: 2 for step in range(1, failing_step)},
                                                  **open_step}
    assert len(stuck.execution_history) == 1 + 2 * (failing_step - 1) + len(open_step)
    assert stuck.message_count == 1 + 2 * (failing_step - 1) + 2 * len(open_step)  # a position kept for the result

    write_fault.remove()
    wait_until(lambda: all_finished(rt.store, [task_id]), timeout_s=30, what="the task to finish once healed")
    assert_each_step_checkpointed_once(rt.store, [task_id], steps)
    ran = ledger_counts(ledger)
    repeated = {step for step in range(1, steps + 1) if ran[f"{task_id} step {step}"] != 1}
    assert repeated == (set() if before_answer else {failing_step})
    assert integrity_check(db_path) == ["ok"]
    print(f"\ndisk full at the {failing}: step {failing_step} ran {ran[f'{task_id} step {failing_step}']} times, "
          f"stored once after the disk healed; steps 1-{failing_step - 1} and {failing_step + 1}-{steps} ran once")
