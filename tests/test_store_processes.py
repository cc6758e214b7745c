"""Several processes (and threads) on one SQLite file: visibility and concurrent writes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from longhaul.models import TaskStore
from longhaul.models.tables import SCHEMA_VERSION
from longhaul.worker.testing import run_released_together

#: Reads a task in a fresh interpreter and prints what it saw as JSON.
READER = """
import json, sys
from longhaul.models import TaskStore
with TaskStore(sys.argv[1]) as store:
    record = store.load(sys.argv[2])
    print(json.dumps({
        "checkpoint_count": record.checkpoint_count,
        "steps": [cp.step_index for cp in record.checkpoints],
        "notes": [cp.checkpoint_note for cp in record.checkpoints],
        "contents": [m.content for m in record.execution_history],
    }))
"""

#: Writes checkpoints from several threads once `go` exists; prints the errors it met as JSON.
WRITER = """
import json, sys, threading, time
from pathlib import Path
from longhaul.models import ChatMessage, CheckpointItem, CheckpointUpdate, TaskStore
from longhaul.worker.testing import wait_for_go

db_url, go = sys.argv[1], Path(sys.argv[5])
process, threads, steps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
wait_for_go(go, process)

# Every process opens the store (and checks the schema) at the same moment.
store = TaskStore(db_url)
errors = []

def update(task_id, step_index, label):
    return CheckpointUpdate(
        task_id=task_id, thread_id="thread-" + task_id, channel="test", provider="stub", model="m",
        step_index=step_index, checkpoint_note=label,
        new_messages=[ChatMessage.assistant(label + " said"), ChatMessage(role="tool", content=label + " ran")],
        items=[CheckpointItem(tool_name="shell", arguments={"label": label}, success=True, output="ok")],
    )

def work(thread):
    worker = process * threads + thread
    try:
        for step in range(steps):
            label = f"p{process}t{thread}s{step}"
            assert store.record_checkpoint(update(f"own-{worker}", step + 1, label))
            assert store.record_checkpoint(update("shared", 1 + worker * steps + step, label))
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        store.close()

pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join()
print(json.dumps(errors))
"""


def run_python(code: str, *args: str, timeout_s: float = 60) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_until_done(db_url: str, *, tmp_dir: Path, processes: int, threads: int, steps: int) -> list[str]:
    """Start `processes` writers, release them together, and return each one's stdout."""
    go = tmp_dir / "go"
    return run_released_together([[WRITER, db_url, str(p), str(threads), str(steps), str(go)]
                                  for p in range(processes)], workdir=tmp_dir, timeout_s=60)


def test_a_second_process_sees_every_committed_checkpoint(store, db_url, make_update):
    for step in range(1, 21):
        store.record_checkpoint(make_update(step))
    # This process keeps its connection open: the other reads through the WAL.

    seen = json.loads(run_python(READER, db_url, "task-1"))

    assert seen["checkpoint_count"] == 20
    assert seen["steps"] == list(range(1, 21))
    assert seen["notes"] == [f"after step {step}" for step in range(1, 21)]
    assert seen["contents"] == [text for step in range(1, 21) for text in (f"step {step}", f"result {step}")]


def test_this_process_sees_checkpoints_another_process_committed(store, db_url, tmp_path):
    assert store.load("own-0") is None  # connection open (and schema created) before the other writes

    errors = json.loads(run_until_done(db_url, tmp_dir=tmp_path, processes=1, threads=1, steps=5)[0])

    assert errors == []
    record = store.load("own-0")
    assert [cp.step_index for cp in record.checkpoints] == [1, 2, 3, 4, 5]
    assert record.message_count == 10


def test_processes_and_threads_write_checkpoints_concurrently_without_lock_errors(tmp_path):
    processes, threads, steps = 3, 4, 25
    db_url = f"sqlite:///{tmp_path / 'state' / 'tasks.db'}"
    # No TaskStore opened up front: the writers race to create the fresh file too.
    outputs = run_until_done(db_url, tmp_dir=tmp_path, processes=processes, threads=threads, steps=steps)

    errors = [error for output in outputs for error in json.loads(output)]
    assert errors == []  # in particular, no "database is locked"
    writers = processes * threads
    with TaskStore(db_url) as store:
        checkpoints = store.db.execute_sql('SELECT COUNT(*) FROM "checkpoint"').fetchone()[0]
        messages = store.db.execute_sql('SELECT COUNT(*) FROM "message"').fetchone()[0]
        assert checkpoints == 2 * writers * steps
        assert messages == 2 * checkpoints
        assert store.schema_version() == SCHEMA_VERSION
        for worker in range(writers):
            own = store.load(f"own-{worker}")
            assert own.checkpoint_count == steps
            assert [cp.step_index for cp in own.checkpoints] == list(range(1, steps + 1))
        shared = store.load("shared")
    # Steps of the shared task interleave across writers, yet none is lost and
    # each step's two messages stay together in the history.
    assert shared.checkpoint_count == writers * steps
    assert [cp.step_index for cp in shared.checkpoints] == list(range(1, writers * steps + 1))
    contents = [m.content for m in shared.execution_history]
    assert len(contents) == 2 * writers * steps
    assert all(said.replace(" said", " ran") == ran for said, ran in zip(contents[::2], contents[1::2], strict=True))
    assert sorted(contents[::2]) == sorted(
        f"p{p}t{t}s{s} said" for p in range(processes) for t in range(threads) for s in range(steps))


def test_opening_a_store_waits_out_another_writer_on_a_file_not_yet_in_wal_mode(tmp_path):
    # The deterministic form of a race seen when several worker processes
    # first open a fresh database together: about 1 in 80 of them crashed at
    # start-up with "database is locked".
    path = tmp_path / "tasks.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE their_table (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO their_table VALUES (1)")
    release = threading.Timer(0.2, lambda: other.execute("COMMIT"))
    release.start()
    try:
        with TaskStore(path, busy_timeout_ms=10_000) as store:
            assert store.schema_version() == SCHEMA_VERSION
    finally:
        release.join()
        other.close()
