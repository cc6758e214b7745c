"""Bad input is refused before it is written; corrupt cells and bad URLs fail clearly."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import pydantic
import pytest

from longhaul.models import (
    ChatMessage,
    CheckpointUpdate,
    CorruptRecord,
    InvalidDatabaseUrl,
    TaskSnapshot,
    TaskSpec,
    TaskStatus,
    TaskStore,
    ToolCall,
    open_database,
)
from longhaul.models.schemas import stored_message

Mutation = Callable[[dict[str, Any]], None]


def setting(*path: Any, value: Any) -> Mutation:
    def mutate(fields: dict[str, Any]) -> None:
        target = fields
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return mutate


def dropping(key: str) -> Mutation:
    return lambda fields: fields.pop(key)


class Unserialisable:
    """Stands in for any Python object that has no JSON form."""


#: (case id, mutation, location the error must name)
BAD_SNAPSHOTS = [
    ("unknown-status", setting("status", value="paused"), ("status",)),
    ("missing-field", dropping("thread_id"), ("thread_id",)),
    ("wrong-type-history", setting("execution_history", value="hello"), ("execution_history",)),
    ("wrong-type-content", setting("execution_history", 0, "content", value=42), ("execution_history", 0, "content")),
    ("unknown-role", setting("resumable_history", 1, "role", value="robot"), ("resumable_history", 1, "role")),
    ("empty-task-id", setting("task_id", value=""), ("task_id",)),
    ("space-in-task-id", setting("task_id", value="task 1"), ("task_id",)),
    ("tab-in-thread-id", setting("thread_id", value="thread\t1"), ("thread_id",)),
    ("newline-after-task-id", setting("task_id", value="task-1\n"), ("task_id",)),
    ("empty-model", setting("model", value=""), ("model",)),
    ("unknown-field", setting("priority", value=5), ("priority",)),
    ("unknown-message-field", setting("execution_history", 0, "mood", value="happy"), ("execution_history", 0, "mood")),
]

BAD_UPDATES = [
    ("negative-step-index", setting("step_index", value=-1), ("step_index",)),
    ("wrong-type-step-index", setting("step_index", value="three"), ("step_index",)),
    ("missing-field", dropping("model"), ("model",)),
    ("object-argument", setting("items", 0, "arguments", "path", value=Unserialisable()),
     ("items", 0, "arguments", "path")),
    ("set-argument", setting("items", 0, "arguments", "path", value={"a", "b"}), ("items", 0, "arguments", "path")),
    ("bytes-argument", setting("items", 0, "arguments", "path", value=b"raw"), ("items", 0, "arguments", "path")),
    ("wrong-type-success", setting("items", 0, "success", value="maybe"), ("items", 0, "success")),
    ("missing-item-output", lambda fields: fields["items"][0].pop("output"), ("items", 0, "output")),
    ("empty-task-id", setting("task_id", value=""), ("task_id",)),
    ("space-in-task-id", setting("task_id", value=" task-1"), ("task_id",)),
    ("unknown-role", setting("new_messages", 0, "role", value="narrator"), ("new_messages", 0, "role")),
    ("unknown-field", setting("status", value="running"), ("status",)),
]


def case_ids(cases: list[tuple[Any, ...]]) -> list[str]:
    return [case[0] for case in cases]


@pytest.fixture
def snapshot_fields(make_snapshot) -> dict[str, Any]:
    """A valid snapshot of task-1 as a plain dict (what an API caller would pass)."""
    return make_snapshot(TaskStatus.COMPLETED, final_response="replaced").model_dump()


@pytest.fixture
def update_fields(make_update) -> dict[str, Any]:
    """A valid step-2 checkpoint of task-1 as a plain dict."""
    return make_update(2).model_dump()


@pytest.fixture
def stored(store, make_snapshot, make_update):
    """task-1 with a snapshot and one checkpoint; returns a function giving everything stored."""
    store.save_snapshot(make_snapshot(TaskStatus.RUNNING))
    store.record_checkpoint(make_update(1))

    def everything() -> tuple[Any, ...]:
        counts = tuple(store.db.execute_sql(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
                       for table in ("task", "checkpoint", "message"))
        return store.load("task-1"), store.list_tasks(), counts

    return everything


def assert_names_field(exc: pydantic.ValidationError, location: tuple[Any, ...]) -> None:
    locations = [error["loc"] for error in exc.errors()]
    assert any(loc[: len(location)] == location for loc in locations), locations
    assert str(location[-1]) in str(exc)


def test_the_unmutated_inputs_are_valid(store, snapshot_fields, update_fields):
    # The bad-input cases below each break exactly one thing in these.
    assert store.record_checkpoint(copy.deepcopy(update_fields)) is True
    store.save_snapshot(copy.deepcopy(snapshot_fields))
    assert store.load("task-1").status is TaskStatus.COMPLETED


@pytest.mark.parametrize("case,mutate,location", BAD_SNAPSHOTS, ids=case_ids(BAD_SNAPSHOTS))
def test_a_bad_snapshot_raises_a_validation_error_naming_the_field(snapshot_fields, case, mutate, location):
    mutate(snapshot_fields)
    with pytest.raises(pydantic.ValidationError) as raised:
        TaskSnapshot.model_validate(snapshot_fields)
    assert_names_field(raised.value, location)


@pytest.mark.parametrize("case,mutate,location", BAD_UPDATES, ids=case_ids(BAD_UPDATES))
def test_a_bad_checkpoint_raises_a_validation_error_naming_the_field(update_fields, case, mutate, location):
    mutate(update_fields)
    with pytest.raises(pydantic.ValidationError) as raised:
        CheckpointUpdate.model_validate(update_fields)
    assert_names_field(raised.value, location)


@pytest.mark.parametrize("case,mutate,location", BAD_SNAPSHOTS, ids=case_ids(BAD_SNAPSHOTS))
def test_a_bad_snapshot_changes_nothing_already_stored(store, stored, snapshot_fields, case, mutate, location):
    before = stored()
    mutate(snapshot_fields)

    with pytest.raises(pydantic.ValidationError) as raised:
        store.save_snapshot(snapshot_fields)

    assert_names_field(raised.value, location)
    assert stored() == before


@pytest.mark.parametrize("case,mutate,location", BAD_UPDATES, ids=case_ids(BAD_UPDATES))
def test_a_bad_checkpoint_changes_nothing_already_stored(store, stored, update_fields, case, mutate, location):
    before = stored()
    mutate(update_fields)

    with pytest.raises(pydantic.ValidationError) as raised:
        store.record_checkpoint(update_fields)

    assert_names_field(raised.value, location)
    assert stored() == before


def test_tool_calls_and_specs_are_validated_too():
    with pytest.raises(pydantic.ValidationError) as raised:
        ChatMessage(role="assistant", content="", tool_calls=[{"name": "x", "arguments": {"f": Unserialisable()}}])
    assert_names_field(raised.value, ("tool_calls", 0, "arguments", "f"))
    with pytest.raises(pydantic.ValidationError) as raised:
        ToolCall(name="", arguments={})
    assert_names_field(raised.value, ("name",))
    with pytest.raises(pydantic.ValidationError) as raised:
        TaskSpec(prompt="   ", max_steps=0)
    assert {error["loc"] for error in raised.value.errors()} == {("prompt",), ("max_steps",)}


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_non_finite_tool_argument_is_refused_and_changes_nothing(store, stored, update_fields, value):
    before = stored()
    update_fields["items"][0]["arguments"]["ratio"] = value

    with pytest.raises(pydantic.ValidationError) as raised:
        store.record_checkpoint(update_fields)

    assert_names_field(raised.value, ("items", 0, "arguments", "ratio"))
    assert stored() == before


# -- corrupt cells -------------------------------------------------------------


@pytest.fixture
def two_tasks(store, make_update, make_snapshot):
    """task-1 (to be corrupted) and task-2 (to stay healthy), each with a checkpoint."""
    assert store.create_task(task_id="task-1", thread_id="thread-1", channel="telegram", provider="openai",
                             model="gpt-test", spec=TaskSpec(prompt="do it"))
    call = ToolCall(id="c1", name="shell", arguments={"command": "ls"})
    store.record_checkpoint(make_update(1, new_messages=[ChatMessage.assistant("", tool_calls=[call])]))
    store.record_checkpoint(make_update(1, task_id="task-2"))
    return store


def corrupt(task_store: TaskStore, sql: str) -> None:
    changed = task_store.db.execute_sql(
        sql + ' WHERE "task_id" = (SELECT "id" FROM "task" WHERE "task_id" = ?)', ("task-1",)).rowcount
    assert changed == 1


@pytest.mark.parametrize("cell", ["{not json", '[{"tool_name": 1}]', '{"tool_name": "x"}'],
                         ids=["not-json", "wrong-shape", "not-a-list"])
def test_a_corrupt_checkpoint_cell_raises_corrupt_record_naming_the_field(two_tasks, cell):
    two_tasks.db.execute_sql(
        'UPDATE "checkpoint" SET "items" = ? WHERE "task_id" = (SELECT "id" FROM "task" WHERE "task_id" = ?)',
        (cell, "task-1"))

    with pytest.raises(CorruptRecord) as raised:
        two_tasks.load("task-1")

    assert (raised.value.task_id, raised.value.field) == ("task-1", "checkpoint[1].items")
    assert "task-1" in str(raised.value) and "items" in str(raised.value)
    with pytest.raises(CorruptRecord):
        two_tasks.latest_checkpoint("task-1")
    # One corrupt task does not take the others (or listings) down with it.
    assert two_tasks.load("task-2").checkpoints[0].items[0].tool_name == "shell"
    assert {summary.task_id for summary in two_tasks.list_tasks()} == {"task-1", "task-2"}


def test_a_corrupt_tool_calls_cell_raises_corrupt_record_naming_the_field(two_tasks):
    corrupt(two_tasks, 'UPDATE "message" SET "tool_calls" = \'[{"name": \'')

    with pytest.raises(CorruptRecord) as raised:
        two_tasks.load("task-1")

    assert raised.value.field == "message.tool_calls"
    assert two_tasks.load("task-2").message_count == 2


def test_a_corrupt_spec_cell_raises_corrupt_record_naming_the_field(two_tasks):
    two_tasks.db.execute_sql('UPDATE "task" SET "spec" = ? WHERE "task_id" = ?', ('{"prompt": ', "task-1"))

    with pytest.raises(CorruptRecord) as raised:
        two_tasks.load("task-1")
    assert raised.value.field == "spec"
    with pytest.raises(CorruptRecord):
        two_tasks.task_spec("task-1")
    assert two_tasks.load("task-2") is not None


def test_a_corrupt_status_cell_raises_corrupt_record_naming_the_field(two_tasks):
    two_tasks.db.execute_sql('UPDATE "task" SET "status" = ? WHERE "task_id" = ?', ("paused", "task-1"))

    with pytest.raises(CorruptRecord) as raised:
        two_tasks.load("task-1")
    assert raised.value.field == "status"
    assert two_tasks.load("task-2") is not None


# -- database URLs -------------------------------------------------------------


@pytest.mark.parametrize("url,problem", [
    (":memory:", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("", "empty"),
    ("   ", "empty"),
    ("foo://somewhere/db", "sqlite:///"),
])
def test_an_unusable_database_url_raises_invalid_database_url(url, problem):
    with pytest.raises(InvalidDatabaseUrl) as raised:
        open_database(url)
    assert problem in str(raised.value)
    assert raised.value.url == url.strip()


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "url"])
def test_a_folder_is_not_a_database_file(tmp_path, as_url):
    url = f"sqlite:///{tmp_path}" if as_url else str(tmp_path)
    with pytest.raises(InvalidDatabaseUrl, match="folder"):
        TaskStore(url)


def test_a_store_cannot_be_opened_in_memory():
    with pytest.raises(InvalidDatabaseUrl, match="give a file path"):
        TaskStore(":memory:")


def test_a_plain_path_is_accepted_and_its_folders_are_created(tmp_path, make_update):
    path = tmp_path / "deep" / "er" / "tasks.db"
    with TaskStore(path) as by_path:
        by_path.record_checkpoint(make_update(1))
    assert path.is_file()
    with TaskStore(f"sqlite:///{path}") as by_url:
        assert by_url.load("task-1").checkpoint_count == 1


def test_the_sqlite_database_runs_with_wal_normal_sync_foreign_keys_and_a_busy_timeout(store):
    pragma = lambda name: store.db.execute_sql(f"PRAGMA {name}").fetchone()[0]  # noqa: E731
    assert pragma("journal_mode") == "wal"
    assert pragma("synchronous") == 1  # NORMAL
    assert pragma("foreign_keys") == 1
    assert pragma("busy_timeout") >= 1_000


# -- messages rebuilt from the store -------------------------------------------------


@pytest.mark.parametrize("fields", [
    dict(role="user", content="hello"),
    dict(role="tool", content="42", tool_call_id="call-1", name="shell"),
    dict(role="assistant", content="", tool_calls=[ToolCall(id="c", name="shell", arguments={"n": 1})]),
], ids=["user", "tool", "assistant-with-calls"])
def test_a_message_rebuilt_from_stored_columns_is_indistinguishable_from_a_validated_one(fields):
    validated = ChatMessage(**{"tool_call_id": None, "name": None, "tool_calls": None, **fields})
    rebuilt = stored_message(validated.role, validated.content, validated.tool_call_id, validated.name,
                             validated.tool_calls)

    assert rebuilt == validated and repr(rebuilt) == repr(validated)
    assert rebuilt.model_dump_json() == validated.model_dump_json()
    assert rebuilt.model_fields_set == validated.model_fields_set


def test_changing_one_rebuilt_message_leaves_the_others_alone():
    first, second = (stored_message("user", text, None, None, None) for text in ("one", "two"))

    first.content = "changed"
    copied = second.model_copy(update={"content": "copied"})

    assert (first.content, second.content, copied.content) == ("changed", "two", "copied")
    assert first.model_fields_set == second.model_fields_set == set(ChatMessage.model_fields)


@pytest.mark.parametrize("columns, problem", [
    (("robot", "hi", None, None), "role: 'robot'"),
    (("user", b"hi", None, None), "content: expected text, got bytes"),
    (("tool", "hi", 7, None), "tool_call_id: expected text, got int"),
    (("tool", "hi", None, 1.5), "name: expected text, got float"),
])
def test_a_stored_message_with_a_damaged_column_is_refused_naming_it(columns, problem):
    with pytest.raises(ValueError, match=problem):
        stored_message(*columns, None)
