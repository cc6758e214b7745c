"""Greenlet worker processes: the patch, httpcore's idle-connection check, blocking tools off the hub,
and how many processes a host's --concurrency gets.

The patch is process-wide and irreversible, so each patched case runs in a
fresh interpreter (`run_patched`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from longhaul.worker import SettingsError, load_settings
from longhaul.worker.greenlets import active
from longhaul.worker.settings import TASKS_PER_PROCESS, processes_for, usable_cpus
from longhaul.worker.supervisor import WORKER_MODULES, Supervisor

PATCH = "from longhaul.worker.greenlets import patch_process\npatch_process()\n"


def run_patched(code: str, *, patched: bool = True) -> dict:
    """Run `code` in a fresh interpreter (patched for greenlets first, or not); the JSON it printed last."""
    source = (PATCH if patched else "") + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


BLOCKING_TOOL = """
    import json, threading, time
    from gevent import monkey
    from pydantic import BaseModel
    from longhaul.models import ToolCall
    from longhaul.worker.greenlets import active
    from longhaul.worker.tools import Tool, ToolContext, run_tool_call

    native_sleep = monkey.get_original("time", "sleep") if active() else time.sleep
    ticks = []

    def ticker():
        for _ in range(10):
            ticks.append(time.monotonic())
            time.sleep(0.02)

    class NoArguments(BaseModel):
        pass

    def stall(args, ctx):
        native_sleep(0.5)  # blocks in C without the hub, like a heavy computation would
        return json.dumps({{"ticks_meanwhile": len(ticks), "native_thread": threading.get_native_id()}})

    tool = Tool(name="stall", description="Stall.", arguments=NoArguments, run=stall, blocking={blocking})
    other = threading.Thread(target=ticker)
    other.start()
    time.sleep(0)  # let the ticker start
    result = run_tool_call(ToolCall(id="c", name="stall", arguments={{}}), ToolContext("t", 1, 0), {{"stall": tool}})
    other.join()
    print(json.dumps({{**json.loads(result.output), "caller_thread": threading.get_native_id()}}))
"""


def test_a_blocking_tool_runs_on_a_native_thread_and_the_process_s_other_greenlets_go_on():
    seen = run_patched(BLOCKING_TOOL.format(blocking=True))

    assert seen["native_thread"] != seen["caller_thread"]
    assert seen["ticks_meanwhile"] == 10  # the ticker greenlet ran to its end while the tool stalled


def test_a_tool_not_marked_blocking_runs_on_the_hub_and_stalls_it_while_it_blocks_in_c():
    seen = run_patched(BLOCKING_TOOL.format(blocking=True).replace("blocking=True", "blocking=False"))

    assert seen["native_thread"] == seen["caller_thread"]
    assert seen["ticks_meanwhile"] <= 1  # what `blocking=True` is for


def test_without_the_patch_a_blocking_tool_runs_in_the_calling_thread():
    seen = run_patched(BLOCKING_TOOL.format(blocking=True), patched=False)

    assert seen["native_thread"] == seen["caller_thread"]
    assert not active()


def test_httpcore_s_idle_connection_check_uses_the_native_poll_and_still_sees_a_dropped_peer():
    seen = run_patched("""
        import json, socket
        import httpcore._backends.sync as sync_backend
        from gevent import select as gevent_select
        calls = []
        original_poll = gevent_select.poll
        gevent_select.poll = lambda *a: calls.append(1) or original_poll(*a)  # counts patched polls, if any
        ours, theirs = socket.socketpair()
        idle = sync_backend.is_socket_readable(ours)
        theirs.close()
        dropped = sync_backend.is_socket_readable(ours)
        print(json.dumps({"idle": idle, "dropped": dropped, "patched_polls": len(calls),
                          "gone": sync_backend.is_socket_readable(None)}))
    """)

    assert seen == {"idle": False, "dropped": True, "patched_polls": 0, "gone": True}


def test_the_patch_makes_the_standard_library_cooperative():
    seen = run_patched("""
        import json, threading, time
        from longhaul.worker.greenlets import active
        started = time.monotonic()
        sleepers = [threading.Thread(target=time.sleep, args=(0.3,)) for _ in range(200)]
        for s in sleepers: s.start()
        for s in sleepers: s.join()
        import psutil
        print(json.dumps({"active": active(), "wall_s": time.monotonic() - started,
                          "os_threads": psutil.Process().num_threads()}))
    """)

    assert seen["active"] is True
    assert seen["wall_s"] < 5  # 200 sleeps overlapped on one OS thread
    assert seen["os_threads"] < 10


@pytest.mark.parametrize(("concurrency", "cpus", "processes"), [
    (None, 8, 1),  # 4 threads in one process, as before
    (1, 8, 1),
    (TASKS_PER_PROCESS, 8, 1),
    (TASKS_PER_PROCESS + 1, 8, 2),
    (1000, 2, 2),
    (5000, 4, 4),  # at most one per core
    (5000, 1, 1),
])
def test_a_host_s_concurrency_is_spread_over_one_process_per_500_tasks_at_most_one_per_core(
        concurrency, cpus, processes):
    assert processes_for(concurrency, cpus=cpus) == processes


def test_the_supervisor_starts_the_module_of_its_worker_pool():
    assert Supervisor(processes=1, threads=1).module == WORKER_MODULES["greenlets"] == \
        "longhaul.worker.greenlet_process"
    assert Supervisor(processes=1, threads=1, pool="threads").module == "longhaul.worker.worker_process"
    with pytest.raises(ValueError, match="pool: one of greenlets, threads, got 'fibers'"):
        Supervisor(processes=1, threads=1, pool="fibers")


def test_a_worker_pool_that_is_neither_is_refused_naming_the_setting():
    with pytest.raises(SettingsError, match=r"LONGHAUL_WORKER_POOL: Input should be 'greenlets' or 'threads' "
                                            r"\(got 'fibers'\)"):
        load_settings(worker_pool="fibers")
    assert load_settings().worker_pool == "greenlets"


def test_a_blocking_tool_s_error_is_its_failed_result_and_nothing_reaches_stderr():
    source = PATCH + textwrap.dedent("""
        import json
        from pydantic import BaseModel
        from longhaul.models import ToolCall
        from longhaul.worker.errors import ToolError
        from longhaul.worker.tools import Tool, ToolContext, run_tool_call

        class NoArguments(BaseModel):
            pass

        def refuse(args, ctx):
            raise ToolError("no such record")

        def leave(args, ctx):
            raise SystemExit(3)  # argparse in a tool, say: the caller's to handle, not the process's end

        tools = {"refuse": Tool(name="refuse", description="Refuse.", arguments=NoArguments, run=refuse,
                                blocking=True),
                 "leave": Tool(name="leave", description="Leave.", arguments=NoArguments, run=leave, blocking=True)}
        refused = run_tool_call(ToolCall(id="c", name="refuse", arguments={}), ToolContext("t", 1, 0), tools)
        try:
            run_tool_call(ToolCall(id="d", name="leave", arguments={}), ToolContext("t", 1, 1), tools)
            left = "returned"
        except SystemExit as exc:
            left = f"SystemExit({exc.code}) in the caller"
        print(json.dumps({"success": refused.success, "output": refused.output, "left": left}))
    """)
    done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "success": False, "output": "refuse failed: no such record", "left": "SystemExit(3) in the caller"}
    assert done.stderr == ""


def test_a_greenlet_process_waiting_for_another_writer_of_its_sqlite_file_keeps_its_other_tasks_going(tmp_path):
    # SQLite's busy handler sleeps in C: without the cooperative BEGIN, every greenlet of the process froze
    # until the other writer let go (reads, lease renewals and model calls of a thousand tasks).
    seen = run_patched(f"""
        import json, sqlite3, threading, time
        from gevent import monkey
        from longhaul.models import TaskSpec, TaskStore
        from longhaul.worker.greenlets import off_hub

        path = {str(tmp_path / "tasks.db")!r}
        store = TaskStore("sqlite:///" + path)
        store.count_tasks()  # the schema is made
        native_sleep = monkey.get_original("time", "sleep")
        holding = []

        def other_writer():  # another connection, as another process would be, on a native thread
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("BEGIN IMMEDIATE")
            holding.append(True)
            native_sleep(1.0)
            conn.execute("COMMIT")
            conn.close()

        holder = threading.Thread(target=off_hub, args=(other_writer,))
        holder.start()
        deadline = time.monotonic() + 10
        while not holding and time.monotonic() < deadline:
            time.sleep(0.005)
        ticks = []

        def ticker():
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                ticks.append(time.monotonic())
                time.sleep(0.02)

        other = threading.Thread(target=ticker)
        other.start()
        started = time.monotonic()
        store.create_task(task_id="x", thread_id="t", channel="c", provider="p", model="m",
                          spec=TaskSpec(prompt="go"))
        waited = time.monotonic() - started
        other.join()
        holder.join()
        print(json.dumps({{"held_first": bool(holding), "waited_s": waited, "stored": store.count_tasks(),
                           "ticks_during": sum(1 for t in ticks if started <= t <= started + waited)}}))
    """)

    assert seen["held_first"] and seen["stored"] == 1
    assert seen["waited_s"] >= 0.5  # it did wait for the other writer
    assert seen["ticks_during"] >= 0.5 * seen["waited_s"] / 0.02  # and the ticker went on meanwhile


def test_the_cpus_a_host_counts_are_those_its_affinity_allows(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # a container pinned to one CPU of many
    assert usable_cpus() == 1
    assert processes_for(5000) == 1


HUB_WAIT = """
    import json, select, socket, threading, time
    from psycopg import errors
    from psycopg.waiting import Ready, Wait
    from longhaul.models.pg_waits import hub_wait
    wait_on_hub = hub_wait()

    def waits(*answers_wanted):
        # psycopg's generator shape: yield what it waits for, receive what is ready; returns what it saw.
        seen = []
        for wanted in answers_wanted:
            seen.append(int((yield wanted)))
        return seen
"""


def test_a_hub_wait_answers_what_the_socket_is_ready_for_and_the_other_greenlets_go_on():
    seen = run_patched(HUB_WAIT + """
    ours, theirs = socket.socketpair()
    writable = wait_on_hub(waits(Wait.W), ours.fileno())
    ticks = []

    def ticker():
        for _ in range(10):
            ticks.append(time.monotonic())
            time.sleep(0.02)

    def answer_later():
        time.sleep(0.3)
        theirs.send(b"x")

    for work in (ticker, answer_later):
        threading.Thread(target=work).start()
    started = time.monotonic()
    readable = wait_on_hub(waits(Wait.R), ours.fileno(), interval=10.0)
    waited = time.monotonic() - started
    print(json.dumps({"writable": writable, "readable": readable, "waited_s": waited,
                      "ticks_meanwhile": sum(1 for t in ticks if t <= started + waited)}))
    """)

    assert seen["writable"] == [2] and seen["readable"] == [1]  # Ready.W, then Ready.R
    assert seen["waited_s"] >= 0.25
    assert seen["ticks_meanwhile"] >= 8  # the wait was the hub's, not a blocking call


def test_a_hub_wait_tells_the_generator_each_quiet_interval_and_raises_psycopg_s_timeout():
    seen = run_patched(HUB_WAIT + """
    ours, theirs = socket.socketpair()
    quiet = wait_on_hub(waits(Wait.R, Wait.R), ours.fileno(), interval=0.05)  # nothing ever arrives
    started = time.monotonic()
    try:
        wait_on_hub(waits(*[Wait.R] * 100), ours.fileno(), interval=0.05, timeout=0.2)
        timed_out = None
    except errors._WaitTimeout:
        timed_out = time.monotonic() - started
    print(json.dumps({"quiet": quiet, "timed_out_after_s": timed_out}))
    """)

    assert seen["quiet"] == [0, 0]  # Ready.NONE after each interval, as psycopg's notifies() expects
    assert seen["timed_out_after_s"] is not None and 0.15 <= seen["timed_out_after_s"] < 2


@pytest.mark.backends("postgres")
def test_a_greenlet_process_s_postgresql_store_waits_on_the_hub_not_the_patched_poll(db_url):
    code = f"""
        import json, select, threading, time
        import psycopg.waiting
        from longhaul.models import TaskSpec, TaskStore

        polls = []
        patched_poll = select.poll
        select.poll = lambda *a: polls.append(1) or patched_poll(*a)  # psycopg's wait_poll makes one per wait
        store = TaskStore({db_url!r})
        store.create_task(task_id="x", thread_id="t", channel="c", provider="p", model="m",
                          spec=TaskSpec(prompt="go"))
        ticks = []

        def ticker():
            for _ in range(20):
                ticks.append(time.monotonic())
                time.sleep(0.02)

        other = threading.Thread(target=ticker)
        other.start()
        started = time.monotonic()
        store.db.execute_sql("SELECT pg_sleep(0.4)")
        waited = time.monotonic() - started
        other.join()
        print(json.dumps({{"wait": psycopg.waiting.wait.__name__, "stored": store.count_tasks(),
                           "polls": len(polls), "ticks_meanwhile": sum(1 for t in ticks if t <= started + waited)}}))
    """
    seen = run_patched(code)
    plain = run_patched(code, patched=False)

    assert seen["wait"] == "wait_on_hub" and seen["stored"] == 1
    assert seen["polls"] == 0
    assert seen["ticks_meanwhile"] >= 15  # pg_sleep waited on the hub: the ticker went on
    assert plain["wait"] != "wait_on_hub" and plain["stored"] == 1  # a process without gevent keeps psycopg's
