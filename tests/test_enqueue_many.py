"""`longhaul.enqueue_many`: a batch validated item by item, stored all or nothing, sent in one pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import longhaul
from longhaul.models import TaskSpec
from longhaul.worker.testing import free_port


@pytest.fixture
def unreachable_broker_runtime(db_url: str, client_for):
    """This process as a client of a Redis nobody listens on: validation and storing work, sending does not."""
    return client_for(db_url, f"redis://127.0.0.1:{free_port()}/0")


@pytest.mark.parametrize("items, index, field", [
    ([{"prompt": "a"}, {"prompt": "b", "max_steps": "many"}], 1, "max_steps"),
    ([{"prompt": "a"}, {"prompt": "b"}, {"steps": 3}], 2, "prompt"),
    ([{"prompt": "a", "colour": "red"}], 0, "colour"),
    ([{"prompt": "a", "task_id": "same"}, {"prompt": "b", "task_id": "same"}], 1, "task_id"),
    ([{"prompt": "a"}, "just a prompt"], 1, "expected a mapping"),
])
def test_a_bad_item_is_refused_naming_its_index_and_field_and_nothing_is_stored(
    unreachable_broker_runtime, store, items, index, field
):
    with pytest.raises(longhaul.InvalidBatchItem) as refused:
        longhaul.enqueue_many(items)

    assert refused.value.index == index
    assert str(refused.value).startswith(f"items[{index}]: ") and field in str(refused.value)
    assert store.count_tasks() == 0


def test_an_item_whose_id_a_different_task_holds_refuses_the_whole_batch(unreachable_broker_runtime, store):
    store.create_task(task_id="taken", thread_id="taken", channel="api", provider="scripted", model="scripted",
                      spec=TaskSpec(prompt="something else"))

    with pytest.raises(longhaul.InvalidBatchItem, match=r"items\[1\]: task_id: a different task 'taken'"):
        longhaul.enqueue_many([{"prompt": "new", "task_id": "new"}, {"prompt": "mine", "task_id": "taken"}])

    assert store.count_tasks() == 1


def test_with_the_broker_down_the_tasks_are_stored_and_left_for_recovery_to_send(unreachable_broker_runtime, store):
    ids = longhaul.enqueue_many([{"prompt": f"task {i}", "steps": 2} for i in range(50)])

    assert len(set(ids)) == 50 and store.count_tasks() == 50
    leases = unreachable_broker_runtime.leases
    assert all(leases.holder(task_id).delivery_due_at is None for task_id in ids)  # unsent: recovery sends them


@pytest.mark.redis
def test_a_batch_is_stored_and_every_task_sent_once_with_its_message_id(client_runtime, store, redis_client):
    items = [{"prompt": f"task {i}", "task_id": f"bulk-{i}", "thread_id": "batch", "steps": 2} for i in range(300)]

    ids = longhaul.enqueue_many(items)
    again = longhaul.enqueue_many(items)  # a repeat: same ids, nothing stored or sent twice

    assert ids == again == [f"bulk-{i}" for i in range(300)]
    assert store.count_tasks() == 300 and store.summary("bulk-7").thread_id == "batch"
    queue = client_runtime.actor.queue_name
    assert redis_client.llen(f"dramatiq:{queue}") == 300
    holders = [client_runtime.leases.holder(task_id) for task_id in ids]
    assert all(holder.delivery_due_at is not None and holder.message_id for holder in holders)
    assert redis_client.hexists(f"dramatiq:{queue}.msgs", holders[-1].message_id)  # the id Redis holds it under


@pytest.mark.redis
def test_enqueue_file_sends_one_task_per_line_and_names_the_line_of_a_bad_one(longhaul, redis_server, store,
                                                                            tmp_path: Path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"line {i}", "task_id": f"line-{i}"}) for i in range(3)) + "\n\n")
    bad.write_text('{"prompt": "fine"}\n\n{"prompt": "bad", "max_steps": -1}\n')

    sent = longhaul("enqueue", "--file", str(good), "--steps", "2", LONGHAUL_REDIS_URL=redis_server.url)
    refused = longhaul("enqueue", "--file", str(bad), LONGHAUL_REDIS_URL=redis_server.url)

    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.split() == ["line-0", "line-1", "line-2"]
    assert store.task_spec("line-1").options["steps"] == 2  # the command line's options are defaults
    assert refused.returncode == 2 and "line 3: max_steps" in refused.stderr and "Traceback" not in refused.stderr
    assert store.count_tasks() == 3


@pytest.mark.backends("sqlite", "postgres")
def test_create_tasks_stores_new_tasks_in_one_call_and_leaves_existing_ones_alone(store):
    from longhaul.models import InvalidInput, NewTask

    def new(task_id: str, prompt: str = "p") -> NewTask:
        return NewTask(task_id=task_id, thread_id="t", channel="c", provider="scripted", model="m",
                       spec=TaskSpec(prompt=prompt))

    store.create_task(task_id="old", thread_id="t", channel="c", provider="scripted", model="m",
                      spec=TaskSpec(prompt="kept"))

    stored = store.create_tasks([new("a"), new("old", "ignored"), new("b")])

    assert stored == ["a", "b"]
    assert store.task_spec("old").prompt == "kept" and store.summary("b").status.value == "queued"
    assert store.summary("a").checkpoint_count == 0 and store.summary("a").usage.cost_usd == 0.0
    with pytest.raises(InvalidInput, match=r"tasks\[1\].task_id: 'c' is given twice"):
        store.create_tasks([new("c"), new("c")])
    assert store.count_tasks() == 3
