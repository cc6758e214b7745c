"""SIGKILL at each named fault point of a step (`LONGHAUL_FAULT_AT`), then a resume: exact counts.

A `longhaul run` process asks the fake OpenAI server for one answer with two
tool calls and kills itself at the point the case names (the worker's own
`fault_points`, so the kill lands exactly there, not roughly there).
``longhaul resume --interrupted`` then finishes the task: the model is asked
for step 1 once in all, and only the calls without a stored result run
again, with the same idempotency keys. Counts are exact: model requests per
step, ledger lines per call, HTTP requests per path.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from longhaul.models import TaskStatus, TaskStore, with_orphans_answered
from longhaul.worker.testing import ledger_counts
from tests.fake_openai import Recorded, Reply, answer, native_call
from tests.fixtures.cli import LONGHAUL
from tests.test_provider_openai import chat_env, fake_openai  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.crash, pytest.mark.backends("sqlite", "postgres")]

#: fault point -> step 1's two calls, the calls with a result stored at the kill, and how often each
#: ledger line / HTTP path ran in all (before the kill and on resume).
CASES: dict[str, tuple[list[tuple[str, str]], list[int], dict[str, int]]] = {
    "after_answer_journaled": ([("ledger", "a"), ("ledger", "b")], [], {"a": 1, "b": 1}),
    "between_tools": ([("ledger", "a"), ("ledger", "b")], [0], {"a": 1, "b": 1}),
    "in_parallel_batch": ([("http_get", "/fast"), ("http_get", "/slow")], [0], {"/fast": 1, "/slow": 2}),
    "before_checkpoint": ([("ledger", "a"), ("ledger", "b")], [0], {"a": 1, "b": 2}),  # b's result was lost
}


def step_one_calls(base_url: str, planned: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [native_call(tool, {"url": base_url + target} if tool == "http_get" else {"line": target}, f"c{i}")
            for i, (tool, target) in enumerate(planned)]


def slow_after_fast(fake: Any) -> None:
    """``/slow`` is held the first time until the server stops; ``/fast`` answers once ``/slow`` has arrived.

    So at the first result of the parallel batch the other call is in flight, every time.
    """
    slow_arrived, first_slow = threading.Event(), fake.hold()

    def slow(request: Recorded) -> Reply:
        slow_arrived.set()
        return Reply(body="slow", hold=first_slow if len(fake.requests_to("/slow")) == 1 else None)

    fake.routes["/slow"] = slow
    fake.routes["/fast"] = lambda request: Reply(body="fast", hold=slow_arrived)


@pytest.mark.parametrize("point", list(CASES))
def test_a_sigkill_at_a_named_point_resumes_the_stored_answer_and_reruns_exactly_the_calls_without_a_result(
    fake_openai, db_url, tmp_path: Path, point: str  # noqa: F811
):
    planned, stored_at_kill, ran_in_all = CASES[point]
    ledger = tmp_path / "ledger.txt"
    calls = step_one_calls(fake_openai.url, planned)
    fake_openai.script = lambda request: (answer(request, "Two things.", tool_calls=calls) if request.step == 1
                                          else answer(request, "Both done."))
    slow_after_fast(fake_openai)
    env = chat_env(db_url, fake_openai, tmp_path)
    store = TaskStore(db_url)

    killed = subprocess.run([*LONGHAUL, "run", "two things", "--task-id", "k", "--provider", "openai",
                             "--model", "gpt-test", "--ledger", str(ledger)],
                            env={**env, "LONGHAUL_FAULT_AT": point}, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert f"LONGHAUL_FAULT_AT={point}: killing this process" in killed.stderr
    step = store.open_step("k")
    assert step is not None and step.step_index == 1
    assert [i for i, r in enumerate(step.results) if r is not None] == stored_at_kill

    resumed = subprocess.run([*LONGHAUL, "resume", "--interrupted", "--json"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)

    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "completed"
    requests = Counter(fake_openai.steps_asked())
    print(f"{point}: model requests per step {dict(requests)}, tool runs {ran_in_all}")
    assert requests == {1: 1, 2: 1}  # step 1's answer came from the journal on resume
    ran = {**ledger_counts(ledger), **{path: len(fake_openai.requests_to(path)) for path in ("/fast", "/slow")}}
    assert {what: count for what, count in ran.items() if count} == ran_in_all
    record = store.get("k")
    store.close_all()
    assert record.status is TaskStatus.COMPLETED and [c.step_index for c in record.checkpoints] == [1]
    results = [m for m in record.execution_history if m.role == "tool"]
    assert [m.tool_call_id for m in results] == ["c0", "c1"]  # the answer's order
    assert with_orphans_answered(record.execution_history) == record.execution_history

