"""`Statements`: the SQL of the per-step statements, rendered once per store.

Rendering a peewee query costs more than executing it on SQLite, so the
hot-path statements are rendered once (with dummy values, which peewee turns
into parameters in column order) and reused with real parameters. Rendering
goes through the store's database, so placeholders (``?`` or ``%s``) and
conflict clauses (``INSERT OR IGNORE`` or ``ON CONFLICT DO NOTHING``) are the
backend's own.
"""

from __future__ import annotations

from typing import Any, Callable

from peewee import SQL, Case, fn

from .codec import USAGE_FIELDS
from .dialect import Dialect
from .schemas import TaskStatus
from .tables import EXECUTION, NO_LEASE, Tables
from .thread_rule import in_story_before, startable

#: The statuses a claim accepts: a queued task, or a running one whose lease is free (a resume).
CLAIMABLE = (TaskStatus.QUEUED.value, TaskStatus.RUNNING.value)
#: The name a task row read carries its highest stored step under (`select_task_row`, `select_claimed_row`).
LAST_STEP_COLUMN = "last_step_index"
#: The name the claim's read-back carries "its thread has a finished task before it" under (`select_claimed_row`).
STORY_BEFORE_COLUMN = "story_before"


class Statements:
    """SQL text for the statements a checkpoint and a resume run, with their parameter order."""

    def __init__(self, dialect: Dialect, tables: Tables) -> None:
        Task, Message, Checkpoint = tables.Task, tables.Message, tables.Checkpoint
        # What the step loop checks between steps (`leases.step_boundary`): read on its own
        # (`select_cancel_requested`) or at the end of the locked read of the write before the boundary.
        boundary = (Task.cancel_requested, Task.cancel_reason, Task.steering.is_null(False))
        # Locked for the checkpoint's transaction: a claim by another worker waits for it. With the step
        # boundary's columns: a checkpoint hands the loop its next boundary.
        self.select_task = render_sql(dialect.locked(
            Task.select(Task.id, Task.execution_count, Task.lease_token, Task.trace_next_sequence, *boundary)
            .where(Task.task_id == "")))
        # Read after `select_task`, in a statement of its own: one that starts once the row lock is held
        # sees every checkpoint committed before (a subquery of the locking statement reads the snapshot
        # from before its wait). Whether the step is stored (a repeat is a no-op), and the highest stored
        # step (where the checkpoint's trace goes depends on it); parameters (step_index, task_id).
        steps = Checkpoint.select(Checkpoint.step_index).where(Checkpoint.task == Task.id)
        highest_step = Checkpoint.select(fn.MAX(Checkpoint.step_index)).where(Checkpoint.task == Task.id)
        self.select_step_state = render_sql(
            Task.select(fn.EXISTS(steps.where(Checkpoint.step_index == 0)), highest_step).where(Task.task_id == ""))
        last_step = highest_step.alias(LAST_STEP_COLUMN)
        # A whole task row and its highest stored step: what a resume, `load` and a claim's read-back need.
        self.select_task_row = render_sql(Task.select(*Task._meta.sorted_fields, last_step).where(Task.task_id == ""))
        # The row every fenced write reads first, locked for its transaction (`StoreContext.locked_task_row`).
        self.select_task_locked = render_sql(dialect.locked(Task.select().where(Task.task_id == "")))
        # What a claim reads back: the row, its highest step, and whether its thread's story before it has any
        # task (`thread_rule.in_story_before`, the story's own condition): a new task with none skips reading it.
        Earlier = Task.alias("earlier")
        story_before = fn.EXISTS(Earlier.select(Earlier.id).where(in_story_before(Earlier, Task.thread_id, Task.id)))
        claimed = (*Task._meta.sorted_fields, last_step, story_before.alias(STORY_BEFORE_COLUMN))
        # PostgreSQL hands the claimed row back with the UPDATE; SQLite reads it next (`select_claimed_row`).
        self.select_claimed_row = prepare(
            lambda slot: Task.select(*claimed).where(Task.task_id == slot("task_id", str)))
        claimed_row = claimed if dialect.returning else ()
        self.claim = prepare(lambda slot: _claim_update(Task, slot, stealing=False, returning=claimed_row))
        self.claim_stealing = prepare(lambda slot: _claim_update(Task, slot, stealing=True, returning=claimed_row))
        # The names of the columns the claim hands back, in order (PostgreSQL's RETURNING).
        self.claimed_columns = (*(field.column_name for field in Task._meta.sorted_fields), LAST_STEP_COLUMN,
                                STORY_BEFORE_COLUMN)
        # What ends a task without another read (`Checkpoints.finish`): whether any execution message was
        # stored after its highest checkpoint (an open step's answer or results would be). Read after the
        # locked row, in a statement of its own (see `select_step_state`); parameter task_id.
        after_last_step = Message.select(Message.id).where(
            (Message.task == Task.id) & (Message.history == SQL(str(EXECUTION)))
            & (Message.step_index > fn.COALESCE(highest_step, SQL("0"))))
        self.select_messages_after_last_step = render_sql(
            Task.select(fn.EXISTS(after_last_step)).where(Task.task_id == ""))
        self.select_cancel_requested = render_sql(Task.select(*boundary).where(Task.task_id == ""))
        self.insert_checkpoint = render_sql(
            Checkpoint.insert(task=0, step_index=0, checkpoint_note="", items="", created_at=0.0,
                              trace_first_sequence=0, trace="")
            .returning()  # no implicit RETURNING "id"; a stored step is found before (`select_step_state`)
        )
        # One history per statement: a column fewer per row is measurable at 5,000 rows.
        self.select_history = render_sql(
            Message.select(Message.role, Message.content, Message.tool_call_id, Message.name, Message.tool_calls)
            .where((Message.task == 0) & (Message.history == 0))
            .order_by(Message.position)
        )
        self.insert_trace_batch = render_sql(
            tables.TraceBatch.insert(task=0, first_sequence=0, last_sequence=0, started_at=0.0, agent="", model="",
                                     job_type="", events="", refers_to_messages=False).returning()
        )
        self.insert_message = render_sql(
            Message.insert(task=0, history=0, position=0, step_index=0, role="", content="",
                           tool_call_id="", name="", tool_calls="", tool_succeeded=False).returning()
        )
        p = dialect.param
        # A journaled answer: its message, a position reserved per tool call, its turn and usage.
        self.update_task_after_answer = (
            f'UPDATE "task" SET "execution_count" = "execution_count" + {p}, '
            f'"turn_count" = "turn_count" + 1, "tool_call_count" = "tool_call_count" + {p}, '
            + "".join(f'"{name}" = "{name}" + {p}, ' for name in USAGE_FIELDS) +
            f'"updated_at" = {p}, "lease_expires_at" = COALESCE({p}, "lease_expires_at"), '
            f'"trace_next_sequence" = {p} WHERE "id" = {p}'
        )
        # `Checkpoints.append_histories`: the row it appends after, locked, with the step boundary's columns;
        # then its counters and trace sequence.
        self.select_task_histories = render_sql(dialect.locked(
            Task.select(Task.id, Task.execution_count, Task.resumable_count, Task.lease_token,
                        Task.trace_next_sequence, *boundary).where(Task.task_id == "")))
        self.update_task_after_histories = (
            f'UPDATE "task" SET "execution_count" = "execution_count" + {p}, '
            f'"resumable_count" = "resumable_count" + {p}, "trace_next_sequence" = {p}, "updated_at" = {p} '
            f'WHERE "id" = {p}'
        )
        self.select_lease_token = render_sql(dialect.locked(
            Task.select(Task.id, Task.lease_token).where(Task.task_id == "")))
        # Counter increments and COALESCEs: written out, parameters in the
        # order `Checkpoints.record` passes them. A step is progress, so the
        # crash-loop counter starts again from 0.
        self.update_task_after_checkpoint = (
            f'UPDATE "task" SET "thread_id" = {p}, "channel" = {p}, "provider" = {p}, "model" = {p}, '
            f'"status" = \'running\', "checkpoint_count" = "checkpoint_count" + 1, "recovery_count" = 0, '
            f'"execution_count" = "execution_count" + {p}, '
            f'"turn_count" = "turn_count" + {p}, "tool_call_count" = "tool_call_count" + {p}, '
            + "".join(f'"{name}" = "{name}" + {p}, ' for name in USAGE_FIELDS) +
            f'"latest_checkpoint_note" = COALESCE({p}, "latest_checkpoint_note"), '
            f'"updated_at" = {p}, "lease_expires_at" = COALESCE({p}, "lease_expires_at"), '
            f'"trace_next_sequence" = {p} WHERE "id" = {p}'
        )
        # `Checkpoints.finish`: the ended row, its lease released; parameters in `Checkpoints._end_writes` order.
        self.update_task_at_end = (
            f'UPDATE "task" SET "status" = {p}, "final_response" = {p}, "last_error" = {p}, "updated_at" = {p}, '
            f'"completed_at" = {p}, "execution_count" = {p}, "resumable_count" = {p}, '
            f'"turn_count" = "turn_count" + {p}, "tool_call_count" = "tool_call_count" + {p}, '
            f'"trace_next_sequence" = {p}, '
            + "".join(f'"{name}" = "{name}" + {p}, ' for name in USAGE_FIELDS)
            + ", ".join(f'"{column}" = NULL' for column in NO_LEASE) + f' WHERE "id" = {p}'
        )
        # `task_ends.count_end`: one more task of (status, agent) ended.
        self.count_end = (f'INSERT INTO "task_end_count" ("status", "agent", "count") VALUES ({p}, {p}, 1) '
                          'ON CONFLICT ("status", "agent") DO UPDATE SET "count" = "task_end_count"."count" + 1')
        # `TaskWrites.create_many`: a new task's every column but the id, defaults filled in (the DDL
        # has none: peewee fills them), values in `new_task_columns` order. ON CONFLICT DO NOTHING is
        # what `create` gets from peewee on PostgreSQL, and SQLite (3.24+) reads it the same way.
        fields = [field for field in Task._meta.sorted_fields if field.name != "id"]
        self.new_task_columns = tuple(field.name for field in fields)
        self.new_task_defaults = {field.name: field.default for field in fields
                                  if field.default is not None and not callable(field.default)}
        columns = ", ".join(f'"{field.column_name}"' for field in fields)
        marks = ", ".join(p for _ in fields)
        self.insert_task = f'INSERT INTO "task" ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING'
        # `LeaseBook.note_sent_many`: one executemany for a bulk enqueue's messages, parameters
        # (delivery_due_at, delivery_message_id, task_id); a task leased meanwhile is left alone.
        self.note_sent = (f'UPDATE "task" SET "delivery_due_at" = {p}, "delivery_message_id" = {p} '
                          f'WHERE "task_id" = {p} AND "lease_token" IS NULL')


def _claim_update(Task: Any, slot: Callable[[str, type], Any], *, stealing: bool, returning: tuple[Any, ...]) -> Any:
    """The claim's conditional UPDATE (see `LeaseBook.claim`), its values left as named slots."""
    now = slot("now", float)
    free = Task.lease_token.is_null() | (Task.lease_expires_at <= now)
    if stealing:
        free = free | (Task.lease_token == slot("steal_token", str))
    update = (
        Task.update(
            lease_token=slot("token", str),
            lease_owner=slot("owner", str),
            lease_host=slot("host", str),
            lease_pid=slot("pid", int),
            lease_pid_started_at=slot("pid_started_at", float),
            lease_expires_at=slot("expires_at", float),
            status=TaskStatus.RUNNING.value,
            started_at=fn.COALESCE(Task.started_at, slot("now", float)),
            # Taking a lease another holder still had on the row is a recovery (see `LeaseBook.claim`).
            recovery_count=Case(None, [(Task.lease_token.is_null(False), Task.recovery_count + 1)],
                                Task.recovery_count),
            updated_at=slot("now", float),
        )
        .where((Task.task_id == slot("task_id", str)) & Task.status.in_(CLAIMABLE) & free & startable(Task))
    )
    return update.returning(*returning) if returning else update


class Prepared:
    """A query rendered once, with named parameters: `params(**values)` lists them in the SQL's own order.

    Built by `prepare`; the parameters that are not slots (constants of the
    query, such as status values) keep the value they were rendered with.
    """

    __slots__ = ("sql", "_order")

    def __init__(self, sql: str, order: list[tuple[bool, Any]]) -> None:
        self.sql = sql
        self._order = order  # (is a slot, its name or the constant)

    def params(self, **values: Any) -> list[Any]:
        return [values[name] if is_slot else name for is_slot, name in self._order]


#: First sentinel of each slot type (`prepare`): values no query of ours holds as a constant.
_SLOT_BASES: dict[type, Any] = {str: "\x00slot:", int: 9_000_000_000_000, float: 1.5e15}


def prepare(build: Callable[[Callable[[str, type], Any]], Any]) -> Prepared:
    """Render the query `build(slot)` makes once; ``slot(name, type)`` marks where a value goes.

    Each slot is rendered as a distinct sentinel value of its type (peewee
    converts values by column type, so a string would not survive a float
    column), then found again among the rendered parameters. `ValueError`
    if a slot did not come through as a parameter.
    """
    sentinels: dict[Any, str] = {}

    def slot(name: str, kind: type) -> Any:
        base = _SLOT_BASES[kind]
        value = f"{base}{len(sentinels)}" if kind is str else base + len(sentinels)
        sentinels[value] = name
        return value

    sql, rendered = build(slot).sql()
    order: list[tuple[bool, Any]] = []
    for value in rendered:
        name = sentinels.get(value) if type(value) in _SLOT_BASES else None
        order.append((True, name) if name is not None else (False, value))
    missing = set(sentinels.values()) - {name for is_slot, name in order if is_slot}
    if missing:
        raise ValueError(f"prepare: slot(s) {sorted(missing)} did not render as parameters")
    return Prepared(sql, order)


def render_sql(query: Any) -> str:
    """A peewee query's SQL text, its values left as parameters (pass them in the query's own order)."""
    sql, _params = query.sql()
    return sql
