"""A kill storm on `openai`-provider tasks whose tools take 0.2-1 s: the journal's promise, counted.

Two Redis workers run tasks against the fake OpenAI server, which counts
model requests per (task, step) and serves the tools' ``http_get`` calls per
idempotency key, each taking 0.2-1 s. 15 SIGKILLs land at random moments.
After each one the test reads, for every task the victim held, whether it
died during a model call (no answer journaled for its step) or during its
tools (the calls still pending). Then: every task completes; model requests
stay within model turns + the kills that landed during a model call; tool
re-executions stay within the calls in flight at a kill; no history holds a
tool call without its result. Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import psutil
import pytest

from longhaul import worker
from longhaul.models import TaskStatus, TaskStore, with_orphans_answered
from longhaul.worker.testing import WorkerProcess, wait_until
from tests.fake_openai import FakeOpenAI, Recorded, Reply, answer, native_call
from tests.fixtures.chaos import all_finished
from tests.test_provider_openai import API_KEY, fake_openai  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.chaos, pytest.mark.crash, pytest.mark.redis, pytest.mark.backends("sqlite", "postgres")]

TASKS, STEPS, KILLS, THREADS = 10, 6, 15, 4


class Counts:
    """What the fake server saw: model requests per (task, step), tool requests per idempotency key."""

    def __init__(self, rng: random.Random) -> None:
        self.model: Counter[tuple[str, int]] = Counter()
        self.tools: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.rng = rng

    def tool_delay_s(self) -> float:
        with self.lock:
            return self.rng.uniform(0.2, 1.0)


def serve_agent(fake: FakeOpenAI, counts: Counts) -> None:
    """Steps 1..STEPS call `http_get` on ``/tool/<key>`` (odd steps twice, in parallel); then the answer."""

    def model(request: Recorded) -> Reply:
        task_id = request.json["messages"][0]["content"]
        with counts.lock:
            counts.model[(task_id, request.step)] += 1
        if request.step > STEPS:
            return answer(request, f"{task_id}: all {STEPS} steps done.")
        calls = [native_call("http_get", {"url": f"{fake.url}/tool/{task_id}:{request.step}:{i}"}, f"c{i}")
                 for i in range(2 if request.step % 2 else 1)]
        return answer(request, f"Step {request.step}.", tool_calls=calls)

    def tool(request: Recorded) -> Reply:
        with counts.lock:
            counts.tools[request.path.removeprefix("/tool/")] += 1
        threading.Event().wait(counts.tool_delay_s())  # the tool's running time
        return Reply(body="tool ran")

    fake.script = model
    fake.routes.update({f"/tool/t{n:02d}:{s}:{i}": tool for n in range(TASKS) for s in range(1, STEPS + 1)
                        for i in range(2)})


def kill_and_classify(victim: WorkerProcess, store: TaskStore) -> tuple[int, int]:
    """SIGKILL `victim`; returns (its tasks that died in a model call, tool calls in flight at the kill)."""
    assert victim.proc is not None
    root = psutil.Process(victim.proc.pid)
    pids = {root.pid, *(child.pid for child in root.children(recursive=True))}
    victim.kill()
    in_model = in_tools = 0
    for row in store.context.tables.Task.select().where(store.context.tables.Task.lease_pid.in_(list(pids))):
        if TaskStatus(row.status).is_terminal:
            continue
        step = store.open_step(row.task_id)
        if step is None:
            in_model += 1
        else:
            in_tools += len(step.pending_calls)
    return in_model, in_tools


def test_a_kill_storm_never_asks_the_model_twice_for_a_stored_answer_nor_reruns_a_stored_tool_result(
    client_runtime, start_worker, fake_openai, rng: random.Random  # noqa: F811
):
    store = client_runtime.store
    counts = Counts(rng)
    serve_agent(fake_openai, counts)
    env = dict(LONGHAUL_OPENAI_BASE_URL=fake_openai.base_url, OPENAI_API_KEY=API_KEY,
               LONGHAUL_HTTP_GET_ALLOW_PRIVATE="true")
    workers = [start_worker(processes=1, threads=THREADS, **env) for _ in range(2)]
    task_ids = [worker.enqueue(f"t{n:02d}", task_id=f"t{n:02d}", provider="openai", model="gpt-test")
                for n in range(TASKS)]

    kills_in_model = calls_in_flight = 0
    for _ in range(KILLS):
        next_kill = time.monotonic() + rng.uniform(0.6, 1.2)
        while time.monotonic() < next_kill:
            time.sleep(0.05)
        victim = rng.choice(workers)
        in_model, in_tools = kill_and_classify(victim, store)
        kills_in_model, calls_in_flight = kills_in_model + in_model, calls_in_flight + in_tools
        victim.start()
    wait_until(lambda: all_finished(store, task_ids), timeout_s=90, what="every task to finish after the storm")

    records = [store.get(task_id) for task_id in task_ids]
    assert [r.status for r in records] == [TaskStatus.COMPLETED] * TASKS, [r.last_error for r in records]
    turns = sum(r.turn_count for r in records)
    requests = sum(counts.model.values())
    reruns = sum(n - 1 for n in counts.tools.values())
    print(f"\njournal kill storm: {TASKS} tasks x {STEPS} steps, {KILLS} kills: {requests} model requests for "
          f"{turns} model turns, {kills_in_model} task(s) killed in a model call; {sum(counts.tools.values())} "
          f"tool requests, {reruns} re-executed, {calls_in_flight} call(s) in flight at a kill")
    assert turns == TASKS * (STEPS + 1)
    assert turns <= requests <= turns + kills_in_model
    assert len(counts.tools) == TASKS * sum(2 if s % 2 else 1 for s in range(1, STEPS + 1))
    assert reruns <= calls_in_flight
    for record in records:
        assert [c.step_index for c in record.checkpoints] == list(range(1, STEPS + 1)), record.task_id
        assert with_orphans_answered(record.execution_history) == record.execution_history, record.task_id
