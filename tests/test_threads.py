"""Chat threads (issue 15): the story, one run at a time, double texting, live output, fork."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import longhaul
from longhaul.models import TaskSpec, TaskStatus, TaskStore
from longhaul.models.tables import SCHEMA_VERSION
from longhaul.worker.live import LiveOutput
from longhaul.worker.testing import ledger_counts, run_released_together, wait_until
from tests import thread_app  # registers the `thread-echo` provider in this process
from tests.thread_app import seen_prompts

APP = {"LONGHAUL_APP": "tests.thread_app"}

pytestmark = pytest.mark.backends("sqlite", "postgres")


def story(thread_id: str) -> list[tuple[str, str]]:
    return [(turn.role, turn.content) for turn in longhaul.thread_turns(thread_id)]


# -- the story (embedded: no Redis) ---------------------------------------------------------


def test_a_thread_s_story_is_each_finished_task_once_in_arrival_order_and_a_rerun_stays_in_place(embedded_runtime):
    store = embedded_runtime.store
    longhaul.run_inline("m0", thread_id="t", task_id="a", provider="thread-echo")
    store.create_task(task_id="b", thread_id="t", channel="api", provider="thread-echo", model="m",
                      spec=longhaul.models.TaskSpec(prompt="m1"))
    store.request_cancel("b")  # cancelled before it ran
    longhaul.run_inline("m2", thread_id="t", task_id="c", provider="thread-echo")
    store.create_task(task_id="d", thread_id="t", channel="api", provider="thread-echo", model="m",
                      spec=longhaul.models.TaskSpec(prompt="m3"))  # queued: contributes nothing yet

    assert story("t") == [
        ("user", "m0"), ("assistant", "answer to 'm0'; seen=[]"),
        ("user", "m1"), ("assistant", "(no answer: this task was cancelled: cancelled before it ran)"),
        ("user", "m2"), ("assistant", "answer to 'm2'; seen=[m0]"),
    ]
    before = story("t")
    longhaul.rerun("a")  # replaces its own turns in place, seeing nothing before it; then the thread is free
    longhaul.wait_for("d")  # so the queued task runs, after everything before it
    assert story("t") == [*before, ("user", "m3"), ("assistant", "answer to 'm3'; seen=[m0|m2]")]


# -- reject is atomic: processes racing on idle threads ----------------------------------------

#: Admits one task per thread with if_busy="reject" from several threads, once `go` exists; prints what happened.
REJECTER = """
import json, sys, threading
from pathlib import Path
from longhaul.models import TaskSpec, TaskStore
from longhaul.worker.testing import wait_for_go

db_url, process, chats, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
outcomes = []
with TaskStore(db_url) as store:
    store.thread_story("warm-up")  # connect before the race
    wait_for_go(go, process)

    def contend(thread_no):
        for chat in range(chats):
            task_id = f"p{process}t{thread_no}c{chat}"
            admission = store.admit_task(task_id=task_id, thread_id=f"chat-{chat}", channel="race",
                                         provider="scripted", model="m", spec=TaskSpec(prompt=task_id),
                                         if_busy="reject")
            outcomes.append([chat, task_id, admission.created, admission.refused_by and admission.refused_by[0]])

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()
print(json.dumps(outcomes))
"""


def test_two_messages_at_the_same_instant_on_an_idle_thread_with_reject_store_exactly_one(db_url, store, tmp_path):
    store.thread_story("created")  # the schema exists before the contenders open the store
    chats = 15
    outputs = run_released_together([[REJECTER, db_url, str(p), str(chats), str(tmp_path / "go")] for p in range(3)],
                                    workdir=tmp_path, timeout_s=120)
    outcomes = [row for out in outputs for row in json.loads(out)]

    assert len(outcomes) == 3 * 2 * chats
    for chat in range(chats):
        rows = [row for row in outcomes if row[0] == chat]
        stored = [task_id for _, task_id, created, _ in rows if created]
        assert len(stored) == 1, (chat, rows)  # one passed; every other was refused, naming it
        assert all(refused_by == stored[0] for _, _, created, refused_by in rows if not created), rows
        assert [t.task_id for t in store.list_tasks(thread_id=f"chat-{chat}")] == stored


# -- schema step 6 (threads) on an older store -----------------------------------------------


def test_opening_a_schema_5_store_adds_the_thread_index_and_the_cancel_reason(db_url, store):
    store.create_task(task_id="kept", thread_id="t", channel="api", provider="scripted", model="m",
                      spec=TaskSpec(prompt="hello"))
    with store.db.atomic():
        store.db.execute_sql('DROP INDEX "task_thread_id_status_id"')
        store.db.execute_sql('ALTER TABLE "task" DROP COLUMN "cancel_reason"')
        store.db.execute_sql('UPDATE "schema_version" SET "version" = 5')
    store.close_all()

    with TaskStore(db_url) as upgraded:
        assert upgraded.schema_version() == SCHEMA_VERSION
        assert "cancel_reason" in {c.name for c in upgraded.db.get_columns("task")}
        assert "task_thread_id_status_id" in {i.name for i in upgraded.db.get_indexes("task")}
        assert upgraded.request_cancel("kept", reason="interrupted by task 'x'") is TaskStatus.CANCELLED
        assert upgraded.get("kept").last_error == "interrupted by task 'x' before it ran"


# -- fork (embedded) ------------------------------------------------------------------------


def test_a_fork_runs_from_the_step_after_its_fork_point_with_the_new_prompt_and_leaves_the_original(
        embedded_runtime, tmp_path: Path):
    ledger = tmp_path / "ledger.txt"
    original = longhaul.run_inline("count", task_id="orig", steps=3, ledger_path=str(ledger))
    assert original.status is TaskStatus.COMPLETED

    fork_id = longhaul.fork("orig", at_step=2, prompt="now differently", new_task_id="forked")
    forked = longhaul.wait_for(fork_id)

    assert forked.status is TaskStatus.COMPLETED
    record = embedded_runtime.store.get("forked")
    assert [c.step_index for c in record.checkpoints] == [1, 2, 3]
    pairs = [(m.role, m.content) for m in record.execution_history]
    at = pairs.index(("user", "now differently"))  # right after step 2's tool result
    assert pairs[:at] == [(m.role, m.content) for m in original.execution_history[:at]]
    assert original.execution_history[at - 1].role == "tool" and "step 3" in pairs[at + 1][1]
    assert ledger_counts(ledger)["forked step 3"] == 1 and ledger_counts(ledger)["forked step 1"] == 0
    assert embedded_runtime.store.get("orig").execution_history == original.execution_history
    assert record.thread_id == "forked"
    with pytest.raises(longhaul.StepNotForkable, match="at_step.*between 1 and 3"):
        longhaul.fork("orig", at_step=9)


# -- live output: `done` only once the end is committed ---------------------------------------------


class CommittedBeforeDone(LiveOutput):
    """Real live output on Redis that also notes, as each `done` is published, what the store says of the task."""

    def __init__(self, redis_url: str, store: TaskStore) -> None:
        super().__init__(redis_url, retention_s=60, max_events=1000)
        self.store = store
        self.status_at_done: list[TaskStatus] = []

    def _publish(self, task_id: str, keys: tuple[str, ...], event: dict) -> None:
        if event["type"] == "done":
            self.status_at_done.append(self.store.summary(task_id).status)
        super()._publish(task_id, keys, event)


@pytest.mark.redis
def test_done_is_published_only_after_the_final_status_is_committed(embedded_runtime, redis_server):
    live = CommittedBeforeDone(redis_server.url, TaskStore(embedded_runtime.settings.database_url))
    embedded_runtime.live = live
    try:
        longhaul.run_inline("hello", task_id="answered", provider="thread-echo")
        assert live.status_at_done == [TaskStatus.COMPLETED]  # the store had the end when `done` went out
        followed = [event for _, event in longhaul.follow("answered")]  # the embedded run left it on Redis
        assert followed[-1]["type"] == "done" and followed[-1]["answer"] == embedded_runtime.store.get(
            "answered").final_response
    finally:
        live.store.close_all()
        live.close()


class DiesBeforeDone(LiveOutput):
    """Real live output that never publishes `done`: a worker that died between the commit and the publish."""

    def _publish(self, task_id: str, keys: tuple[str, ...], event: dict) -> None:
        if event["type"] != "done":
            super()._publish(task_id, keys, event)


@pytest.mark.redis
def test_a_follower_of_a_task_that_ended_without_publishing_done_ends_with_a_done_built_from_the_store(
        embedded_runtime, redis_server):
    live = DiesBeforeDone(redis_server.url, retention_s=60, max_events=1000)
    embedded_runtime.live = live
    try:
        longhaul.run_inline("hello", task_id="silent", provider="thread-echo")
        followed = list(longhaul.follow("silent"))  # would hang without the store check
        published = [e for _, e in followed if not e.get("from_store")]
        assert all(e["type"] != "done" for e in published) and published
        cursor, done = followed[-1]
        assert done["type"] == "done" and done["from_store"] and done["status"] == "completed"
        assert done["answer"] == embedded_runtime.store.get("silent").final_response
        assert cursor == followed[-2][0]  # the last real cursor: reconnecting from it misses nothing
    finally:
        live.close()


# -- real Redis, several worker processes --------------------------------------------------------


@pytest.mark.redis
def test_bursts_on_a_thread_run_one_at_a_time_in_order_each_seeing_every_earlier_answer(
        client_runtime, start_worker, tmp_path: Path, backend: str):
    store, ledger = client_runtime.store, tmp_path / "ledger.txt"
    start_worker(processes=2, threads=4, **APP)
    threads = {f"chat-{n}": [f"c{n}m{i}" for i in range(4)] for n in range(3)}
    sent = {thread: [longhaul.enqueue(prompt, thread_id=thread, task_id=f"{thread}-{i}", provider="thread-echo",
                                    tool_steps=1, ledger_path=str(ledger), step_delay_s=0.2)
                     for i, prompt in enumerate(prompts)]
            for thread, prompts in threads.items()}
    every = [task for tasks in sent.values() for task in tasks]
    wait_until(lambda: all(store.summary(t).status.is_terminal for t in every), timeout_s=60, what="every task")

    for thread, tasks in sent.items():
        records = [store.get(t) for t in tasks]
        for i, record in enumerate(records):
            assert record.status is TaskStatus.COMPLETED, (record.task_id, record.last_error)
            # it saw every earlier answer: it opened its history (its first act) after the one before it ended
            assert seen_prompts(record.final_response) == threads[thread][:i]
            if i and backend == "sqlite":  # one clock; on PostgreSQL each process's offset is measured (± RTT/2)
                assert record.started_at >= records[i - 1].completed_at
        lines = [line for line in ledger.read_text().splitlines() if line.startswith(f"{thread}-")]
        assert lines == [f"{task} step 1" for task in tasks]  # their tools ran in arrival order, once each
        assert [turn for role, turn in story(thread) if role == "user"] == threads[thread]


@pytest.mark.redis
def test_if_busy_reject_names_the_running_task_and_interrupt_stops_it_at_a_step_boundary(
        client_runtime, start_worker, tmp_path: Path):
    store, ledger = client_runtime.store, tmp_path / "ledger.txt"
    start_worker(processes=2, threads=2, **APP)
    long = longhaul.enqueue("long", thread_id="chat", task_id="long", provider="thread-echo", tool_steps=50,
                          ledger_path=str(ledger), step_delay_s=0.1)
    wait_until(lambda: store.summary(long).checkpoint_count >= 2, timeout_s=30, what="two steps of the long task")

    with pytest.raises(longhaul.ThreadBusy, match="'long' is running"):
        longhaul.enqueue("rejected", thread_id="chat", if_busy="reject", provider="thread-echo")
    assert store.count_tasks() == 1  # nothing stored

    newer = longhaul.enqueue("newer", thread_id="chat", task_id="newer", if_busy="interrupt", provider="thread-echo")
    wait_until(lambda: store.summary(newer).status.is_terminal, timeout_s=30, what="the newer task")

    interrupted, answered = store.get(long), store.get(newer)
    assert interrupted.status is TaskStatus.CANCELLED and 2 <= interrupted.checkpoint_count < 50
    assert answered.status is TaskStatus.COMPLETED and answered.started_at >= interrupted.completed_at
    steps = interrupted.checkpoint_count
    assert interrupted.last_error == f"interrupted by task 'newer' after step {steps}"
    (user, prompt), (assistant, kept), *rest = story("chat")
    assert (user, prompt) == ("user", "long")
    # its work is kept in the thread: every step it took, then how it ended, naming the newer task
    assert kept.endswith(f"(no answer: this task was cancelled: interrupted by task 'newer' after step {steps})")
    assert all(f"step {n}: " in kept and f"'long step {n}'" in kept for n in range(1, steps + 1))
    assert f"step {steps + 1}:" not in kept
    assert rest == [("user", "newer"), ("assistant", "answer to 'newer'; seen=[]")]
    assert any(m.content == kept for m in answered.execution_history)  # the newer task started from that work


@pytest.mark.redis
@pytest.mark.crash
@pytest.mark.sqlite_only("live output lives on Redis; the store's part of a resume is proven on both backends "
                         "elsewhere")
def test_a_follower_reconnecting_across_a_worker_sigkill_sees_every_event_exactly_once(
        client_runtime, start_worker):
    store = client_runtime.store
    first = start_worker(processes=1, threads=2, **APP)
    task_id = longhaul.enqueue("tell me a long story", thread_id="bot", task_id="streamed", provider="thread-echo",
                             chunks=40, chunk_delay_s=0.05)
    seen = []
    for cursor, event in longhaul.follow(task_id):
        seen.append((cursor, event))
        if sum(e["type"] == "chunk" for _, e in seen) >= 8:
            break  # the follower disconnects mid-answer
    first.kill()
    start_worker(processes=1, threads=2, **APP)
    seen.extend(longhaul.follow(task_id, after=seen[-1][0]))  # reconnects from its last cursor

    everything = list(longhaul.follow(task_id))  # the whole stream, from the start
    assert seen == everything  # exactly once: no duplicate, no gap
    types = [e["type"] for _, e in seen]
    assert types[0] == "started" and types[-1] == "done" and "resumed" in types
    restart = len(types) - 1 - types[::-1].index("resumed")
    final = wait_until(lambda: store.get(task_id).final_response, timeout_s=10, what="the stored answer")
    assert "".join(e["text"] for _, e in seen[restart:] if e["type"] == "chunk") == final
    assert seen[-1][1]["answer"] == final
    assert thread_app.seen_prompts(final) == []
