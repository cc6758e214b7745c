"""Bad input is refused before it is written; corrupt cells and bad URLs fail clearly."""

from __future__ import annotations

import copy
import json
import math
import uuid
from typing import Any, Callable

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from longhaul.models import (
    ChatMessage,
    CheckpointItem,
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


# -- Fuzzing: random and damaged input to the schemas and the store -----------------------------------------------

#: Any JSON-ish value, including what JSON cannot hold (NaN, infinities, integers beyond 64 bits).
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
ROLES = ["system", "user", "assistant", "tool"]
message_like = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES) | st.text(max_size=8), "content": st.text(max_size=20) | any_json},
    optional={"tool_calls": st.lists(st.dictionaries(st.sampled_from(["id", "name", "arguments", "x"]), any_json),
                                     max_size=2) | any_json,
              "name": any_json, "tool_call_id": any_json, "mood": any_json},
)
item_like = st.fixed_dictionaries(
    {"tool_name": st.text(max_size=8) | any_json, "success": any_json, "output": st.text(max_size=8) | any_json},
    optional={"arguments": st.dictionaries(st.text(max_size=8), any_json, max_size=3) | any_json},
)
#: Values a fuzzer puts in each field: anything, plus shapes close to the real ones.
FIELD_VALUES = {
    "execution_history": st.lists(message_like, max_size=3) | any_json,
    "resumable_history": st.lists(message_like, max_size=3) | any_json,
    "new_messages": st.lists(message_like, max_size=3) | any_json,
    "items": st.lists(item_like, max_size=3) | any_json,
    "options": st.dictionaries(st.text(max_size=8), any_json, max_size=4) | any_json,
    "status": st.sampled_from([s.value for s in TaskStatus]) | any_json,
    "step_index": st.integers() | any_json,
    "max_steps": st.integers() | any_json,
    "time_limit_s": st.floats() | any_json,
}
#: A valid input per schema, which the fuzzer then damages field by field.
VALID_INPUTS: dict[type[BaseModel], dict[str, Any]] = {
    TaskSpec: dict(prompt="do it", options={"steps": 3}),
    TaskSnapshot: dict(task_id="t", thread_id="th", channel="c", provider="p", model="m", status="running",
                       execution_history=[{"role": "user", "content": "hi"}]),
    CheckpointUpdate: dict(task_id="t", thread_id="th", channel="c", provider="p", model="m", step_index=1,
                           new_messages=[{"role": "assistant", "content": "ok"}],
                           items=[{"tool_name": "ledger", "success": True, "output": "ok"}]),
}


@st.composite
def damaged_inputs(draw: st.DrawFn, schema: type[BaseModel]) -> dict[str, Any]:
    """A valid input with some fields replaced, some dropped and unknown ones added."""
    fields = dict(VALID_INPUTS[schema])
    names = sorted(schema.model_fields)
    for name in draw(st.lists(st.sampled_from(names), max_size=3)):
        fields[name] = draw(FIELD_VALUES.get(name, st.text(max_size=30) | any_json))
    for name in draw(st.lists(st.sampled_from(names), max_size=2)):
        fields.pop(name, None)
    fields.update(draw(st.dictionaries(st.text(max_size=6), any_json, max_size=1)))
    return fields


@pytest.mark.parametrize("schema", list(VALID_INPUTS), ids=lambda schema: schema.__name__)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_input_to_a_schema_is_accepted_or_refused_with_a_validation_error_naming_the_field(schema, data):
    fields = data.draw(damaged_inputs(schema))
    try:
        accepted = schema.model_validate(fields)
    except pydantic.ValidationError as exc:
        assert all(error["loc"] for error in exc.errors()), exc
    else:  # what is accepted survives its JSON form, the way specs are stored
        assert schema.model_validate_json(accepted.model_dump_json()) == accepted
    raw = data.draw(st.binary(max_size=60) | st.text(max_size=60) | st.just(json.dumps(fields, default=str)))
    try:
        schema.model_validate_json(raw)
    except pydantic.ValidationError:
        pass


#: What the store can hold: text without lone surrogates (hypothesis's default), 64-bit integers,
#: finite floats. `test_values_the_schemas_accept_are_stored_or_refused_by_the_schema` covers the rest.
store_text = st.text(max_size=30)
store_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | store_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(store_text, inner, max_size=3),
    max_leaves=8,
)
store_arguments = st.dictionaries(store_text, store_json, max_size=3)
labels = st.text(min_size=1, max_size=20)
tool_calls = st.builds(ToolCall, id=st.text(max_size=10), name=labels, arguments=store_arguments)
chat_messages = st.builds(
    ChatMessage, role=st.sampled_from(ROLES), content=store_text, tool_call_id=st.none() | store_text,
    name=st.none() | store_text, tool_calls=st.none() | st.lists(tool_calls, max_size=2),
)
checkpoint_items = st.builds(CheckpointItem, tool_name=labels, arguments=store_arguments, success=st.booleans(),
                             output=store_text)
#: (task number, step, messages, items, note): several tasks, repeated steps, out-of-order steps.
checkpoint_steps = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 5), st.lists(chat_messages, max_size=3),
              st.lists(checkpoint_items, max_size=2), st.none() | store_text),
    min_size=1, max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=checkpoint_steps)
def test_valid_checkpoints_round_trip_through_the_store_and_a_repeated_step_changes_nothing(store, steps):
    run = uuid.uuid4().hex[:8]  # one store for every example: each example writes its own tasks
    expected: dict[str, dict[str, Any]] = {}
    for task, step, messages, items, note in steps:
        task_id = f"{run}-{task}"
        want = expected.setdefault(task_id, {"steps": {}, "history": [], "note": None})
        update = CheckpointUpdate(task_id=task_id, thread_id=task_id, channel="c", provider="p", model="m",
                                  step_index=step, new_messages=messages, items=items, checkpoint_note=note)
        first = step not in want["steps"]
        assert store.record_checkpoint(update) is first
        if first:
            want["steps"][step] = (note, [item.model_dump() for item in items])
            want["history"].extend(message.model_dump() for message in messages)
            want["note"] = note if note is not None else want["note"]

    for task_id, want in expected.items():
        record = store.get(task_id)
        assert {c.step_index: (c.checkpoint_note, [i.model_dump() for i in c.items]) for c in record.checkpoints} \
            == want["steps"]
        assert [c.step_index for c in record.checkpoints] == sorted(want["steps"])
        assert [message.model_dump() for message in record.execution_history] == want["history"]
        assert (record.checkpoint_count, record.message_count) == (len(want["steps"]), len(want["history"]))
        assert record.latest_checkpoint_note == want["note"]


#: Values the store cannot write: the schemas must refuse them, naming the field.
UNSTORABLE = {
    "integer beyond 64 bits in tool arguments": dict(
        items=[dict(tool_name="ledger", arguments={"issue": 2**64}, success=True, output="ok")]),
    "integer beyond 64 bits in a tool call": dict(
        new_messages=[dict(role="assistant", content="", tool_calls=[dict(name="ledger", arguments={"n": -2**70})])]),
    "lone surrogate in message content": dict(new_messages=[dict(role="assistant", content="half \ud83d emoji")]),
    "lone surrogate in tool output": dict(items=[dict(tool_name="ledger", success=True, output="\udfff")]),
}


@pytest.mark.parametrize("case", list(UNSTORABLE))
def test_values_the_schemas_accept_are_stored_or_refused_by_the_schema(store, case):
    fields = {**VALID_INPUTS[CheckpointUpdate], **UNSTORABLE[case]}
    try:
        update = CheckpointUpdate.model_validate(fields)
    except pydantic.ValidationError:
        return  # refused before anything is written, naming the field: fine
    assert store.record_checkpoint(update)
    stored = store.get("t")
    assert [m.model_dump() for m in stored.execution_history] == [m.model_dump() for m in update.new_messages]
    assert [i.model_dump() for i in stored.checkpoints[0].items] == [i.model_dump() for i in update.items]
