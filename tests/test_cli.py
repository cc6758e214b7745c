"""The `longhaul` command as a user runs it: real subprocesses, real signals, no Redis.

Each command runs as ``python -c 'from longhaul.worker.cli import main; main()'`` (the
console script's entry point, independent of PATH) against this test's
SQLite file, with every ``LONGHAUL_*`` and ``REDIS_URL`` variable of the
calling environment removed, so the embedded broker is used.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from longhaul import worker
from longhaul.models import TaskSpec, TaskStatus, TaskStore
from longhaul.worker.testing import ledger_counts, wait_until

Longhaul = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger.txt"


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.stdout, f"no output; stderr: {result.stderr}"
    return json.loads(result.stdout)


def assert_clean_error(result: subprocess.CompletedProcess[str], exit_code: int, *names: str) -> None:
    """The command failed with `exit_code` and one clear message naming `names`, no traceback."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert name in result.stderr, f"{name!r} not in {result.stderr!r}"


def ledger_lines(path: Path) -> int:
    return sum(ledger_counts(path).values())


# -- run ------------------------------------------------------------------------------


def test_run_runs_a_task_to_its_end_and_prints_it_as_json(longhaul, ledger, store):
    result = longhaul("run", "count to three", "--task-id", "three", "--steps", "3", "--ledger", str(ledger),
                      "--json")

    assert result.returncode == 0, result.stderr
    record = as_json(result)
    assert record["task_id"] == "three"
    assert record["status"] == "completed"
    assert [c["step_index"] for c in record["checkpoints"]] == [1, 2, 3]
    assert record["final_response"].startswith("Done: 3 steps")
    assert store.get("three").status is TaskStatus.COMPLETED
    assert ledger_counts(ledger) == {f"three step {i}": 1 for i in (1, 2, 3)}


def test_run_without_json_shows_live_progress_and_the_final_response(longhaul):
    result = longhaul("run", "count to two", "--task-id", "two", "--steps", "2")

    assert result.returncode == 0, result.stderr
    assert "step 2/2" in result.stderr and "ledger" in result.stderr
    assert "two: completed after 2 steps" in result.stdout
    assert "Done: 2 steps" in result.stdout


def test_run_of_a_task_that_fails_exits_1_with_its_error(longhaul):
    result = longhaul("run", "too long", "--steps", "3", "--max-steps", "1")

    assert_clean_error(result, 1)
    assert "failed after 1 steps" in result.stdout
    assert "max_steps" in result.stdout


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("args, env, names", [
    pytest.param(("run", ""), {}, ("prompt",), id="empty prompt"),
    pytest.param(("run", "   "), {}, ("prompt",), id="blank prompt"),
    pytest.param(("run", "x", "--steps", "-1"), {}, ("--steps",), id="negative steps"),
    pytest.param(("run", "x", "--step-delay", "-0.5"), {}, ("--step-delay",), id="negative delay"),
    pytest.param(("run", "x", "--provider", "nope"), {}, ("provider", "'nope'", "scripted"),
                 id="unknown provider"),
    pytest.param(("run", "x", "--task-id", "has space"), {}, ("task_id",), id="bad task id"),
    pytest.param(("run", "x"), {"LONGHAUL_LEASE_S": "abc"}, ("LONGHAUL_LEASE_S",), id="bad env value"),
    pytest.param(("run", "x"), {"LONGHAUL_MAX_RETRIES": "-1"}, ("LONGHAUL_MAX_RETRIES",), id="negative env"),
    pytest.param(("enqueue", "x"), {}, ("LONGHAUL_REDIS_URL",), id="enqueue without redis"),
    pytest.param(("worker",), {}, ("LONGHAUL_REDIS_URL",), id="worker without redis"),
    pytest.param(("worker", "--concurrency", "8", "--threads", "2"), {}, ("--concurrency", "--threads"),
                 id="worker concurrency and threads"),
    pytest.param(("worker", "--concurrency", "0"), {}, ("--concurrency",), id="worker concurrency 0"),
    pytest.param(("worker",), {"LONGHAUL_CONCURRENCY": "0"}, ("LONGHAUL_CONCURRENCY",), id="bad concurrency env"),
    pytest.param(("resume",), {}, ("--interrupted",), id="resume without a target"),
    pytest.param(("tasks", "--since", "9999999999999d"), {}, ("--since",), id="duration past any date"),
    pytest.param(("tasks", "--since", "nan"), {}, ("--since",), id="duration not a number"),
    pytest.param(("prune", "--older-than", "inf"), {}, ("--older-than",), id="infinite duration"),
    pytest.param(("tasks", "--limit", "99999999999999999999"), {}, ("--limit",), id="count beyond 64 bits"),
    pytest.param(("tasks", "--offset", str(2**63)), {}, ("--offset",), id="offset beyond 64 bits"),
    pytest.param(("show", "\udcff"), {}, ("TASK_ID", "not UTF-8"), id="task id not UTF-8"),
    pytest.param(("run", "x", "--thread", "a\udcfe"), {}, ("--thread", "not UTF-8"), id="thread id not UTF-8"),
    pytest.param(("tasks",), {"LONGHAUL_LOG_LEVEL": "bogus"}, ("LONGHAUL_LOG_LEVEL",), id="bad log level"),
    pytest.param(("run", "x"), {"LONGHAUL_FAULT_AT": "somewhere"}, ("LONGHAUL_FAULT_AT", "between_tools"),
                 id="unknown fault point"),
])
def test_bad_usage_exits_2_naming_the_problem_and_stores_nothing(longhaul, store, args, env, names):
    result = longhaul(*args, **env)

    assert_clean_error(result, 2, *names)
    assert store.count_tasks() == 0


def test_a_duplicate_task_id_exits_2_and_leaves_the_stored_task_alone(longhaul, store):
    assert longhaul("run", "first", "--task-id", "dup", "--steps", "2").returncode == 0

    result = longhaul("run", "second", "--task-id", "dup", "--steps", "5")

    assert_clean_error(result, 2, "task_id", "'dup'", "rerun")
    record = store.get("dup")
    assert record.status is TaskStatus.COMPLETED
    assert record.checkpoint_count == 2
    assert record.spec is not None and record.spec.prompt == "first"


@pytest.mark.parametrize("command", ["show", "resume", "cancel", "rerun"])
def test_a_command_on_an_unknown_task_exits_1_naming_it(longhaul, command):
    result = longhaul(command, "nope")

    assert_clean_error(result, 1, "'nope'", "not found")


def test_resume_of_a_finished_task_exits_1_and_points_at_rerun(longhaul):
    assert longhaul("run", "done", "--task-id", "done", "--steps", "1").returncode == 0

    result = longhaul("resume", "done")

    assert_clean_error(result, 1, "completed", "longhaul rerun done")


# -- listing and inspecting ---------------------------------------------------------------


@pytest.fixture
def two_tasks(longhaul, make_runtime) -> tuple[str, str]:
    """A completed task (run by the CLI) and a queued one on thread `chat`."""
    assert longhaul("run", "ran", "--task-id", "ran", "--thread", "chat", "--steps", "2").returncode == 0
    rt = make_runtime()
    queued = worker.submit(rt, "waiting", task_id="waiting", thread_id="chat")
    return "ran", queued


def test_tasks_lists_stored_tasks_as_json_with_filters(longhaul, two_tasks):
    ran, queued = two_tasks

    listed = as_json(longhaul("tasks", "--json"))
    assert {row["task_id"]: row["status"] for row in listed} == {ran: "completed", queued: "queued"}
    assert {row["task_id"]: row["checkpoint_count"] for row in listed} == {ran: 2, queued: 0}

    assert [row["task_id"] for row in as_json(longhaul("tasks", "--status", "queued", "--json"))] == [queued]
    assert as_json(longhaul("tasks", "--thread", "elsewhere", "--json")) == []

    table = longhaul("tasks")
    assert table.returncode == 0 and ran in table.stdout and queued in table.stdout


def test_show_prints_the_record_with_its_checkpoints(longhaul, two_tasks):
    ran, _ = two_tasks

    record = as_json(longhaul("show", ran, "--json"))
    assert record["task_id"] == ran and record["status"] == "completed"
    assert [c["step_index"] for c in record["checkpoints"]] == [1, 2]
    assert record["execution_history"][0] == {"role": "user", "content": "ran", "tool_call_id": None,
                                              "name": None, "tool_calls": None}
    assert record["lease"] is None

    text = longhaul("show", ran)
    assert text.returncode == 0
    assert "completed" in text.stdout and "step    2" in text.stdout


def test_cancel_cancels_a_queued_task(longhaul, two_tasks, store):
    _, queued = two_tasks

    result = longhaul("cancel", queued)

    assert result.returncode == 0, result.stderr
    assert f"{queued}: cancelled" in result.stdout
    assert store.summary(queued).status is TaskStatus.CANCELLED


def test_rerun_runs_a_finished_task_again_from_step_one(longhaul, ledger, store):
    assert longhaul("run", "twice", "--task-id", "twice", "--steps", "3", "--ledger", str(ledger)).returncode == 0

    result = longhaul("rerun", "twice", "--json")

    assert result.returncode == 0, result.stderr
    record = as_json(result)
    assert record["status"] == "completed"
    assert [c["step_index"] for c in record["checkpoints"]] == [1, 2, 3]
    assert ledger_counts(ledger) == {f"twice step {i}": 2 for i in (1, 2, 3)}


def test_delete_removes_every_task_of_a_thread(longhaul, two_tasks, store):
    ran, queued = two_tasks

    result = longhaul("delete", "--thread", "chat")

    assert result.returncode == 0, result.stderr
    assert "deleted 2 task(s)" in result.stdout
    assert store.load(ran) is None and store.load(queued) is None
    assert longhaul("show", ran).returncode == 1


# -- interruptions ---------------------------------------------------------------------------


@pytest.fixture
def start_slow_run(start_longhaul: Callable[..., Any], ledger: Path) -> Callable[..., Any]:
    """Start `longhaul run` of a ledger task (0.1 s per step) and return it once `lines` steps are in the ledger."""

    def start(task_id: str, *, steps: int, lines: int) -> Any:
        running = start_longhaul("run", "count slowly", "--task-id", task_id, "--steps", str(steps),
                                 "--step-delay", "0.1", "--ledger", str(ledger))
        wait_until(lambda: ledger_lines(ledger) >= lines or running.proc.poll() is not None, timeout_s=30,
                   what=f"{lines} ledger lines before interrupting the run")
        assert running.proc.poll() is None, running.stderr()
        return running

    return start


@pytest.mark.crash
def test_a_sigkilled_run_resumes_with_resume_interrupted_and_no_completed_step_runs_twice(
    longhaul, start_slow_run, ledger, db_url
):
    steps = 30
    running = start_slow_run("k", steps=steps, lines=5)

    running.proc.send_signal(signal.SIGKILL)
    running.proc.wait()
    with TaskStore(db_url) as store:
        at_kill = store.summary("k")
    assert at_kill.status is TaskStatus.RUNNING and at_kill.lease is not None  # the dead process's lease
    assert 0 < at_kill.checkpoint_count < steps

    result = longhaul("resume", "--interrupted", "--json")

    assert result.returncode == 0, result.stderr
    assert as_json(result)["status"] == "completed"
    with TaskStore(db_url) as store:
        record = store.get("k")
    assert record.status is TaskStatus.COMPLETED
    assert [c.step_index for c in record.checkpoints] == list(range(1, steps + 1))
    counts = ledger_counts(ledger)
    assert all(counts[f"k step {i}"] >= 1 for i in range(1, steps + 1)), counts
    twice = [i for i in range(1, steps + 1) if counts[f"k step {i}"] > 1]
    assert twice in ([], [at_kill.checkpoint_count + 1]), (twice, at_kill.checkpoint_count)
    assert max(counts.values()) <= 2
    assert sum(counts.values()) == len(counts) + len(twice)  # no stray lines


def test_ctrl_c_stops_a_run_after_its_current_step_and_it_resumes_by_id(longhaul, start_slow_run, ledger, db_url):
    steps = 20
    running = start_slow_run("ctrl-c", steps=steps, lines=2)

    running.proc.send_signal(signal.SIGINT)
    exit_code = running.proc.wait(timeout=30)

    assert exit_code == 130, running.stderr()
    assert "resumable" in running.stderr() and "Traceback" not in running.stderr()
    with TaskStore(db_url) as store:
        stopped = store.summary("ctrl-c")
    assert stopped.status is TaskStatus.RUNNING and stopped.lease is None
    assert ledger_counts(ledger) == {f"ctrl-c step {i}": 1 for i in range(1, stopped.checkpoint_count + 1)}

    result = longhaul("resume", "ctrl-c", "--json")

    assert result.returncode == 0, result.stderr
    assert as_json(result)["status"] == "completed"
    assert ledger_counts(ledger) == {f"ctrl-c step {i}": 1 for i in range(1, steps + 1)}


# -- threads: follow, fork, --if-busy ----------------------------------------------------------------------


def test_follow_prints_a_task_s_events_with_cursors_and_continues_after_one(longhaul, ledger):
    assert longhaul("run", "count", "--task-id", "orig", "--steps", "3", "--ledger", str(ledger)).returncode == 0

    whole = longhaul("follow", "orig", "--json")
    assert whole.returncode == 0, whole.stderr
    lines = [json.loads(line) for line in whole.stdout.splitlines()]
    types = [line["event"]["type"] for line in lines]
    assert types[0] == "started" and types[-1] == "done" and types.count("step") == 3
    assert lines[-1]["event"]["status"] == "completed" and all(line["event"]["task_id"] == "orig" for line in lines)
    cursors = [line["cursor"] for line in lines]
    assert len(set(cursors)) == len(cursors)

    after = longhaul("follow", "orig", "--json", "--after", cursors[2])
    assert [json.loads(line) for line in after.stdout.splitlines()] == lines[3:]  # no repeat, no gap

    text = longhaul("follow", "orig").stdout.splitlines()
    assert [line.split("\t")[0] for line in text] == cursors
    assert text[-1].split("\t")[1:3] == ["orig", "done"] and "completed: Done: 3 steps" in text[-1]


def test_fork_runs_from_the_step_after_its_fork_point_and_prints_the_new_task_id(longhaul, ledger, store):
    assert longhaul("run", "count", "--task-id", "orig", "--steps", "3", "--ledger", str(ledger)).returncode == 0

    forked = longhaul("fork", "orig", "--at-step", "2", "--prompt", "once more", "--task-id", "again")

    assert forked.returncode == 0, forked.stderr
    assert forked.stdout.strip() == "again"
    record = store.get("again")
    assert record.status is TaskStatus.COMPLETED and [c.step_index for c in record.checkpoints] == [1, 2, 3]
    assert "once more" in [m.content for m in record.execution_history if m.role == "user"]
    assert ledger_counts(ledger)["again step 3"] == 1 and ledger_counts(ledger)["again step 1"] == 0
    assert len(store.get("orig").checkpoints) == 3  # the original is untouched


def test_if_busy_reject_exits_1_naming_the_unfinished_task_and_stores_nothing(longhaul, store):
    store.create_task(task_id="first", thread_id="chat", channel="api", provider="scripted", model="m",
                      spec=TaskSpec(prompt="hello"))

    refused = longhaul("run", "hello again", "--thread", "chat", "--if-busy", "reject", "--task-id", "second")

    assert_clean_error(refused, 1, "thread 'chat' is busy", "task 'first' is queued", "--if-busy enqueue")
    assert store.load("second") is None and store.count_tasks() == 1


#: Bad input to the thread commands: (arguments, exit code, what the one-line error must name).
BAD_THREAD_COMMANDS = [
    (("follow", "nosuch"), 1, ("nosuch",)),
    (("follow",), 2, ("TASK_ID or --thread",)),
    (("follow", "orig", "--after", "yesterday"), 2, ("--after", "'yesterday'")),
    (("fork", "nosuch", "--at-step", "1"), 1, ("nosuch",)),
    (("fork", "orig", "--at-step", "9"), 2, ("--at-step", "between 1 and 3")),
    (("fork", "orig", "--at-step", "0"), 2, ("--at-step",)),
    (("fork", "orig", "--at-step", "1", "--task-id", "orig"), 2, ("task_id", "'orig' already exists")),
    (("run", "hi", "--thread", "chat", "--if-busy", "later"), 2, ("--if-busy", "'later'")),
]


def test_thread_commands_refuse_bad_input_naming_it_without_a_traceback(longhaul, ledger, store):
    assert longhaul("run", "count", "--task-id", "orig", "--steps", "3", "--ledger", str(ledger)).returncode == 0

    for args, exit_code, names in BAD_THREAD_COMMANDS:  # one stored task for all: each case costs a process
        assert_clean_error(longhaul(*args), exit_code, *names)
    assert store.count_tasks() == 1


@pytest.mark.parametrize("processes, threads, concurrency, expected", [
    (1, None, None, 4), (1, None, 1000, 1000), (3, None, 1000, 334), (2, 7, None, 7),
])
def test_concurrency_is_spread_over_the_processes_and_threads_say_it_per_process(processes, threads, concurrency,
                                                                                 expected):
    from longhaul.worker.settings import threads_per_process

    assert threads_per_process(processes=processes, threads=threads, concurrency=concurrency) == expected
