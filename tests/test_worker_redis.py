"""Real Redis, real `dramatiq` worker processes, real SIGKILLs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from longhaul import worker
from longhaul.models import TaskStatus
from longhaul.worker.testing import ledger_counts, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.crash]


def enqueue_many(count: int, *, steps: int, step_delay_s: float, ledger: Path) -> list[str]:
    return [
        worker.enqueue(f"job {i}", task_id=f"job-{i:02d}", steps=steps, step_delay_s=step_delay_s,
                       ledger_path=str(ledger))
        for i in range(count)
    ]


def assert_exactly_once(store, task_ids: list[str], steps: int, ledger: Path,
                        in_flight: dict[str, int]) -> int:
    """Every task completed with one checkpoint per step; only in-flight steps ran twice.

    Returns how many steps ran twice.
    """
    counts = ledger_counts(ledger)
    repeated = 0
    for task_id in task_ids:
        record = store.get(task_id)
        assert record.status is TaskStatus.COMPLETED, (task_id, record.status, record.last_error)
        assert [c.step_index for c in record.checkpoints] == list(range(1, steps + 1))
        for step in range(1, steps + 1):
            seen = counts[f"{task_id} step {step}"]
            assert seen >= 1, f"{task_id} step {step} never ran"
            if seen > 1:
                assert seen == 2 and in_flight.get(task_id) == step, (
                    f"{task_id} step {step} ran {seen} times; only step {in_flight.get(task_id)} was in flight"
                )
                repeated += 1
    return repeated


def test_a_killed_worker_s_tasks_resume_on_a_new_worker_without_repeating_steps(
    client_runtime, start_worker, tmp_path: Path
):
    store, ledger, steps = client_runtime.store, tmp_path / "ledger.txt", 20
    first = start_worker(processes=2, threads=4)
    task_ids = enqueue_many(10, steps=steps, step_delay_s=0.1, ledger=ledger)
    wait_until(lambda: sum(store.summary(t).checkpoint_count for t in task_ids) >= 30,
               timeout_s=60, what="30 checkpoints before the kill")

    first.kill()
    at_kill = {t: store.summary(t).checkpoint_count for t in task_ids}
    in_flight = {t: n + 1 for t, n in at_kill.items() if n < steps}
    assert any(0 < n < steps for n in at_kill.values()), f"no task was mid-run at the kill: {at_kill}"

    second = start_worker(processes=2, threads=4)
    progressed = lambda: [t for t, n in at_kill.items() if n < steps and store.summary(t).checkpoint_count > n]  # noqa: E731
    wait_until(progressed, timeout_s=30, what="a first interrupted task to make progress")
    first_resumed_s = time.monotonic() - second.started_at
    wait_until(lambda: len(progressed()) == len(in_flight), timeout_s=30,
               what="every interrupted task to make progress")
    resumed_after_s = time.monotonic() - second.started_at
    wait_until(lambda: all(store.summary(t).status.is_terminal for t in task_ids),
               timeout_s=90, what="every task to finish")

    repeated = assert_exactly_once(store, task_ids, steps, ledger, in_flight)
    print(f"\nresume after SIGKILL: first resumed step {first_resumed_s:.2f} s and all {len(in_flight)} "
          f"interrupted tasks {resumed_after_s:.2f} s after the new worker started (8 threads for 10 tasks); "
          f"{repeated} in-flight steps ran twice")


def test_the_same_task_delivered_several_times_at_once_runs_once(client_runtime, start_worker, tmp_path: Path):
    store, ledger, steps = client_runtime.store, tmp_path / "ledger.txt", 8
    (task_id,) = enqueue_many(1, steps=steps, step_delay_s=0.05, ledger=ledger)
    for _ in range(3):
        client_runtime.send(task_id)  # duplicates, as a redelivery or a racing resume would send
    start_worker(processes=1, threads=4)
    wait_until(lambda: store.summary(task_id).status.is_terminal, timeout_s=60, what="the task to finish")

    assert assert_exactly_once(store, [task_id], steps, ledger, in_flight={}) == 0
    assert store.summary(task_id).recovery_count == 0


def test_sigterm_lets_the_current_step_finish_and_checkpoint(client_runtime, start_worker, tmp_path: Path):
    store, ledger, steps = client_runtime.store, tmp_path / "ledger.txt", 6
    (task_id,) = enqueue_many(1, steps=steps, step_delay_s=1.0, ledger=ledger)
    first = start_worker(processes=1, threads=2)
    # A step is in flight once its ledger line exists but its checkpoint does not.
    wait_until(lambda: sum(ledger_counts(ledger).values()) == store.summary(task_id).checkpoint_count + 1 >= 2,
               timeout_s=60, what="a step in flight")

    assert first.terminate() == 0
    interrupted = store.get(task_id)
    assert interrupted.status is TaskStatus.RUNNING and interrupted.lease is None
    ran = sum(ledger_counts(ledger).values())
    assert interrupted.checkpoint_count == ran, "the in-flight step was not checkpointed"
    assert interrupted.checkpoint_count < steps

    start_worker(processes=1, threads=2)
    wait_until(lambda: store.summary(task_id).status.is_terminal, timeout_s=60, what="the task to finish")
    assert assert_exactly_once(store, [task_id], steps, ledger, in_flight={}) == 0


def test_malformed_messages_on_the_queue_are_dropped_and_the_worker_keeps_serving(
    client_runtime, start_worker, redis_server, tmp_path: Path
):
    import redis
    from dramatiq import Message

    client = redis.Redis.from_url(redis_server.url)
    queue = client_runtime.settings.queue_name
    bad_messages = {
        "wrong-args": Message(queue_name=queue, actor_name="longhaul.run_task", args=(123, "x"), kwargs={},
                              options={"redis_message_id": "wrong-args"}),
        "unknown-task": Message(queue_name=queue, actor_name="longhaul.run_task", args=("no-such-task",),
                                kwargs={}, options={"redis_message_id": "unknown-task"}),
    }
    bodies = {message_id: message.encode() for message_id, message in bad_messages.items()}
    bodies["not-json"] = b"\x00\xffnot json at all"
    bodies["truncated"] = b'{"queue_name": "longhaul", "actor_na'
    for message_id, body in bodies.items():
        client.hset(f"dramatiq:{queue}.msgs", message_id, body)
        client.rpush(f"dramatiq:{queue}", message_id)
    ledger = tmp_path / "ledger.txt"
    task_ids = enqueue_many(3, steps=3, step_delay_s=0, ledger=ledger)

    worker_process = start_worker(processes=1, threads=2)
    wait_until(lambda: all(store_status(client_runtime, t).is_terminal for t in task_ids), timeout_s=30,
               what="the good tasks, queued behind the bad messages")

    assert all(client_runtime.store.get(t).status is TaskStatus.COMPLETED for t in task_ids)
    dead_lettered = {m.decode() for m in client.zrange(f"dramatiq:{queue}.XQ", 0, -1)}
    assert {"not-json", "truncated"} <= dead_lettered, "undecodable messages are kept for inspection"
    wait_until(lambda: "no such task" in worker_process.log(), timeout_s=10,
               what="the worker to log the unknown task")
    assert "malformed message" in worker_process.log()
    assert "not a valid Dramatiq message" in worker_process.log()
    assert client_runtime.store.count_tasks() == len(task_ids)


def store_status(runtime, task_id: str) -> TaskStatus:
    return runtime.store.summary(task_id).status


def test_longhaul_run_waits_for_the_redis_workers_and_enqueue_prints_the_id(
    client_runtime, start_worker, worker_env: dict[str, str]
):
    import subprocess
    import sys

    start_worker(processes=1, threads=2)
    cli = [sys.executable, "-c", "from longhaul.worker.cli import main; main()"]
    done = subprocess.run([*cli, "run", "via redis", "--steps", "3", "--json"], env=worker_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"status": "completed"' in done.stdout

    sent = subprocess.run([*cli, "enqueue", "queued via redis", "--steps", "2"], env=worker_env,
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    task_id = sent.stdout.strip()
    wait_until(lambda: store_status(client_runtime, task_id) is TaskStatus.COMPLETED, timeout_s=60,
               what="the enqueued task to complete")
