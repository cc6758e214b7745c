"""`TaskReads`: tasks as records and summaries; what a resume rebuilds and what `show` and `tasks` print.

A whole record is read in one snapshot (`Dialect.read_snapshot`), so it is
consistent even while its task runs. The resume path (`load` without
checkpoints) reads each history with one prepared statement and builds
messages without validating them a second time: that is what keeps
rebuilding a 5,000-message task cheap.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any, Optional, Union

from peewee import Tuple

from .codec import (
    LoadedTexts,
    Texts,
    checkpoint_columns,
    checkpoint_record,
    decode_spec,
    decode_tool_calls,
    summary_fields,
)
from .context import StoreContext, StoredTexts, named_row
from .errors import CorruptRecord, InvalidInput, TaskNotFound
from .paging import Position, TaskPage, decode_cursor, encode_cursor
from .schemas import ChatMessage, TaskCheckpointRecord, TaskRecord, TaskSpec, TaskStatus, TaskSummary, stored_message
from .statements import LAST_STEP_COLUMN
from .tables import EXECUTION, RESUMABLE

#: Task ids per `IN (...)` when reading many specs: far below either backend's limit on parameters.
SPECS_PER_QUERY = 500


class TaskReads:
    """Reads of a store's tasks."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx

    def load(self, task_id: str, *, checkpoints: bool = True, latest_checkpoints: Optional[int] = None,
             histories: bool = True) -> Optional[TaskRecord]:
        """The record of a task, or None (see `TaskStore.load`)."""
        if latest_checkpoints is not None and latest_checkpoints < 0:
            raise ValueError(f"latest_checkpoints: must not be negative, got {latest_checkpoints!r}")
        ctx = self.ctx
        with ctx.dialect.read_snapshot():
            cursor = ctx.db.execute_sql(ctx.sql.select_task_row, (task_id,))
            values = cursor.fetchone()
            if values is None:
                return None
            # The row's columns by name, without a peewee model instance (a resume reads this).
            return self._record_from_row(named_row(cursor, values), with_checkpoints=checkpoints,
                                         latest=latest_checkpoints, with_histories=histories)

    def claimed(self, row: Any) -> TaskRecord:
        """The record (without checkpoints) of a task from the row its claim read (`LeaseBook.claim_row`).

        Only the histories are read (in one snapshot), and only if the task
        has any: the start of a new task makes no query here.
        """
        has_histories = bool(row.execution_count or row.resumable_count)
        with self.ctx.dialect.read_snapshot() if has_histories else contextlib.nullcontext():
            return self._record_from_row(row, with_checkpoints=False, latest=None, with_histories=True)

    def _record_from_row(self, row: Any, *, with_checkpoints: bool, latest: Optional[int],
                         with_histories: bool) -> TaskRecord:
        """`row` is `Statements.select_task_row`'s (or the claim's): every column and ``last_step_index``."""
        ctx = self.ctx
        histories: dict[int, list[ChatMessage]] = {EXECUTION: [], RESUMABLE: []}
        counts = {EXECUTION: row.execution_count, RESUMABLE: row.resumable_count}  # the next position of each
        # Every row is fetched before any is decoded: a corrupt cell raises
        # with no statement left open, so the connection's read snapshot ends
        # with the transaction and its next write does not hit a stale one.
        message_rows = {history: ctx.db.execute_sql(ctx.sql.select_history, (row.id, history)).fetchall()
                        for history in histories if counts[history]} if with_histories else {}
        checkpoint_rows = self._checkpoint_rows(row.id, latest) if with_checkpoints and latest != 0 else []
        last_step = getattr(row, LAST_STEP_COLUMN) or 0
        try:
            # No peewee row objects and no second validation per message.
            for history, rows in message_rows.items():
                histories[history] = [
                    stored_message(role, content, tool_call_id, name,
                                   None if tool_calls is None else decode_tool_calls(row.task_id, tool_calls))
                    for role, content, tool_call_id, name, tool_calls in rows
                ]
        except ValueError as exc:
            raise CorruptRecord(row.task_id, "message", str(exc)) from None
        # Item outputs stored once, in a message: from the history read above, else from the database
        # (position by position for a few latest checkpoints, the whole history at once for all of them).
        contents: Texts = (LoadedTexts(histories[EXECUTION]) if with_histories
                           else StoredTexts(ctx, row.id, whole_history=latest is None))
        checkpoints = [checkpoint_record(row.task_id, cp, contents) for cp in checkpoint_rows]
        # Every part is validated above; skip validating the 5,000-message lists again.
        return TaskRecord.model_construct(
            **summary_fields(row),
            spec=decode_spec(row.task_id, row.spec),
            execution_history=histories[EXECUTION],
            resumable_history=histories[RESUMABLE],
            latest_checkpoint_note=row.latest_checkpoint_note,
            cancel_requested=bool(row.cancel_requested),
            last_step_index=last_step,
            checkpoints=checkpoints,
        )

    def _checkpoint_rows(self, task_pk: int, latest: Optional[int]) -> list[Any]:
        """The task's checkpoint rows in step order: all, or only the `latest` (read newest first on the index)."""
        Checkpoint = self.ctx.tables.Checkpoint
        query = Checkpoint.select(*checkpoint_columns(Checkpoint)).where(Checkpoint.task == task_pk)
        if latest is None:
            return list(query.order_by(Checkpoint.step_index))
        return list(reversed(list(query.order_by(Checkpoint.step_index.desc()).limit(latest))))

    def get(self, task_id: str, *, checkpoints: bool = True, latest_checkpoints: Optional[int] = None,
            histories: bool = True) -> TaskRecord:
        """Like `load`, but raises `TaskNotFound`."""
        record = self.load(task_id, checkpoints=checkpoints, latest_checkpoints=latest_checkpoints,
                           histories=histories)
        if record is None:
            raise TaskNotFound(task_id)
        return record

    def load_by_thread_id(self, thread_id: str, *, exclude_task_id: Optional[str] = None) -> Optional[TaskRecord]:
        """The thread's most recently updated task, or None."""
        Task = self.ctx.tables.Task
        query = Task.select(Task.task_id).where(Task.thread_id == thread_id)
        if exclude_task_id is not None:
            query = query.where(Task.task_id != exclude_task_id)
        task_id = query.order_by(Task.updated_at.desc(), Task.id.desc()).limit(1).scalar()
        return None if task_id is None else self.load(task_id)

    def summary(self, task_id: str) -> TaskSummary:
        """A task without its histories (cheap to poll); `TaskNotFound` if missing."""
        return TaskSummary(**summary_fields(self.ctx.task_row(task_id)))

    def latest_checkpoint(self, task_id: str) -> Optional[TaskCheckpointRecord]:
        """The checkpoint with the highest step index, or None."""
        ctx = self.ctx
        Task, Checkpoint = ctx.tables.Task, ctx.tables.Checkpoint
        with ctx.dialect.read_snapshot():  # the checkpoint and the message text it refers to, from one snapshot
            row = (
                Checkpoint.select(*checkpoint_columns(Checkpoint))
                .join(Task, on=(Checkpoint.task == Task.id))
                .where(Task.task_id == task_id)
                .order_by(Checkpoint.step_index.desc())
                .first()
            )
            if row is None:
                return None
            return checkpoint_record(task_id, row, StoredTexts(ctx, row.task_id))

    def page_tasks(self, status: Union[TaskStatus, str, None], thread_id: Optional[str], limit: int, *,
                   offset: int, after: Optional[str], order_by: str, provider: Optional[str],
                   since: Optional[datetime], until: Optional[datetime]) -> TaskPage:
        """A page of tasks without their histories, newest first (see `TaskStore.page_tasks`).

        Two reads in one snapshot: the page's keys from the listing index
        (covering: ``(time, id)``, plus the filtered column on SQLite, whose
        indexes end in the rowid), then those rows by primary key. An offset
        then skips index entries, not whole rows.
        """
        if limit < 0 or offset < 0:
            raise ValueError("limit/offset: must not be negative")
        if after is not None and offset:
            raise InvalidInput("offset and after (--offset, --after): give one of them, not both")
        Task = self.ctx.tables.Task
        column = {"updated": Task.updated_at, "created": Task.created_at}.get(order_by)
        if column is None:
            raise ValueError(f"order_by: expected 'updated' or 'created', got {order_by!r}")
        keys = Task.select(Task.id, column)
        if status is not None:
            keys = keys.where(Task.status == TaskStatus(status).value)
        if thread_id is not None:
            keys = keys.where(Task.thread_id == thread_id)
        if provider is not None:
            keys = keys.where(Task.provider == provider)
        if since is not None:
            keys = keys.where(Task.created_at >= since.timestamp())
        if until is not None:
            keys = keys.where(Task.created_at < until.timestamp())
        if after is not None:
            position = decode_cursor(after, order_by=order_by)
            keys = keys.where(Tuple(column, Task.id) < Tuple(position.time_s, position.row_id))
        with self.ctx.dialect.read_snapshot():
            page = list(keys.order_by(column.desc(), Task.id.desc()).limit(limit).offset(offset).tuples())
            rows = {row.id: row for row in Task.select().where(Task.id.in_([row_id for row_id, _ in page]))} \
                if page else {}
        return TaskPage(tasks=[TaskSummary(**summary_fields(rows[row_id])) for row_id, _ in page],
                        cursors=[encode_cursor(Position(order_by, time_s, row_id)) for row_id, time_s in page])

    def count_tasks(self, status: Union[TaskStatus, str, None] = None) -> int:
        """How many tasks are stored (with this status)."""
        Task = self.ctx.tables.Task
        query = Task.select()
        if status is not None:
            query = query.where(Task.status == TaskStatus(status).value)
        return query.count()

    def task_spec(self, task_id: str) -> TaskSpec:
        """The spec a task was created with (`CorruptRecord` if it cannot be read)."""
        Task = self.ctx.tables.Task
        row = Task.select(Task.spec).where(Task.task_id == task_id).first()
        if row is None:
            raise TaskNotFound(task_id)
        return decode_spec(task_id, row.spec) or TaskSpec(prompt="(no prompt stored)")

    def task_specs(self, task_ids: list[str]) -> dict[str, Optional[TaskSpec]]:
        """The specs of these tasks, a few hundred per query: None for an unreadable spec, absent for a missing task."""
        Task = self.ctx.tables.Task
        specs: dict[str, Optional[TaskSpec]] = {}
        for start in range(0, len(task_ids), SPECS_PER_QUERY):
            chunk = task_ids[start:start + SPECS_PER_QUERY]
            for row in Task.select(Task.task_id, Task.spec).where(Task.task_id.in_(chunk)):
                try:
                    specs[row.task_id] = decode_spec(row.task_id, row.spec)
                except CorruptRecord:
                    specs[row.task_id] = None
        return specs

    def time_budgets(self, task_ids: list[str]) -> dict[str, tuple[Optional[float], Optional[float]]]:
        """`time_budget` of many tasks, a few hundred per query; an unreadable spec counts as no limit."""
        Task = self.ctx.tables.Task
        budgets: dict[str, tuple[Optional[float], Optional[float]]] = {}
        for start in range(0, len(task_ids), SPECS_PER_QUERY):
            chunk = task_ids[start:start + SPECS_PER_QUERY]
            for task_id, raw, started_at in Task.select(Task.task_id, Task.spec, Task.started_at).where(
                    Task.task_id.in_(chunk)).tuples():
                try:
                    spec = decode_spec(task_id, raw)
                except CorruptRecord:
                    spec = None
                budgets[task_id] = (spec.time_limit_s if spec else None), started_at
        return budgets

    def time_budget(self, task_id: str) -> tuple[Optional[float], Optional[float]]:
        """``(time_limit_s, started_at)`` of a task: its budget and when it first ran."""
        Task = self.ctx.tables.Task
        row = Task.select(Task.spec, Task.started_at).where(Task.task_id == task_id).first()
        if row is None:
            raise TaskNotFound(task_id)
        spec = decode_spec(task_id, row.spec)
        return (spec.time_limit_s if spec else None), row.started_at
