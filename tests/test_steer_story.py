"""Steering (``if_busy="steer"``) in the thread's story, and a steer that came after the task's last step boundary."""

from __future__ import annotations

from longhaul.models import ChatMessage, TaskSpec, TaskStatus
from longhaul.models.threads import STEERED_NOTE


def admit(rt, task_id: str, prompt: str, if_busy: str = "enqueue"):
    return rt.store.admit_task(task_id=task_id, thread_id="chat", channel="api", provider="scripted", model="m",
                               spec=TaskSpec(prompt=prompt, options={"steps": 1}), if_busy=if_busy)


def test_a_steered_task_tells_its_story_in_order_and_a_steer_after_its_last_boundary_becomes_the_next_task(
        make_runtime):
    rt = make_runtime()
    admit(rt, "first", "book a table")
    claim = rt.leases.claim("first", rt.claimant, lease_s=30)
    assert claim is not None and rt.store.summary("first").status is TaskStatus.RUNNING
    assert admit(rt, "unused-1", "for four, please", if_busy="steer").steered == "first"
    assert [m.content for m in rt.store.take_steering("first", lease_token=claim.token)] == ["for four, please"]
    assert admit(rt, "unused-2", "and a high chair", if_busy="steer").steered == "first"  # never taken: too late

    rt.store.finish("first", TaskStatus.COMPLETED, final_response="booked for four",
                    new_messages=[ChatMessage.assistant("booked for four")], lease_token=claim.token)

    assert [(m.role, m.content) for m in rt.store.thread_story("chat").turns] == [
        ("user", "book a table"), ("assistant", STEERED_NOTE), ("user", "for four, please"),
        ("assistant", "booked for four"),
    ]
    (late, status), = rt.store.thread_busy("chat")  # the late steer is not lost: it is the thread's next task
    assert status is TaskStatus.QUEUED and late.startswith("first-steer-")
    assert rt.store.task_spec(late).prompt == "and a high chair" and rt.store.step_boundary("first") == (None, False)
    assert rt.store.count_tasks() == 2  # the steers themselves stored no task of their own

    assert admit(rt, "after", "thanks", if_busy="steer").created  # nothing runs: a steer is a plain new message
    rt.store.reset_for_rerun("first")
    assert rt.store.thread_story("chat").turns == []  # a rerun drops its steered turns with the rest
