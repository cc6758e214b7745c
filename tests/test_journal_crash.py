"""SIGKILL at the journal's edges: after the answer is stored, between two tools, during a parallel batch.

A `longhaul run` process asks the fake OpenAI server for one answer with two
tool calls; one of them is an `http_get` of ``/block``, which the server holds
until the process is dead. ``longhaul resume --interrupted`` then finishes the
task: the model is never asked for step 1 again, and only the calls without a
stored result run again, with the same idempotency keys.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from longhaul.models import TaskStatus, TaskStore, with_orphans_answered
from longhaul.worker.testing import ledger_counts, wait_until
from tests.fake_openai import Reply, answer, native_call
from tests.fixtures.cli import LONGHAUL
from tests.test_provider_openai import chat_env, fake_openai  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.crash, pytest.mark.backends("sqlite", "postgres")]

#: Step 1's two calls per case, and which of them has a result stored when the kill lands.
CASES: dict[str, tuple[list[tuple[str, str]], list[int]]] = {
    "after the answer, before the first tool": ([("http_get", "/block"), ("ledger", "after")], []),
    "between two tools": ([("ledger", "before"), ("http_get", "/block")], [0]),
    "during a parallel batch": ([("http_get", "/fast"), ("http_get", "/block")], [0]),
}


def step_one_calls(base_url: str, planned: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [native_call(tool, {"url": base_url + target} if tool == "http_get" else {"line": target}, f"c{i}")
            for i, (tool, target) in enumerate(planned)]


@pytest.mark.parametrize("case", list(CASES))
def test_a_sigkill_mid_step_resumes_the_stored_answer_and_runs_only_the_calls_without_a_result(
    fake_openai, db_url, tmp_path: Path, case: str  # noqa: F811
):
    planned, stored_at_kill = CASES[case]
    ledger = tmp_path / "ledger.txt"
    calls = step_one_calls(fake_openai.url, planned)
    fake_openai.script = lambda request: (answer(request, "Two things.", tool_calls=calls) if request.step == 1
                                          else answer(request, "Both done."))
    first_block = fake_openai.hold()
    fake_openai.routes["/block"] = lambda request: Reply(
        body="unblocked", hold=first_block if len(fake_openai.requests_to("/block")) == 1 else None)
    fake_openai.routes["/fast"] = lambda request: Reply(body="fast")
    env = chat_env(db_url, fake_openai, tmp_path)
    store = TaskStore(db_url)
    with open(tmp_path / "run.err", "wb") as err:
        running = subprocess.Popen([*LONGHAUL, "run", "two things", "--task-id", "k", "--provider", "openai",
                                    "--model", "gpt-test", "--ledger", str(ledger)],
                                   env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
    try:
        def at_the_kill_point() -> bool:
            if running.poll() is not None or not fake_openai.requests_to("/block"):
                return running.poll() is not None
            step = store.open_step("k")
            return step is not None and [i for i, r in enumerate(step.results) if r is not None] == stored_at_kill

        wait_until(at_the_kill_point, timeout_s=30, what=f"the run to reach the kill point ({case})")
        assert running.poll() is None, (tmp_path / "run.err").read_text()
        running.send_signal(signal.SIGKILL)
    finally:
        running.kill()
        running.wait()
    step = store.open_step("k")
    assert step is not None and step.step_index == 1
    assert [i for i, _ in step.pending_calls] == [i for i in range(2) if i not in stored_at_kill]

    resumed = subprocess.run([*LONGHAUL, "resume", "--interrupted", "--json"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)

    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "completed"
    assert fake_openai.steps_asked() == [1, 2]  # step 1's answer came from the journal on resume
    assert len(fake_openai.requests_to("/block")) == 2  # the call in flight ran again
    assert len(fake_openai.requests_to("/fast")) == (1 if ("http_get", "/fast") in planned else 0)
    assert sum(ledger_counts(ledger).values()) == sum(tool == "ledger" for tool, _ in planned)  # never twice
    record = store.get("k")
    store.close_all()
    assert record.status is TaskStatus.COMPLETED and [c.step_index for c in record.checkpoints] == [1]
    results = [m for m in record.execution_history if m.role == "tool"]
    assert [m.tool_call_id for m in results] == ["c0", "c1"]  # the answer's order
    assert with_orphans_answered(record.execution_history) == record.execution_history
