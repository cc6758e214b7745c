"""The operator's view from the CLI: tasks, traces --follow, export, prune, delete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longhaul.models import TaskStatus
from longhaul.worker.testing import wait_until


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def finished_tasks(longhaul) -> list[str]:
    """Two completed scripted tasks on one thread."""
    for task_id in ("old", "new"):
        result = longhaul("run", f"task {task_id}", "--task-id", task_id, "--thread", "chat", "--steps", "2")
        assert result.returncode == 0, result.stderr
    return ["old", "new"]


def test_traces_follow_prints_new_events_of_a_running_task_and_stops_when_it_ends(start_longhaul, store):
    start_longhaul("run", "slow", "--task-id", "slow", "--steps", "12", "--step-delay", "0.15")
    wait_until(lambda: store.list_tasks(status="running"), timeout_s=30, what="the task to start")
    already = len(store.traces("slow"))

    follower = start_longhaul("traces", "slow", "--follow", "--json")
    follower.proc.wait(timeout=60)

    events = json_lines(follower.stdout())
    assert follower.proc.returncode == 0, follower.stderr()
    sequences = [event["sequence"] for event in events]
    assert sequences == sorted(set(sequences)) and sequences[0] == 0
    assert len(events) > already, "follow printed nothing that happened after it started"
    assert events[-1]["event_type"] == "done"
    assert sum(1 for event in events if event["event_type"] == "checkpoint") == 12


def test_traces_of_an_unknown_task_exit_1_with_a_clear_error(longhaul):
    result = longhaul("traces", "nope")

    assert result.returncode == 1
    assert "task 'nope' not found" in result.stderr and "Traceback" not in result.stderr


def test_tasks_lists_counts_tokens_and_times_and_filters_by_provider_and_time(longhaul, finished_tasks):
    listed = json.loads(longhaul("tasks", "--json", "--provider", "scripted", "--since", "1h").stdout)
    assert {row["task_id"] for row in listed} == set(finished_tasks)
    row = listed[0]
    assert (row["checkpoint_count"], row["turn_count"], row["tool_call_count"]) == (2, 3, 2)
    assert row["message_count"] > 0 and row["started_at"] and row["completed_at"]
    assert "usage" in row and row["usage"]["input_tokens"] == 0

    assert json.loads(longhaul("tasks", "--json", "--provider", "openai").stdout) == []
    assert json.loads(longhaul("tasks", "--json", "--until", "2000-01-01").stdout) == []
    table = longhaul("tasks").stdout
    assert "TURNS" in table and "TOKENS" in table and "old" in table


def test_tasks_with_a_bad_time_exits_2_naming_the_option(longhaul):
    result = longhaul("tasks", "--since", "yesterday-ish")

    assert result.returncode == 2
    assert "--since" in result.stderr


def test_export_writes_rotated_jsonl_files_for_one_task_or_all(longhaul, finished_tasks, tmp_path: Path):
    out = tmp_path / "export"
    one = longhaul("export", "old", "--out", str(out), "--max-events", "2", "--json")
    assert one.returncode == 0, one.stderr
    files = json.loads(one.stdout)
    assert len(files) >= 2 and all(f["event_count"] <= 2 for f in files)
    lines = [line for f in files for line in json_lines(Path(f["path"]).read_text())]
    assert [event["sequence"] for event in lines] == list(range(len(lines)))
    assert {event["task_id"] for event in lines} == {"old"}

    everything = json.loads(longhaul("export", "--all", "--out", str(out), "--json").stdout)
    assert {f["task_id"] for f in everything} == set(finished_tasks)


def test_export_needs_exactly_one_of_a_task_id_or_all(longhaul, tmp_path: Path):
    for args in ([], ["old", "--all"]):
        result = longhaul("export", *args, "--out", str(tmp_path / "x"))
        assert result.returncode == 2 and "TASK_ID or --all" in result.stderr


def test_prune_never_deletes_a_running_task_and_reports_what_it_deleted(longhaul, start_longhaul, store,
                                                                       finished_tasks):
    start_longhaul("run", "still going", "--task-id", "running", "--steps", "50", "--step-delay", "0.1")
    wait_until(lambda: store.list_tasks(status="running"), timeout_s=30, what="the task to start")

    dry = json.loads(longhaul("prune", "--max-tasks", "0", "--dry-run", "--json").stdout)
    assert dry == {"dry_run": True, "deleted": sorted(finished_tasks)}
    assert store.count_tasks() == 3

    result = longhaul("prune", "--max-tasks", "0", "--older-than", "0s")
    assert result.returncode == 0, result.stderr
    assert "deleted 2 finished task(s)" in result.stdout
    remaining = store.list_tasks()
    assert [(t.task_id, t.status) for t in remaining] == [("running", TaskStatus.RUNNING)]


def test_prune_without_a_limit_exits_2(longhaul):
    result = longhaul("prune")

    assert result.returncode == 2 and "--max-tasks" in result.stderr


def test_deleting_a_thread_removes_its_tasks_with_their_checkpoints_messages_and_traces(
    longhaul, finished_tasks, store, count_rows
):
    assert count_rows(store, "trace_batch") > 0

    result = longhaul("delete", "--thread", "chat")

    assert "deleted 2 task(s)" in result.stdout
    assert [count_rows(store, table) for table in ("task", "checkpoint", "message", "trace_batch")] == [0, 0, 0, 0]
