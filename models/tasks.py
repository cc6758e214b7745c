"""`TaskWrites`: a task's life outside its steps: create, snapshot, rerun, cancel, delete, prune.

Each call is one transaction. A write that reads a task before changing it
reads the row locked (`StoreContext.task_row(for_update=True)`), so it
cannot race a worker's checkpoint of the same task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from peewee import __exception_wrapper__

from .codec import message_rows
from .context import StoreContext
from .errors import TaskNotResumable
from .journal import close_open_step
from .leases import StepBoundary, require_lease, step_boundary
from .schemas import TaskSnapshot, TaskSpec, TaskStatus
from .tables import EXECUTION, NO_LEASE, RESUMABLE
from .task_ends import count_end
from .trace_store import TraceStore

_TERMINAL_VALUES = tuple(s.value for s in TaskStatus if s.is_terminal)


@dataclass(frozen=True)
class NewTask:
    """A validated task to store as `queued` (`TaskStore.create_tasks`): its identity and its spec."""

    task_id: str
    thread_id: str
    channel: str
    provider: str
    model: str
    spec: TaskSpec


class TaskWrites:
    """Creating, replacing, rerunning, cancelling and deleting tasks."""

    def __init__(self, ctx: StoreContext, traces: TraceStore) -> None:
        self.ctx = ctx
        self.traces = traces

    def create(self, *, task_id: str, thread_id: str, channel: str, provider: str, model: str,
               spec: TaskSpec) -> bool:
        """Store a new `queued` task with its spec. False if the id exists (nothing changes)."""
        ident = TaskSnapshot(task_id=task_id, thread_id=thread_id, channel=channel, provider=provider,
                             model=model, status=TaskStatus.QUEUED)
        Task = self.ctx.tables.Task
        now = self.ctx.clock()
        with self.ctx.db.atomic():
            # INSERT OR IGNORE / ON CONFLICT DO NOTHING: two processes creating
            # one id at once get one row and one False, on either backend.
            inserted = Task.insert(
                task_id=ident.task_id, thread_id=ident.thread_id, channel=ident.channel,
                provider=ident.provider, model=ident.model, status=TaskStatus.QUEUED.value,
                spec=spec.model_dump_json(), created_at=now, updated_at=now, delivery_due_at=now,
            ).on_conflict_ignore().as_rowcount().execute()
        return inserted > 0

    def create_many(self, tasks: Sequence[NewTask]) -> list[str]:
        """Store new `queued` tasks in one transaction; the ids stored (not those that existed already).

        One SELECT per 500 ids finds the existing ones and one prepared
        INSERT, run by ``executemany``, stores the rest (``ON CONFLICT DO
        NOTHING`` as in `create`),
        so a batch costs a few statements and one commit, not one each. Task
        ids must be distinct (`ValueError` otherwise). All or nothing: an
        error stores none of them.
        """
        ids = [task.task_id for task in tasks]
        if len(set(ids)) != len(ids):
            raise ValueError("tasks: task ids must be distinct")
        ctx = self.ctx
        Task, sql = ctx.tables.Task, ctx.sql
        now = ctx.clock()
        with ctx.db.atomic():
            existing: set[str] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                existing.update(row[0] for row in Task.select(Task.task_id).where(Task.task_id.in_(chunk)).tuples())
            rows = [{**sql.new_task_defaults, **dict(
                        task_id=task.task_id, thread_id=task.thread_id, channel=task.channel, provider=task.provider,
                        model=task.model, status=TaskStatus.QUEUED.value, spec=task.spec.model_dump_json(),
                        created_at=now, updated_at=now, delivery_due_at=now)}
                    for task in tasks if task.task_id not in existing]
            # One prepared INSERT, run with every row (executemany): rendering a multi-row peewee
            # insert cost more than storing the rows.
            with __exception_wrapper__:
                ctx.db.cursor().executemany(sql.insert_task, [
                    tuple(row.get(name) for name in sql.new_task_columns) for row in rows])
        return [row["task_id"] for row in rows]

    def save_snapshot(self, snapshot: TaskSnapshot, *, lease_token: Optional[str] = None) -> None:
        """Upsert a task's visible state (see `TaskStore.save_snapshot`)."""
        snapshot = TaskSnapshot.model_validate(snapshot)
        ctx = self.ctx
        Task, Message = ctx.tables.Task, ctx.tables.Message
        now = ctx.clock()
        with ctx.db.atomic():
            row = ctx.locked_task_row(snapshot.task_id)
            if row is not None:
                require_lease(snapshot.task_id, row.lease_token, lease_token)
            rerun = (row is not None and snapshot.status is TaskStatus.RUNNING
                     and TaskStatus(row.status).is_terminal)
            fields: dict[str, Any] = dict(
                thread_id=snapshot.thread_id, channel=snapshot.channel, provider=snapshot.provider,
                model=snapshot.model, status=snapshot.status.value,
                latest_checkpoint_note=snapshot.latest_checkpoint_note,
                final_response=snapshot.final_response, last_error=snapshot.last_error, updated_at=now,
                completed_at=now if snapshot.status.is_terminal else None,
            )
            if snapshot.status.is_terminal:
                fields.update(NO_LEASE)
            if row is None:
                # A concurrent creator of the same id wins the insert; this snapshot then updates its row.
                Task.insert(task_id=snapshot.task_id, created_at=now, **fields).on_conflict_ignore().as_rowcount(
                ).execute()
                row = ctx.locked_task_row(snapshot.task_id)
            counts = {EXECUTION: row.execution_count, RESUMABLE: row.resumable_count}
            if rerun:
                self._clear_run(snapshot.task_id, row.id)
                fields.update(checkpoint_count=0, recovery_count=0, cancel_requested=False, cancel_reason=None)
                counts = {EXECUTION: 0, RESUMABLE: 0}
            for history, messages in ((EXECUTION, snapshot.execution_history),
                                      (RESUMABLE, snapshot.resumable_history)):
                stored = counts[history]
                if len(messages) < stored:  # a shorter history replaces the stored one
                    if history == EXECUTION:
                        self.traces.inline_message_references(snapshot.task_id, row.id)
                    Message.delete().where((Message.task == row.id) & (Message.history == history)).execute()
                    stored = 0
                ctx.insert_messages(message_rows(row.id, history, stored, messages[stored:], None))
                counts[history] = len(messages)
            fields.update(execution_count=counts[EXECUTION], resumable_count=counts[RESUMABLE])
            Task.update(**fields).where(Task.id == row.id).execute()

    def rerun(self, task_id: str) -> None:
        """Make a finished task `queued` again, to run from step 1 (see `TaskStore.reset_for_rerun`)."""
        ctx = self.ctx
        Task = ctx.tables.Task
        now = ctx.clock()
        with ctx.db.atomic():
            row = ctx.task_row(task_id, for_update=True)
            if not TaskStatus(row.status).is_terminal:
                raise TaskNotResumable(task_id, row.status)
            self._clear_run(task_id, row.id)
            Task.update(
                status=TaskStatus.QUEUED.value, checkpoint_count=0, recovery_count=0, cancel_requested=False,
                cancel_reason=None,
                execution_count=0, resumable_count=0, latest_checkpoint_note=None, final_response=None,
                last_error=None, completed_at=None, started_at=None, updated_at=now, delivery_due_at=now,
                otel_trace_parent=None,  # a rerun is a new trace
                waiting_for=None, reply_due_at=None, steering=None, steered=None,
            ).where(Task.id == row.id).execute()

    def _clear_run(self, task_id: str, task_pk: int) -> None:
        """Delete a task's checkpoints and both histories, keeping their trace events readable as they were."""
        Checkpoint, Message = self.ctx.tables.Checkpoint, self.ctx.tables.Message
        self.traces.move_step_traces(task_id, task_pk)
        Checkpoint.delete().where(Checkpoint.task == task_pk).execute()
        self.traces.inline_message_references(task_id, task_pk)
        Message.delete().where(Message.task == task_pk).execute()

    def request_cancel(self, task_id: str, *, reason: Optional[str] = None) -> TaskStatus:
        """Cancel a task: at once if nobody runs it, else between its steps (see `TaskStore.request_cancel`).

        `reason` (default ``cancelled``) starts the task's `last_error`:
        ``"<reason> after step N"`` (or ``before it ran``).
        """
        ctx = self.ctx
        Task = ctx.tables.Task
        now = ctx.clock()
        with ctx.db.atomic():
            row = ctx.task_row(task_id, for_update=True)
            status = TaskStatus(row.status)
            if status.is_terminal:
                return status
            if row.lease_token is None or (row.lease_expires_at or 0) <= now:
                close_open_step(ctx, row.id, task_id, "the task was cancelled")
                steps = row.checkpoint_count
                Task.update(status=TaskStatus.CANCELLED.value, completed_at=now, updated_at=now,
                            last_error=f"{reason or 'cancelled'} {f'after step {steps}' if steps else 'before it ran'}",
                            **NO_LEASE).where(Task.id == row.id).execute()
                count_end(ctx, row, TaskStatus.CANCELLED.value)
                return TaskStatus.CANCELLED
            Task.update(cancel_requested=True, cancel_reason=reason, updated_at=now).where(Task.id == row.id).execute()
            return status

    def trace_parent(self, task_id: str) -> Optional[str]:
        """The OpenTelemetry trace parent the task's runs continue (see `keep_trace_parent`), or None."""
        Task = self.ctx.tables.Task
        row = Task.select(Task.otel_trace_parent).where(Task.task_id == task_id).tuples().first()
        return row[0] if row else None

    def keep_trace_parent(self, task_id: str, trace_parent: str) -> str:
        """Record the task's trace parent unless one is recorded already; returns the one recorded.

        A compare-and-set (``WHERE otel_trace_parent IS NULL``), unfenced:
        two runs racing (a takeover) agree on the first one written.
        """
        Task = self.ctx.tables.Task
        with self.ctx.db.atomic():
            Task.update(otel_trace_parent=trace_parent).where(
                (Task.task_id == task_id) & Task.otel_trace_parent.is_null()).execute()
        return self.trace_parent(task_id) or trace_parent

    def cancel_reason(self, task_id: str) -> Optional[str]:
        """None unless `request_cancel` asked the running task to stop; then its reason (``cancelled`` by default)."""
        row = self.ctx.db.execute_sql(self.ctx.sql.select_cancel_requested, (task_id,)).fetchone()
        if not (row and row[0]):
            return None
        return row[1] or "cancelled"

    def step_boundary(self, task_id: str) -> StepBoundary:
        """`cancel_reason`, and whether steering messages wait to be taken (`Waiting.take_steering`): one read."""
        row = self.ctx.db.execute_sql(self.ctx.sql.select_cancel_requested, (task_id,)).fetchone()
        return step_boundary(*row) if row else (None, False)

    def delete_by_thread_id(self, thread_id: str) -> int:
        """Delete every task of a thread with its checkpoints, messages and traces; returns how many tasks."""
        Task = self.ctx.tables.Task
        with self.ctx.db.atomic():
            return Task.delete().where(Task.thread_id == thread_id).execute()

    def prune(self, *, max_tasks: Optional[int] = None, older_than_s: Optional[float] = None,
              dry_run: bool = False) -> list[str]:
        """Delete the oldest finished tasks with all their data (see `TaskStore.prune`)."""
        if max_tasks is None and older_than_s is None:
            raise ValueError("prune: give max_tasks and/or older_than_s")
        if (max_tasks is not None and max_tasks < 0) or (older_than_s is not None and older_than_s < 0):
            raise ValueError("prune: max_tasks and older_than_s must not be negative")
        Task = self.ctx.tables.Task
        finished = Task.status.in_(_TERMINAL_VALUES)
        with self.ctx.db.atomic():
            doomed: set[str] = set()
            if older_than_s is not None:
                cutoff = self.ctx.clock() - older_than_s
                old = Task.select(Task.task_id).where(finished & (Task.completed_at < cutoff)).tuples()
                doomed.update(row[0] for row in old)
            if max_tasks is not None:
                beyond = (Task.select(Task.task_id).where(finished)
                          .order_by(Task.completed_at.desc(), Task.id.desc()).offset(max_tasks).tuples())
                doomed.update(row[0] for row in beyond)
            ids = sorted(doomed)
            if ids and not dry_run:
                for start in range(0, len(ids), 500):
                    Task.delete().where(finished & Task.task_id.in_(ids[start:start + 500])).execute()
        return ids
