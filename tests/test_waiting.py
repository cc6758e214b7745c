"""Waiting for the user (issue 15 point 4) and if_busy="steer", on real Redis with several worker processes."""

from __future__ import annotations

import pytest

import longhaul
from longhaul.models import TaskStatus
from longhaul.models.threads import STEERED_NOTE
from longhaul.worker.testing import wait_until
from tests import thread_app  # noqa: F401  (registers `thread-echo` and the `deploy` tool in this process)

APP = {"LONGHAUL_APP": "tests.thread_app"}
#: `ask_user` is offered only to a task that names it.
ASKS = ["ask_user"]

pytestmark = [pytest.mark.redis, pytest.mark.backends("sqlite", "postgres")]


def waiting(store, task_id: str) -> bool:
    return store.summary(task_id).status is TaskStatus.WAITING


@pytest.mark.crash
def test_a_task_waiting_for_a_reply_survives_a_worker_sigkill_and_resumes_with_the_reply(
        client_runtime, start_worker):
    store = client_runtime.store
    first = start_worker(processes=2, threads=2, **APP)
    task_id = longhaul.enqueue("plan my trip", thread_id="chat", task_id="asker", provider="thread-echo",
                               ask="which city?", tools=ASKS)
    wait_until(lambda: waiting(store, task_id), timeout_s=30, what="the task to wait for a reply")
    record = store.get(task_id)
    assert record.lease is None or record.lease.token is None  # no lease held while waiting
    assert [t.task_id for t in store.list_tasks(status="waiting")] == [task_id]
    assert store.wait_of(task_id).question == "which city?"
    first.kill()  # SIGKILL every worker process: the wait is in the store, not in a worker
    start_worker(processes=2, threads=2, **APP)
    later = longhaul.enqueue("later message", thread_id="other", provider="thread-echo")  # workers are serving
    wait_until(lambda: store.summary(later).status.is_terminal, timeout_s=30, what="another task")
    assert waiting(store, task_id)  # recovery did not resend it

    assert longhaul.reply("chat", "Lisbon") == task_id
    wait_until(lambda: store.summary(task_id).status.is_terminal, timeout_s=30, what="the resumed task")
    done = store.get(task_id)
    assert done.status is TaskStatus.COMPLETED and done.final_response == "got: Lisbon"
    assert [m.content for m in done.execution_history if m.role == "tool"] == ["Lisbon"]  # the call's result
    with pytest.raises(longhaul.NotWaiting, match="no task of it waits"):
        longhaul.reply("chat", "again")


def test_a_message_to_a_thread_that_waits_is_the_reply_and_the_thread_runs_one_at_a_time(
        client_runtime, start_worker):
    store = client_runtime.store
    start_worker(processes=2, threads=2, **APP)
    asker = longhaul.enqueue("book a table", thread_id="chat", task_id="asker", provider="thread-echo",
                             ask="for how many?", tools=ASKS)
    wait_until(lambda: waiting(store, asker), timeout_s=30, what="the wait")
    assert longhaul.enqueue("four", thread_id="chat", provider="thread-echo") == asker  # no new task
    assert store.count_tasks() == 1
    wait_until(lambda: store.summary(asker).status.is_terminal, timeout_s=30, what="the resumed task")
    assert store.get(asker).final_response == "got: four"
    after = longhaul.enqueue("thanks", thread_id="chat", task_id="after", provider="thread-echo")
    wait_until(lambda: store.summary(after).status.is_terminal, timeout_s=30, what="the next task")
    assert [(t.role, t.content) for t in longhaul.thread_turns("chat")] == [
        ("user", "book a table"), ("assistant", "got: four"),
        ("user", "thanks"), ("assistant", "answer to 'thanks'; seen=[]"),
    ]


def test_approve_runs_the_tool_and_deny_gives_the_model_the_reason(client_runtime, start_worker):
    store = client_runtime.store
    start_worker(processes=2, threads=2, **APP)
    approved = longhaul.enqueue("ship it", thread_id="a", task_id="approved", provider="thread-echo", deploy=True)
    denied = longhaul.enqueue("ship it", thread_id="d", task_id="denied", provider="thread-echo", deploy=True)
    wait_until(lambda: waiting(store, approved) and waiting(store, denied), timeout_s=30, what="both waits")
    assert store.wait_of(approved).kind == "approval"
    queued = longhaul.enqueue("meanwhile", thread_id="a", task_id="behind", provider="thread-echo")
    with pytest.raises(longhaul.NotWaiting, match="waits for an approval, not for reply"):
        longhaul.reply("a", "yes")  # an approval wait takes approve/deny, not a reply
    longhaul.approve(approved)
    longhaul.deny(denied, reason="not on a Friday")
    wait_until(lambda: all(store.summary(t).status.is_terminal for t in (approved, denied, queued)),
               timeout_s=30, what="every task")
    assert store.get(approved).final_response == "got: deployed to prod"
    assert store.get(denied).final_response == (
        "got: [denied: the user did not approve this call to deploy: not on a Friday]")
    assert store.get(queued).started_at >= store.get(approved).completed_at  # the wait blocked its thread
    with pytest.raises(longhaul.NotWaiting):
        longhaul.approve(approved)


def test_a_reply_timeout_ends_the_waiting_task_timed_out_and_frees_its_thread(client_runtime, start_worker):
    store = client_runtime.store
    start_worker(processes=2, threads=2, **APP)
    asker = longhaul.enqueue("hello", thread_id="chat", task_id="asker", provider="thread-echo", ask="name?",
                             reply_timeout_s=1, tools=ASKS)
    behind = longhaul.enqueue("next", thread_id="chat", task_id="behind", provider="thread-echo",
                              if_busy="enqueue")
    wait_until(lambda: store.summary(behind).status.is_terminal, timeout_s=30, what="the task behind it")
    ended = store.get(asker)
    assert ended.status is TaskStatus.TIMED_OUT and ended.last_error == "no reply within 1 s"
    assert [m.content for m in ended.execution_history if m.role == "tool"] == [
        "[no result: this tool call did not complete: no reply within 1 s]"]
    assert store.get(behind).status is TaskStatus.COMPLETED


def test_cancel_ends_a_waiting_task_at_once(client_runtime, start_worker):
    store = client_runtime.store
    start_worker(processes=1, threads=2, **APP)
    asker = longhaul.enqueue("hello", thread_id="chat", task_id="asker", provider="thread-echo", ask="name?",
                             tools=ASKS)
    wait_until(lambda: waiting(store, asker), timeout_s=30, what="the wait")
    assert longhaul.cancel(asker) is TaskStatus.CANCELLED


def test_steer_adds_the_message_to_the_running_task_before_its_next_model_call(client_runtime, start_worker):
    store = client_runtime.store
    start_worker(processes=2, threads=2, **APP)
    running = longhaul.enqueue("first", thread_id="chat", task_id="running", provider="thread-echo",
                               tool_steps=3, think_s=0.3)
    wait_until(lambda: store.summary(running).status is TaskStatus.RUNNING, timeout_s=30, what="it to run")
    assert longhaul.enqueue("actually, second", thread_id="chat", if_busy="steer",
                            provider="thread-echo") == running
    assert store.count_tasks() == 1  # no new task
    wait_until(lambda: store.summary(running).status.is_terminal, timeout_s=30, what="the task")
    done = store.get(running)
    assert done.status is TaskStatus.COMPLETED
    assert done.final_response == "answer to 'actually, second'; seen=[]"  # the model saw it as the last user turn
    users = [m.content for m in done.execution_history if m.role == "user"]
    assert users == ["first", "actually, second"]
    assert [(t.role, t.content) for t in longhaul.thread_turns("chat")] == [  # the steer is in the story, in order
        ("user", "first"), ("assistant", STEERED_NOTE), ("user", "actually, second"),
        ("assistant", done.final_response)]
