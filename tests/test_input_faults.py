"""Chaos tests of issue 13 points 7 and 12: a Redis outage at enqueue, Redis restarted empty, and bad input
or a broken database file, each met by one line naming what to fix and the README's exit code.

Real processes throughout: the `longhaul` CLI in a subprocess, real redis-server stopped and restarted
without its data, real dramatiq worker processes.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from longhaul.models import TaskStatus, TaskStore
from longhaul.worker.testing import RedisServer, WorkerProcess, wait_until

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
        store.close()
    assert worker.proc is not None and worker.proc.poll() is None


@pytest.mark.redis
def test_redis_restarted_empty_resends_every_queued_task_within_10_s_by_default(
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
        store.close()
        worker.kill()
    assert "no longer holds its message" in worker.log()


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
        store.close()
    log = worker.log()
    assert "resuming task" not in log, log[-2000:]
