"""Prometheus metrics and OTel spans of a real `longhaul worker` pool whose worker processes are SIGKILLed.

The pool (a supervisor and two worker processes) serves one metrics
endpoint and prints its spans (``OTEL_TRACES_EXPORTER=console``, set by
environment only) to a file. Two worker processes are killed mid-run;
their replacements and the survivors resume the tasks. Afterwards the
counters of what the store records equal the store's own counts, and
each killed task's runs, in every process, share one trace. A task the
CLI cancels before any worker ran it is counted too (the store counts each
task's end, whoever wrote it).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil
import pytest

from longhaul import worker
from longhaul.models import TaskStatus
from longhaul.worker.testing import WorkerProcess, free_port, wait_until
from tests.fixtures.cli import LONGHAUL

pytestmark = [pytest.mark.redis, pytest.mark.crash]

TASKS = 8
STEPS = 6


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of the endpoint: {sample name: {sorted labels: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    return sum(value for key, value in samples.items() if set(labels.items()) <= set(key))


def console_spans(path: Path) -> list[dict]:
    """The spans ConsoleSpanExporter printed (one JSON object after another)."""
    text, spans, decoder, at = path.read_text(), [], json.JSONDecoder(), 0
    while (at := text.find("{", at)) != -1:
        span, at = decoder.raw_decode(text, at)
        spans.append(span)
    return spans


def worker_children(pool: WorkerProcess) -> list[psutil.Process]:
    assert pool.proc is not None
    return psutil.Process(pool.proc.pid).children()


def test_metrics_agree_with_the_store_and_spans_keep_one_trace_per_task_after_worker_processes_are_killed(
        worker_env, client_runtime, store, tmp_path):
    port, spans_path = free_port(), tmp_path / "spans.json"
    command = shlex.join([*LONGHAUL, "worker", "--processes", "2", "--threads", "2", "--metrics-port", str(port)])
    env = {**worker_env, "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "metrics-test"}
    pool = WorkerProcess(env, processes=2, threads=2, log_path=tmp_path / "pool.log",
                         argv=["sh", "-c", f"exec {command} >> {shlex.quote(str(spans_path))}"]).start()
    try:
        wait_until(lambda: _answers(port) and len(worker_children(pool)) == 2, timeout_s=30, what="the pool to start")
        task_ids = [worker.enqueue(f"job {i}", task_id=f"job-{i}", steps=STEPS, step_delay_s=0.15,
                                   ledger_path=str(tmp_path / "ledger.txt")) for i in range(TASKS)]
        # Queued behind job-0 on its thread, so no worker runs it before the CLI (no worker) cancels it.
        worker.enqueue("never runs", task_id="cancel-me", thread_id="job-0", steps=1)
        cancelled = subprocess.run([*LONGHAUL, "cancel", "cancel-me"], env=worker_env, capture_output=True,
                                   text=True, timeout=60)
        assert cancelled.returncode == 0, cancelled.stderr
        assert store.summary("cancel-me").status is TaskStatus.CANCELLED
        orphaned: set[str] = set()
        for _ in range(2):  # kill a worker process holding leases, twice
            victim = wait_until(lambda: _leaseholder(store, task_ids, pool), timeout_s=30, what="a leaseholder")
            orphaned |= {t for t in task_ids if (s := store.summary(t)).lease and s.lease.pid == victim.pid}
            os.kill(victim.pid, signal.SIGKILL)
            time.sleep(0.5)  # let the pool replace it and the tasks move on before the next kill
        wait_until(lambda: all(store.summary(t).status is TaskStatus.COMPLETED for t in task_ids),
                   timeout_s=90, what="every task to complete")
        metrics = wait_until(lambda: _settled(scrape(port)), timeout_s=30, what="no task in flight")
        assert pool.terminate() == 0
    finally:
        pool.kill()

    summaries = [store.summary(t) for t in task_ids]
    assert orphaned, "the killed processes held no lease"
    # What the store records, counted at commit, equals the store's counts.
    assert total(metrics["longhaul_tasks_total"], status="completed", agent="scripted") == TASKS
    assert total(metrics["longhaul_tasks_total"], status="cancelled", agent="scripted") == 1
    assert total(metrics["longhaul_tasks_total"]) == TASKS + 1 == store.count_tasks()
    assert total(metrics["longhaul_steps_total"]) == sum(s.turn_count for s in summaries) == TASKS * (STEPS + 1)
    assert total(metrics["longhaul_tool_calls_total"], tool="ledger", outcome="ok") == sum(
        s.tool_call_count for s in summaries) == TASKS * STEPS
    assert total(metrics["longhaul_step_duration_seconds_count"]) == TASKS * (STEPS + 1)
    # Every model call made, including the steps a kill cut short.
    assert total(metrics["longhaul_model_calls_total"], provider="scripted", model="scripted-v1") >= TASKS * (STEPS + 1)
    assert total(metrics["longhaul_model_call_duration_seconds_count"]) == total(metrics["longhaul_model_calls_total"])
    # Each orphaned task was taken over (by recovery's pass or a redelivery) at least once.
    assert total(metrics["longhaul_lease_takeovers_total"]) >= len(orphaned)
    assert total(metrics["longhaul_recoveries_total"], reason="holder_dead") >= 1
    assert total(metrics["longhaul_tasks_waiting"], waiting_for="worker") == 0
    assert total(metrics["dramatiq_messages_total"], actor_name="longhaul.run_task") >= TASKS

    spans = console_spans(spans_path)
    runs = [span for span in spans if span["name"] == "invoke_agent scripted"]
    for task_id in orphaned:
        traces = {span["context"]["trace_id"] for span in spans
                  if span["attributes"].get("longhaul.task.id") == task_id}
        tool_traces = {span["context"]["trace_id"] for span in spans if span["name"] == "execute_tool ledger"
                       and span["parent_id"] in {run["context"]["span_id"] for run in runs
                                                 if run["attributes"]["longhaul.task.id"] == task_id}}
        assert len(traces) == 1 and tool_traces <= traces, f"{task_id}: its runs span {len(traces)} traces"
        stored_trace, _ = store.trace_parent(task_id).split("-")
        assert traces == {f"0x{stored_trace}"}
    resumed = [run for run in runs if run["attributes"]["longhaul.task.id"] in orphaned and run["parent_id"]]
    assert resumed, "no resumed run was exported"


def _settled(metrics: dict) -> dict | None:
    """The samples once no run is in flight (a run's end is counted just after its task's status is stored)."""
    return metrics if total(metrics["longhaul_tasks_in_flight"]) == 0 else None


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _leaseholder(store, task_ids: list[str], pool: WorkerProcess):
    pids = {child.pid: child for child in worker_children(pool)}
    for task_id in task_ids:
        lease = store.summary(task_id).lease
        if lease is not None and lease.pid in pids and store.summary(task_id).checkpoint_count >= 1:
            return pids[lease.pid]
    return None


def test_token_and_cost_counters_of_a_real_pool_equal_what_the_openai_provider_reported_and_the_store_summed(
        worker_env, client_runtime, store, tmp_path):
    from tests.fake_openai import FakeOpenAI, answer, native_call

    fake = FakeOpenAI().start()
    fake.script = lambda request: (answer(request, "Noting.", tool_calls=[native_call(
        "ledger", {"line": f"step {request.step}"}, f"c{request.step}")]) if request.step < 3
        else answer(request, "done"))
    port = free_port()
    env = {**worker_env, "LONGHAUL_OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "lh-test-key-metrics",
           "LONGHAUL_MODEL_PRICES_USD_PER_MTOK": json.dumps({"gpt-test": [2.0, 8.0]})}
    pool = WorkerProcess(env, processes=1, threads=2, log_path=tmp_path / "pool.log",
                         argv=[*LONGHAUL, "worker", "--processes", "1", "--threads", "2",
                               "--metrics-port", str(port)]).start()
    try:
        wait_until(lambda: _answers(port), timeout_s=30, what="the pool to start")
        task_ids = [worker.enqueue(f"note {i}", task_id=f"priced-{i}", provider="openai", model="gpt-test",
                                   ledger_path=str(tmp_path / "ledger.txt")) for i in range(2)]
        wait_until(lambda: all(store.summary(t).status is TaskStatus.COMPLETED for t in task_ids),
                   timeout_s=60, what="both tasks to complete")
        metrics = wait_until(lambda: _settled(scrape(port)), timeout_s=30, what="no task in flight")
        assert pool.terminate() == 0
    finally:
        pool.kill()
        fake.stop()

    usages = [store.summary(t).usage for t in task_ids]
    tokens = metrics["longhaul_tokens_total"]
    # usage_block(): 11 in (3 cached), 7 out (2 reasoning) per call, 3 calls per task.
    assert total(tokens, type="input", model="gpt-test") == sum(u.input_tokens for u in usages) == 2 * 3 * 11
    assert total(tokens, type="output", model="gpt-test") == sum(u.output_tokens for u in usages) == 2 * 3 * 7
    assert total(tokens, type="cache_read", model="gpt-test") == sum(u.cache_read_tokens for u in usages) > 0
    assert total(tokens, type="reasoning", model="gpt-test") == sum(u.reasoning_tokens for u in usages) > 0
    assert total(metrics["longhaul_cost_usd_total"], model="gpt-test") == pytest.approx(
        sum(u.cost_usd for u in usages)) == pytest.approx(2 * 3 * (11 * 2.0 + 7 * 8.0) / 1_000_000)
    assert total(metrics["longhaul_model_calls_total"], provider="openai", model="gpt-test") == 2 * 3
    assert total(metrics["longhaul_tasks_total"], status="completed", agent="openai") == 2
