"""Agent steps per second through longhaul vs bare Dramatiq messages per second,
and resume latency after SIGKILL + restart.

Usage: python bench/worker_throughput.py [--quick]

Everything is measured in one run on this machine, so the ratios compare
like with like. Needs `redis-server` on PATH for the Redis rows (skipped,
with a note, without it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import dramatiq
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longhaul.worker import Runtime, api, load_settings, set_runtime  # noqa: E402
from longhaul.worker.testing import RedisServer, WorkerProcess, wait_until  # noqa: E402


def bare_dramatiq_messages_per_s(broker: dramatiq.Broker, count: int) -> float:
    """No-op messages through a Dramatiq broker and one in-process worker (8 threads)."""
    done = threading.Semaphore(0)

    @dramatiq.actor(broker=broker, queue_name="bench", actor_name="bench.noop", max_retries=0)
    def noop(i: int) -> None:
        done.release()

    broker.emit_after("process_boot")
    worker = Worker(broker, worker_threads=8, worker_timeout=50)
    worker.start()
    try:
        started = time.perf_counter()
        for i in range(count):
            noop.send(i)
        for _ in range(count):
            done.acquire()
        return count / (time.perf_counter() - started)
    finally:
        worker.stop()


def longhaul_steps_per_s(workdir: Path, steps: int) -> float:
    """One scripted task of `steps` zero-delay steps, embedded runtime."""
    runtime = Runtime(load_settings(database_url=str(workdir / "steps.db"), redis_url=None), embedded=True)
    set_runtime(runtime)
    try:
        started = time.perf_counter()
        record = api.run_inline("throughput", steps=steps)
        elapsed = time.perf_counter() - started
        assert record.checkpoint_count == steps, record.last_error
        return steps / elapsed
    finally:
        runtime.stop_embedded_worker()
        set_runtime(None)


def resume_latency_s(workdir: Path, redis: RedisServer, tasks: int) -> float:
    """SIGKILL a worker mid-task; seconds from the new worker's start to the first resumed step."""
    db_url = f"sqlite:///{workdir / 'resume.db'}"
    env = {**os.environ, "LONGHAUL_DATABASE_URL": db_url, "LONGHAUL_REDIS_URL": redis.url,
           "dramatiq_queue_prefetch": "4"}
    client = Runtime(load_settings(database_url=db_url, redis_url=redis.url))
    set_runtime(client)
    try:
        ids = [api.enqueue("resume", steps=1000, step_delay_s=0.05) for _ in range(tasks)]
        first = WorkerProcess(env, processes=1, threads=4, log_path=workdir / "w1.log").start()
        wait_until(lambda: all(client.store.summary(t).checkpoint_count >= 3 for t in ids), timeout_s=60,
                   what="tasks to start")
        first.kill()
        at_kill = {t: client.store.summary(t).checkpoint_count for t in ids}
        second = WorkerProcess(env, processes=1, threads=4, log_path=workdir / "w2.log").start()
        try:
            wait_until(lambda: any(client.store.summary(t).checkpoint_count > n for t, n in at_kill.items()),
                       timeout_s=60, what="a resumed step", poll_s=0.01)
            return time.monotonic() - second.started_at
        finally:
            second.kill()
    finally:
        set_runtime(None)
        client.broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: proves the script works")
    args = parser.parse_args()
    messages = 500 if args.quick else 5000
    steps = 300 if args.quick else 3000

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows: list[tuple[str, str]] = []
        stub_rate = bare_dramatiq_messages_per_s(StubBroker(), messages)
        step_rate = longhaul_steps_per_s(workdir, steps)
        rows.append(("bare Dramatiq, in-process broker (msgs/s)", f"{stub_rate:,.0f}"))
        rows.append(("longhaul agent steps, one task (steps/s)", f"{step_rate:,.0f}"))
        rows.append(("  ratio longhaul steps / bare messages", f"{step_rate / stub_rate:.2f}x"))

        if shutil.which("redis-server"):
            from dramatiq.brokers.redis import RedisBroker

            redis = RedisServer(workdir).start()
            try:
                redis_rate = bare_dramatiq_messages_per_s(RedisBroker(url=redis.url), messages)
                rows.append(("bare Dramatiq, Redis broker (msgs/s)", f"{redis_rate:,.0f}"))
                rows.append(("  ratio longhaul steps / bare Redis messages", f"{step_rate / redis_rate:.2f}x"))
                latency = resume_latency_s(workdir, redis, tasks=4)
                rows.append(("resume latency after SIGKILL, same host (s)", f"{latency:.2f}"))
                rows.append(("  vs Dramatiq's own redelivery (>= 60 s heartbeat timeout)",
                             f"{60 / latency:.0f}x sooner"))
            finally:
                redis.stop()
        else:
            rows.append(("Redis rows", "skipped: redis-server not on PATH"))

    width = max(len(label) for label, _ in rows)
    print(f"{'measure':<{width}}  value")
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
