"""Chaos tests of issue 13 points 7 and 12: a Redis outage at enqueue, Redis restarted empty, and bad input
or a broken database file, each met by one line naming what to fix and the README's exit code.

Real processes throughout: the `longhaul` CLI in a subprocess, real redis-server stopped and restarted
without its data, real dramatiq worker processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from longhaul.models import StoreUnavailable, TaskSpec, TaskStatus, TaskStore
from longhaul.worker.testing import RedisServer, WorkerProcess, missing_prerequisite, wait_until

pytestmark = [pytest.mark.chaos]

Run = Callable[..., "subprocess.CompletedProcess[str]"]


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def _env_for(worker_env: dict[str, str], **overrides: str) -> dict[str, str]:
    return {**worker_env, "LONGHAUL_LOG_LEVEL": "WARNING", **overrides}


def _cli(longhaul: Run, worker_env: dict[str, str], *args: str, **env: str) -> "subprocess.CompletedProcess[str]":
    return longhaul(*args, **_env_for(worker_env, **env))


# -- point 7: enqueue during a Redis outage ---------------------------------------------------------------


@pytest.mark.redis
def test_enqueue_with_redis_down_returns_the_id_and_the_task_runs_once_redis_is_back(
        longhaul: Run, worker_env: dict[str, str], redis_server: RedisServer,
        start_worker: Callable[..., WorkerProcess], db_url: str):
    worker = start_worker(threads=2, LONGHAUL_RECOVERY_INTERVAL_S="1")
    redis_server.stop()

    sent = _cli(longhaul, worker_env, "enqueue", "--steps", "2", "--task-id", "outage", "count")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "outage"
    warning = _one_line(sent.stderr)
    assert warning.startswith("WARNING") and "'outage' is stored" in warning
    assert "LONGHAUL_RECOVERY_INTERVAL_S" in warning and "internal error" not in warning

    # A caller who retries the same enqueue gets the same id, and no second task.
    again = _cli(longhaul, worker_env, "enqueue", "--steps", "2", "--task-id", "outage", "count")
    assert again.returncode == 0 and again.stdout.strip() == "outage", again.stderr
    other = _cli(longhaul, worker_env, "enqueue", "--steps", "3", "--task-id", "outage", "count")
    assert other.returncode == 2 and "already exists" in _one_line(other.stderr)
    # `rerun` of the queued task says what to do, not "use longhaul rerun".
    rerun = _cli(longhaul, worker_env, "rerun", "outage")
    line = _one_line(rerun.stderr)
    assert rerun.returncode == 1 and "queued" in line and "longhaul show outage" in line
    assert "longhaul rerun" not in line

    redis_server.start()
    back_at = time.monotonic()
    store = TaskStore(db_url)
    try:
        wait_until(lambda: store.summary("outage").status is TaskStatus.COMPLETED, timeout_s=20,
                   what="the task stored during the outage to run")
        waited_s = time.monotonic() - back_at
        print(f"\ntask sent and completed {waited_s:.2f} s after Redis came back")
        assert store.summary("outage").checkpoint_count == 2
        assert len(store.list_tasks()) == 1
    finally:
        store.close_all()  # every pooled connection, not only this thread's (a mount is undone after)
    assert worker.proc is not None and worker.proc.poll() is None


@pytest.mark.redis
def test_redis_restarted_empty_before_the_worker_starts_resends_every_queued_task_within_10_s(
        longhaul: Run, worker_env: dict[str, str], redis_server: RedisServer,
        start_worker: Callable[..., WorkerProcess], db_url: str, tmp_path: Path):
    ids = [f"lost-{i}" for i in range(5)]
    for task_id in ids:  # no worker yet: the messages wait in Redis
        sent = _cli(longhaul, worker_env, "enqueue", "--steps", "1", "--task-id", task_id, "count")
        assert sent.returncode == 0 and sent.stdout.strip() == task_id, sent.stderr
    redis_server.restart_empty()

    # Default recovery interval and redelivery grace: only the worker_env test speed-ups removed.
    env = {key: value for key, value in worker_env.items() if key != "LONGHAUL_RECOVERY_INTERVAL_S"}
    worker = WorkerProcess(env, processes=1, threads=2, log_path=tmp_path / "default-worker.log").start()
    started_at = time.monotonic()
    store = TaskStore(db_url)
    try:
        wait_until(lambda: all(store.summary(t).status is TaskStatus.COMPLETED for t in ids), timeout_s=20,
                   what="every queued task lost with Redis's data to run")
        took_s = time.monotonic() - started_at
        print(f"\n{len(ids)} tasks lost with Redis's data completed {took_s:.2f} s after the worker started")
        assert took_s < 12  # one 5 s recovery interval, plus the worker's boot and the tasks' steps
    finally:
        store.close_all()  # every pooled connection, not only this thread's (a mount is undone after)
        worker.kill()
    assert "no longer holds its message" in worker.log()


@pytest.mark.redis
def test_redis_restarted_empty_under_a_running_worker_resends_the_waiting_tasks_within_10_s(
        longhaul: Run, worker_env: dict[str, str], redis_server: RedisServer, db_url: str, tmp_path: Path):
    # Default recovery interval and redelivery grace; 2 threads busy, so 3 messages wait in Redis.
    env = {key: value for key, value in worker_env.items() if key != "LONGHAUL_RECOVERY_INTERVAL_S"}
    env["dramatiq_queue_prefetch"] = "2"
    worker = WorkerProcess(env, processes=1, threads=2, log_path=tmp_path / "busy-worker.log").start()
    store = TaskStore(db_url)
    busy, waiting = ["busy-0", "busy-1"], ["behind-0", "behind-1", "behind-2"]
    try:
        for task_id in busy:
            sent = _cli(longhaul, worker_env, "enqueue", "--steps", "30", "--step-delay", "0.5", "--task-id",
                        task_id, "count")
            assert sent.returncode == 0, sent.stderr
        wait_until(lambda: all(store.summary(t).checkpoint_count >= 1 for t in busy), timeout_s=30,
                   what="both threads busy")
        for task_id in waiting:
            sent = _cli(longhaul, worker_env, "enqueue", "--steps", "1", "--task-id", task_id, "count")
            assert sent.returncode == 0, sent.stderr
        redis_server.restart_empty()
        restarted_at = time.monotonic()

        def resent() -> bool:
            log = worker.log()
            return all(f"resuming task {t!r}: the broker no longer holds its message" in log for t in waiting)

        wait_until(resent, timeout_s=15, what="the waiting tasks to be sent again")
        took_s = time.monotonic() - restarted_at
        print(f"\n{len(waiting)} waiting tasks sent again {took_s:.2f} s after Redis restarted empty")
        assert took_s < 10
        wait_until(lambda: all(store.summary(t).status is TaskStatus.COMPLETED for t in busy + waiting),
                   timeout_s=60, what="every task to finish")
        assert not any(f"resuming task {t!r}" in worker.log() for t in busy)  # running tasks are left alone
    finally:
        store.close_all()  # every pooled connection, not only this thread's (a mount is undone after)
        worker.kill()


@pytest.mark.redis
def test_messages_waiting_in_a_long_queue_are_not_sent_twice(
        longhaul: Run, worker_env: dict[str, str], start_worker: Callable[..., WorkerProcess], db_url: str,
        tmp_path: Path):
    ledger = tmp_path / "ledger.txt"
    ids = [f"waiting-{i}" for i in range(12)]
    for task_id in ids:
        sent = _cli(longhaul, worker_env, "enqueue", "--steps", "1", "--step-delay", "0.3", "--ledger",
                    str(ledger), "--task-id", task_id, "count")
        assert sent.returncode == 0, sent.stderr
    # One thread, recovery every 0.5 s and no grace: each message waits seconds behind the others.
    worker = start_worker(threads=1, LONGHAUL_REDELIVERY_GRACE_S="0")
    store = TaskStore(db_url)
    try:
        wait_until(lambda: all(store.summary(t).status is TaskStatus.COMPLETED for t in ids), timeout_s=60,
                   what="every task to run")
    finally:
        store.close_all()  # every pooled connection, not only this thread's (a mount is undone after)
    log = worker.log()
    assert "resuming task" not in log, log[-2000:]


# -- point 12: error hygiene ------------------------------------------------------------------------------

#: The `dramatiq longhaul.worker.actors` command the Procfile runs, one process, one thread.
DRAMATIQ_WORKER = [sys.executable, "-m", "dramatiq", "longhaul.worker.actors", "-p", "1", "-t", "1"]


def _clean_error(result: "subprocess.CompletedProcess[str]", code: int, *needles: str) -> str:
    """The one stderr line of a refused command, after checking its exit code and what it names."""
    line = _one_line(result.stderr)
    assert result.returncode == code, (result.returncode, result.stderr)
    assert line.startswith("error: ") and "internal error" not in line and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in line, line
    return line


def _start_dramatiq(env: dict[str, str], workdir: Path) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(DRAMATIQ_WORKER, env=env, cwd=workdir, capture_output=True, text=True, timeout=60)


def _refused_worker_start(result: "subprocess.CompletedProcess[str]", *needles: str) -> None:
    """A worker that cannot start: exit 2 and one CRITICAL line from longhaul saying why, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if "cannot start a longhaul worker" in line]
    assert len(said) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in said[0], said[0]


@pytest.mark.parametrize("out_dir", ["/dev/null", "/proc/x"])
def test_export_to_a_folder_it_cannot_write_names_out(longhaul: Run, out_dir: str):
    ran = longhaul("run", "--steps", "1", "--task-id", "t", "count")
    assert ran.returncode == 0, ran.stderr
    _clean_error(longhaul("export", "--all", "--out", out_dir), 2, "out_dir (--out)", repr(out_dir))


def _damaged(path: Path) -> None:
    """Overwrite every page after the header with junk: SQLite reads it as a malformed image."""
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.seek(100)
        file.write(b"\x13" * (size - 100))


@pytest.mark.parametrize("damage", ["random bytes", "malformed pages"])
def test_a_corrupt_database_is_one_permanent_error_naming_the_setting(longhaul: Run, tmp_path: Path,
                                                                      damage: str):
    path = tmp_path / "state" / "tasks.db"
    if damage == "random bytes":
        path.parent.mkdir(parents=True)
        path.write_bytes(os.urandom(8192))
    else:
        assert longhaul("run", "--steps", "1", "--task-id", "t", "count").returncode == 0
        assert longhaul("tasks").returncode == 0  # checkpoints the WAL into the file
        _damaged(path)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    for args in (("tasks",), ("run", "--steps", "1", "x")):
        line = _clean_error(longhaul(*args), 2, "LONGHAUL_DATABASE_URL")
        assert "file is not a database" in line or "malformed" in line
        assert "retried" not in line


def _mounted(mount_args: list[str], mount_point: Path, what: str) -> Iterator[Path]:
    """`mount_args` mounted at `mount_point` for the test, unmounted after it (skipped where mount is refused)."""
    mounted = subprocess.run(["mount", *mount_args, str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        missing_prerequisite(f"cannot mount {what} here: {mounted.stderr.decode(errors='replace')}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def read_only_state(tmp_path: Path) -> Iterator[Path]:
    """A read-only bind mount of a folder holding a store with one task (root ignores file modes)."""
    source, view = tmp_path / "rw", tmp_path / "ro"
    source.mkdir()
    view.mkdir()
    store = TaskStore(f"sqlite:///{source / 'tasks.db'}")
    store.close_all()  # every pooled connection, not only this thread's (a mount is undone after)
    yield from _mounted(["--bind", "-o", "ro", str(source)], view, "a read-only bind mount")


def test_a_read_only_database_is_one_line_for_the_cli_and_exit_2_for_a_worker(
        longhaul: Run, cli_env: dict[str, str], read_only_state: Path, tmp_path: Path):
    url = f"sqlite:///{read_only_state / 'tasks.db'}"
    for args in (("tasks",), ("run", "--steps", "1", "x")):
        line = _clean_error(longhaul(*args, LONGHAUL_DATABASE_URL=url), 2, "LONGHAUL_DATABASE_URL", "writable")
        assert "retried" not in line
    _refused_worker_start(_start_dramatiq({**cli_env, "LONGHAUL_DATABASE_URL": url}, tmp_path),
                          "LONGHAUL_DATABASE_URL", "writable")


@pytest.mark.parametrize(("variable", "value"), [
    ("LONGHAUL_MODEL_PRICES_USD_PER_MTOK", "notjson"),
    ("LONGHAUL_REDIS_URL", "notaurl"),
    ("LONGHAUL_REDIS_URL", "redis://localhost:notaport/0"),
])
def test_a_bad_setting_is_one_line_naming_its_variable(longhaul: Run, cli_env: dict[str, str], tmp_path: Path,
                                                        variable: str, value: str):
    _clean_error(longhaul("enqueue", "x", **{variable: value}), 2, variable, repr(value))
    _refused_worker_start(_start_dramatiq({**cli_env, variable: value}, tmp_path), variable)


def test_a_bad_log_level_stops_a_worker_with_one_line(cli_env: dict[str, str], tmp_path: Path):
    _refused_worker_start(_start_dramatiq({**cli_env, "LONGHAUL_LOG_LEVEL": "bogus"}, tmp_path),
                          "LONGHAUL_LOG_LEVEL", "'bogus'")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB file system (tmpfs), to fill up."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    yield from _mounted(["-t", "tmpfs", "-o", "size=2m", "tmpfs"], mount_point, "a tmpfs")


def _fill(folder: Path, *, leave_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as filler:
        filler.write(b"\0" * max(0, free - leave_bytes))


def test_a_full_disk_is_reported_as_full_not_as_a_failed_rollback(small_disk: Path):
    store = TaskStore(f"sqlite:///{small_disk / 'tasks.db'}")
    try:
        assert store.create_task(task_id="t", thread_id="t", channel="test", provider="scripted",
                                 model="scripted-v1", spec=TaskSpec(prompt="p"))
        _fill(small_disk, leave_bytes=64 * 1024)
        problems = []
        for i in range(200):  # each task's spec is larger than what is left on the disk
            try:
                store.create_task(task_id=f"big-{i}", thread_id="t", channel="test", provider="scripted",
                                  model="scripted-v1", spec=TaskSpec(prompt=os.urandom(64 * 1024).hex()))
            except StoreUnavailable as exc:
                problems.append(exc.problem)
                if len(problems) == 3:
                    break
        assert problems, "the disk never filled up"
        for problem in problems:
            assert "database or disk is full" in problem, problems
            assert "cannot rollback" not in problem
        (small_disk / "filler").unlink()
        assert store.summary("t").status is TaskStatus.QUEUED  # nothing already stored was lost
    finally:
        store.close_all()  # every pooled connection, not only this thread's (a mount is undone after)
