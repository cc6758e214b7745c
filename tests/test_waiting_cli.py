"""`longhaul reply/approve/deny` given bad input (one line naming what is wrong, exit 1 or 2); who gets `ask_user`."""

from __future__ import annotations

import pytest

import longhaul
from longhaul.models import TaskStatus
from tests import thread_app  # noqa: F401  (registers `thread-echo` and the `deploy` tool in this process)


@pytest.fixture
def waits(make_runtime):
    """A store holding a task waiting for a reply (thread 'chat'), one waiting for an approval, one completed."""
    rt = make_runtime()
    longhaul.run_inline("plan", thread_id="chat", task_id="asker", provider="thread-echo", ask="which city?",
                        tools=["ask_user"])
    longhaul.run_inline("ship", thread_id="ship", task_id="shipper", provider="thread-echo", deploy=True)
    longhaul.run_inline("hello", thread_id="done", task_id="finished", provider="thread-echo")
    assert [rt.store.summary(t).status for t in ("asker", "shipper", "finished")] == [
        TaskStatus.WAITING, TaskStatus.WAITING, TaskStatus.COMPLETED]
    return rt.store


#: (arguments, exit code, stderr): 1 a missing object or one in the wrong state, 2 bad usage.
BAD_INPUT = [
    (("reply", "nothread", "hi"), 1, "error: thread 'nothread': no task of it waits for a reply"),
    (("reply", "chat", "  "), 2, "error: text: the reply must be non-empty text"),
    (("reply", "ship", "yes"), 1, "error: task 'shipper': it waits for an approval, not for reply"),
    (("approve", "nosuch"), 1, "error: task 'nosuch' not found"),
    (("approve", "asker"), 1, "error: task 'asker': it waits for a reply, not for approval"),
    (("approve", "finished"), 1, "error: task 'finished': it is completed, not waiting for approval"),
    (("deny", "nosuch"), 1, "error: task 'nosuch' not found"),
    (("deny", "asker", "--reason", "no"), 1, "error: task 'asker': it waits for a reply, not for approval"),
    (("deny", "shipper", "--reason", ""), 2, "error: reason: give a non-empty reason, or none"),
    (("reply", "chat"), 2, "Missing argument 'TEXT'"),
]


def test_bad_input_to_reply_approve_deny_is_one_line_and_changes_nothing(waits, longhaul):
    for args, code, message in BAD_INPUT:
        result = longhaul(*args)
        assert (result.returncode, message in result.stderr) == (code, True), (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("error")]) <= 1
    assert [waits.summary(t).status for t in ("asker", "shipper")] == [TaskStatus.WAITING] * 2
    assert waits.wait_of("shipper").decision is None


def test_ask_user_is_offered_only_to_a_task_that_names_it(make_runtime):
    make_runtime()
    batch = longhaul.run_inline("summarise", task_id="batch", provider="thread-echo", ask="which file?")
    assert batch.status is TaskStatus.COMPLETED  # no user to answer: the call is refused and the task goes on
    assert batch.final_response.startswith("got: ") and "not allowed" in batch.final_response
    chat = longhaul.run_inline("summarise", task_id="chat", provider="thread-echo", ask="which file?",
                               tools=["ask_user"])
    assert chat.status is TaskStatus.WAITING
