"""`Checkpoints`: the writes of a running task, each fenced by its lease: a step, appended messages, the end.

History is append-only: a checkpoint inserts only the messages its step
added (positions come from a counter on the task row), so step N of a long
task costs the same as step 1. `record` runs the statements `Statements`
rendered once; the rarer writes use the peewee models. Each write is one
transaction that first reads the task row locked (`Dialect.locked`), then
checks the lease (`require_lease`) on that row, so a takeover waits for a
write in flight instead of being overwritten by it.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .codec import USAGE_FIELDS, counters, items_json, message_rows, positions_by_text, usage_params
from .context import StoreContext
from .leases import require_lease
from .redact import redact_text
from .schemas import ChatMessage, CheckpointUpdate, TaskStatus, Usage
from .tables import EXECUTION, NO_LEASE, RESUMABLE
from .trace_store import TraceStore
from .traces import PendingTraces


class Checkpoints:
    """Fenced writes of running tasks."""

    def __init__(self, ctx: StoreContext, traces: TraceStore) -> None:
        self.ctx = ctx
        self.traces = traces

    def record(
        self,
        update: CheckpointUpdate,
        *,
        lease_token: Optional[str] = None,
        lease_expires_at: Optional[float] = None,
        lease_s: Optional[float] = None,
        traces: Optional[PendingTraces] = None,
        usage: Optional[Usage] = None,
    ) -> bool:
        """Append one step's messages and checkpoint, in one transaction (see `TaskStore.record_checkpoint`)."""
        if not isinstance(update, CheckpointUpdate):
            update = CheckpointUpdate.model_validate(update)
        ctx = self.ctx
        db, sql = ctx.db, ctx.sql
        now = ctx.clock()
        with db.atomic():
            # On PostgreSQL this locks the task row until commit: a claim by
            # another worker waits, so the token checked here still holds when
            # the checkpoint commits, and the message positions cannot race.
            row = db.execute_sql(sql.select_task, (update.task_id,)).fetchone()
            if row is None:
                require_lease(update.task_id, None, lease_token)
                ctx.tables.Task.insert(
                    task_id=update.task_id, thread_id=update.thread_id, channel=update.channel,
                    provider=update.provider, model=update.model, status=TaskStatus.RUNNING.value,
                    created_at=now, updated_at=now,
                ).on_conflict_ignore().as_rowcount().execute()
                row = db.execute_sql(sql.select_task, (update.task_id,)).fetchone()
            task_pk, execution_count, stored_token, trace_next_sequence, highest_step = row
            require_lease(update.task_id, stored_token, lease_token)
            # Text a tool item or trace event shares with this step's messages is stored once, in the message.
            positions = positions_by_text(update.new_messages, execution_count)
            # The step's trace events ride in its checkpoint row: no page of their own to write. Reads
            # find step traces in step order, so a step recorded below the highest stored one (never
            # the step loop) keeps its events in a row of their own.
            in_step_order = bool(traces) and (highest_step is None or highest_step < update.step_index)
            trace = traces.encode_with_header(positions)[0] if in_step_order else None
            inserted = db.execute_sql(
                sql.insert_checkpoint,
                (task_pk, update.step_index, update.checkpoint_note, items_json(update.items, positions), now,
                 traces.first_sequence if in_step_order else None, trace),
            ).rowcount
            if inserted == 0:
                return False  # before the sequence check: a repeated step is a no-op, not an error
            self.traces.check_sequence(update.task_id, traces, trace_next_sequence)  # raising rolls all back
            if traces and not in_step_order:
                self.traces.insert(task_pk, traces, positions)
            ctx.insert_messages(message_rows(task_pk, EXECUTION, execution_count, update.new_messages,
                                             update.step_index))
            if lease_s is not None:  # read the clock now: the row lock above may have been waited for
                lease_expires_at = ctx.clock() + lease_s
            db.execute_sql(
                sql.update_task_after_checkpoint,
                (
                    update.thread_id, update.channel, update.provider, update.model,
                    len(update.new_messages), *counters(update.new_messages), *usage_params(usage),
                    update.checkpoint_note, now, lease_expires_at,
                    traces.last_sequence + 1 if traces else trace_next_sequence, task_pk,
                ),
            )
        return True

    def append_histories(self, task_id: str, *, execution: Sequence[ChatMessage] = (),
                         resumable: Sequence[ChatMessage] = (), lease_token: Optional[str] = None) -> None:
        """Append messages to a task's execution and resumable histories, in one transaction."""
        ctx = self.ctx
        Task = ctx.tables.Task
        with ctx.db.atomic():
            row = ctx.task_row(task_id, for_update=True)
            require_lease(task_id, row.lease_token, lease_token)
            ctx.insert_messages(message_rows(row.id, EXECUTION, row.execution_count, list(execution), None)
                                + message_rows(row.id, RESUMABLE, row.resumable_count, list(resumable), None))
            Task.update(execution_count=Task.execution_count + len(execution),
                        resumable_count=Task.resumable_count + len(resumable),
                        updated_at=ctx.clock()).where(Task.id == row.id).execute()

    def finish(
        self,
        task_id: str,
        status: TaskStatus,
        *,
        final_response: Optional[str] = None,
        last_error: Optional[str] = None,
        new_messages: Sequence[ChatMessage] = (),
        resumable_messages: Sequence[ChatMessage] = (),
        lease_token: Optional[str] = None,
        traces: Optional[PendingTraces] = None,
        usage: Optional[Usage] = None,
    ) -> None:
        """Move a task to a terminal status with its last messages, traces and usage (see `TaskStore.finish`)."""
        status = TaskStatus(status)
        if not status.is_terminal:
            raise ValueError(f"status: finish() needs a terminal status, got {status.value!r}")
        ctx = self.ctx
        Task = ctx.tables.Task
        now = ctx.clock()
        with ctx.db.atomic():
            row = ctx.task_row(task_id, for_update=True)
            require_lease(task_id, row.lease_token, lease_token)
            self.traces.check_sequence(task_id, traces, row.trace_next_sequence)
            ctx.insert_messages(
                message_rows(row.id, EXECUTION, row.execution_count, list(new_messages), None)
                + message_rows(row.id, RESUMABLE, row.resumable_count, list(resumable_messages), None)
            )
            self.traces.insert(row.id, traces, positions_by_text(new_messages, row.execution_count))
            turns, tool_calls = counters(new_messages)
            added = usage or Usage()
            Task.update(
                status=status.value, final_response=final_response,
                last_error=None if last_error is None else redact_text(last_error),
                updated_at=now, completed_at=now,
                execution_count=row.execution_count + len(new_messages),
                resumable_count=row.resumable_count + len(resumable_messages),
                turn_count=Task.turn_count + turns, tool_call_count=Task.tool_call_count + tool_calls,
                trace_next_sequence=traces.last_sequence + 1 if traces else row.trace_next_sequence,
                **{name: getattr(Task, name) + getattr(added, name) for name in USAGE_FIELDS},
                **NO_LEASE,
            ).where(Task.id == row.id).execute()
