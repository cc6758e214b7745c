"""`Checkpoints`: the writes of a running task, each fenced by its lease: a step, appended messages, the end.

History is append-only: a checkpoint inserts only the messages its step
added (positions come from a counter on the task row), so step N of a long
task costs the same as step 1. `record` runs the statements `Statements`
rendered once; the rarer writes use the peewee models. Each write is one
transaction that first reads the task row locked (`Dialect.locked`), then
checks the lease (`require_lease`) on that row, so a takeover waits for a
write in flight instead of being overwritten by it. The step writes
(`record`, `journal_answer`, `journal_result`) decide everything on their
reads, before writing (`Dialect.locked_write`): on PostgreSQL a step write
is then two round trips. A lease holder's next step write presumes what its
last one left in the row and is sent as one fenced statement, one round
trip (`presumed_writes.py`); where the row holds anything else, it is
written the locked way. A task's end without an open step or a late steer
is a locked write too (`finish`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

from .codec import counters, items_json, message_rows, positions_by_text, usage_params
from .context import StoreContext, row_by_name
from .errors import TaskNotFound
from .journal import OpenStep, close_open_step, load_open_step
from .leases import StepBoundary, require_lease, step_boundary
from .presumed_writes import KnownRow, PresumedWrite
from .redact import redact_text
from .schemas import ChatMessage, CheckpointUpdate, TaskStatus, Usage
from .tables import EXECUTION, RESUMABLE
from .task_ends import count_end
from .trace_store import TraceStore
from .traces import PendingTraces
from .waiting import queue_late_steering


class Recorded(NamedTuple):
    """What `Checkpoints.record` did: whether it stored the step (False: already stored), and the step boundary
    (`TaskStore.step_boundary`) its locked read saw, the step loop's next one."""

    stored: bool
    boundary: StepBoundary


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
        journal: Optional[OpenStep] = None,
    ) -> Recorded:
        """Append one step's messages and checkpoint, in one transaction (see `TaskStore.record_checkpoint`).

        With `journal` (the step's answer already stored by `journal_answer`),
        `update.new_messages` is the whole step, and only the results the
        journal lacks are inserted, into their reserved positions; counters
        and usage were added with the answer.
        """
        if not isinstance(update, CheckpointUpdate):
            update = CheckpointUpdate.model_validate(update)
        ctx = self.ctx
        sql = ctx.sql
        now = ctx.clock()
        step = dict(update=update, traces=traces, usage=usage, journal=journal, lease_s=lease_s,
                    lease_expires_at=lease_expires_at, now=now)
        known = ctx.known_rows.get(update.task_id, lease_token)
        if known is not None and known.highest_step is not None and known.highest_step < update.step_index:
            sent = self._presumed(update.task_id, known, traces, lambda write: self._step_writes(
                write, task_pk=known.task_pk, execution_count=known.execution_count,
                trace_next_sequence=known.trace_next_sequence, in_step_order=True, **step))
            if sent is not None:
                boundary, (execution_count, trace_next_sequence) = sent
                ctx.known_rows.remember(update.task_id, known._replace(
                    execution_count=execution_count, trace_next_sequence=trace_next_sequence,
                    highest_step=update.step_index))
                return Recorded(stored=True, boundary=step_boundary(*boundary))
        reads = ((sql.select_task, (update.task_id,)), (sql.select_step_state, (update.step_index, update.task_id)))
        with ctx.dialect.locked_write() as write:
            # On PostgreSQL this locks the task row until commit: a claim by another worker waits, so the
            # token checked here still holds when the checkpoint commits, and the message positions cannot race.
            row, state = write.read(*reads)
            if row is None:
                require_lease(update.task_id, None, lease_token)
                write.execute_now(*ctx.tables.Task.insert(
                    task_id=update.task_id, thread_id=update.thread_id, channel=update.channel,
                    provider=update.provider, model=update.model, status=TaskStatus.RUNNING.value,
                    created_at=now, updated_at=now,
                ).on_conflict_ignore().sql())
                row, state = write.read(*reads)
            task_pk, execution_count, stored_token, trace_next_sequence, *boundary = row
            step_stored, highest_step = state
            require_lease(update.task_id, stored_token, lease_token)
            if step_stored:  # before the sequence check: a repeated step is a no-op, not an error
                return Recorded(stored=False, boundary=step_boundary(*boundary))
            self.traces.check_sequence(update.task_id, traces, trace_next_sequence)  # raising rolls all back
            # Reads find step traces in step order, so a step recorded below the highest stored one (never
            # the step loop) keeps its events in a row of their own.
            in_step_order = highest_step is None or highest_step < update.step_index
            after = self._step_writes(write, task_pk=task_pk, execution_count=execution_count,
                                      trace_next_sequence=trace_next_sequence, in_step_order=in_step_order, **step)
        if lease_token is not None:  # committed: the next step write of this lease may presume it
            ctx.known_rows.remember(update.task_id, KnownRow(
                lease_token, task_pk, *after, highest_step=max(update.step_index, -1 if highest_step is None
                                                               else highest_step)))
        return Recorded(stored=True, boundary=step_boundary(*boundary))

    def _step_writes(self, write: Any, *, update: CheckpointUpdate, task_pk: int, execution_count: int,
                     trace_next_sequence: int, in_step_order: bool, traces: Optional[PendingTraces],
                     usage: Optional[Usage], journal: Optional[OpenStep], lease_s: Optional[float],
                     lease_expires_at: Optional[float], now: float) -> tuple[int, int]:
        """Queue one step's writes on `write` (locked or presumed), decided from the row's values given;
        returns what the row holds after them: (execution_count, trace_next_sequence)."""
        ctx = self.ctx
        sql = ctx.sql
        # Text a tool item or trace event shares with this step's messages is stored once, in the message.
        first_position = execution_count if journal is None else journal.answer_position
        positions = positions_by_text(update.new_messages, first_position)
        # The step's trace events ride in its checkpoint row: no page of their own to write.
        in_row = bool(traces) and in_step_order
        trace = traces.encode_with_header(positions)[0] if in_row else None
        # Writes from here on: none needs an answer (on PostgreSQL they go with the sync, `locked_writes.py`).
        write.execute(
            sql.insert_checkpoint,
            (task_pk, update.step_index, update.checkpoint_note, items_json(update.items, positions), now,
             traces.first_sequence if in_row else None, trace),
        )
        if traces and not in_row:
            self.traces.insert(task_pk, traces, positions, write=write)
        if journal is None:
            write.execute_many(sql.insert_message, message_rows(task_pk, EXECUTION, execution_count,
                                                                update.new_messages, update.step_index))
            added, (turns, tool_calls) = len(update.new_messages), counters(update.new_messages)
        else:
            write.execute_many(sql.insert_message, [
                row for index, stored in enumerate(journal.results) if stored is None
                for row in message_rows(task_pk, EXECUTION, journal.result_position(index),
                                        [update.new_messages[1 + index]], update.step_index,
                                        tool_succeeded=_item_success(update, index))])
            added, turns, tool_calls = 0, 0, 0
        if lease_s is not None:  # read the clock now: the row lock above may have been waited for
            lease_expires_at = ctx.clock() + lease_s
        next_sequence = traces.last_sequence + 1 if traces else trace_next_sequence
        write.execute(
            sql.update_task_after_checkpoint,
            (
                update.thread_id, update.channel, update.provider, update.model,
                added, turns, tool_calls, *usage_params(usage),
                update.checkpoint_note, now, lease_expires_at, next_sequence, task_pk,
            ),
        )
        return execution_count + added, next_sequence

    def _presumed(self, task_id: str, known: KnownRow, traces: Optional[PendingTraces],
                  queue_writes: Callable[[PresumedWrite], tuple[int, int]]
                  ) -> Optional[tuple[tuple[Any, ...], tuple[int, int]]]:
        """A step write in one fenced statement (`presumed_writes.py`), its writes queued from `known` by
        `queue_writes`: (the step boundary's columns it returned, what the row holds after it).

        None where it was not sent (traces out of sequence with `known`,
        or `Dialect.presumed_write` declined) or the fence refused it
        (nothing written, `known` forgotten): the locked write goes next.
        """
        ctx = self.ctx
        if not _in_sequence(traces, known.trace_next_sequence):
            return None
        presumed = ctx.dialect.presumed_write(known)
        if presumed is None:
            return None
        after = queue_writes(presumed)
        try:
            boundary = presumed.send()
        except BaseException:
            ctx.known_rows.forget(task_id)  # the outcome is unknown: the next write reads the row
            raise
        if boundary is None:
            ctx.known_rows.forget(task_id)
            return None
        return boundary, after

    def journal_answer(self, task_id: str, step_index: int, answer: ChatMessage, *, lease_token: Optional[str],
                       lease_s: Optional[float] = None, traces: Optional[PendingTraces] = None,
                       usage: Optional[Usage] = None) -> OpenStep:
        """Store a model's answer before any of its tool calls runs; returns the step, open (see `TaskStore`)."""
        ctx = self.ctx
        calls = list(answer.tool_calls or ())
        answer_step = dict(step_index=step_index, answer=answer, lease_s=lease_s, traces=traces, usage=usage)
        known = ctx.known_rows.get(task_id, lease_token)
        if known is not None:
            sent = self._presumed(task_id, known, traces, lambda write: self._answer_writes(
                write, task_pk=known.task_pk, position=known.execution_count,
                trace_next_sequence=known.trace_next_sequence, **answer_step))
            if sent is not None:
                _boundary, (execution_count, trace_next_sequence) = sent
                ctx.known_rows.remember(task_id, known._replace(execution_count=execution_count,
                                                                trace_next_sequence=trace_next_sequence))
                return OpenStep(task_id=task_id, step_index=step_index, answer=answer,
                                answer_position=known.execution_count, results=(None,) * len(calls))
        with ctx.dialect.locked_write() as write:
            (row,) = write.read((ctx.sql.select_task, (task_id,)))
            require_lease(task_id, None if row is None else row[2], lease_token)
            if row is None:
                raise TaskNotFound(task_id)
            task_pk, position, _token, trace_next_sequence, *_boundary = row
            self.traces.check_sequence(task_id, traces, trace_next_sequence)
            after = self._answer_writes(write, task_pk=task_pk, position=position,
                                        trace_next_sequence=trace_next_sequence, **answer_step)
        if lease_token is not None:  # committed: the next step write of this lease may presume it
            known = ctx.known_rows.get(task_id, lease_token)
            ctx.known_rows.remember(task_id, KnownRow(lease_token, task_pk, *after,
                                                       highest_step=None if known is None else known.highest_step))
        return OpenStep(task_id=task_id, step_index=step_index, answer=answer, answer_position=position,
                        results=(None,) * len(calls))

    def _answer_writes(self, write: Any, *, task_pk: int, position: int, trace_next_sequence: int,
                       step_index: int, answer: ChatMessage, lease_s: Optional[float],
                       traces: Optional[PendingTraces], usage: Optional[Usage]) -> tuple[int, int]:
        """Queue a journaled answer's writes on `write` (locked or presumed), the answer at `position`;
        returns what the row holds after them: (execution_count, trace_next_sequence)."""
        ctx = self.ctx
        calls = len(answer.tool_calls or ())
        write.execute_many(ctx.sql.insert_message, message_rows(task_pk, EXECUTION, position, [answer], step_index))
        self.traces.insert(task_pk, traces, positions_by_text([answer], position), write=write)
        next_sequence = traces.last_sequence + 1 if traces else trace_next_sequence
        write.execute(ctx.sql.update_task_after_answer, (
            1 + calls, calls, *usage_params(usage), ctx.clock(),
            None if lease_s is None else ctx.clock() + lease_s, next_sequence, task_pk,
        ))
        return position + 1 + calls, next_sequence

    def journal_result(self, step: OpenStep, call_index: int, result: ChatMessage, *,
                       lease_token: Optional[str], success: Optional[bool] = None) -> OpenStep:
        """Store one tool result of an open step in its reserved position; returns the step with it."""
        ctx = self.ctx
        with ctx.dialect.locked_write() as write:
            (row,) = write.read((ctx.sql.select_lease_token, (step.task_id,)))
            require_lease(step.task_id, None if row is None else row[1], lease_token)
            if row is None:
                raise TaskNotFound(step.task_id)
            write.execute_many(ctx.sql.insert_message, message_rows(
                row[0], EXECUTION, step.result_position(call_index), [result], step.step_index,
                tool_succeeded=success))
        return step.with_result(call_index, result, succeeded=success)

    def open_step(self, task_id: str) -> Optional[OpenStep]:
        """The task's step whose answer is stored but not its checkpoint, or None."""
        row = self.ctx.task_row(task_id)
        with self.ctx.dialect.read_snapshot():
            return load_open_step(self.ctx, row.id, task_id)

    def append_histories(self, task_id: str, *, execution: Sequence[ChatMessage] = (),
                         resumable: Sequence[ChatMessage] = (), lease_token: Optional[str] = None,
                         traces: Optional[PendingTraces] = None) -> StepBoundary:
        """Append messages to a task's execution and resumable histories, and `traces`, in one transaction.

        A locked write (`Dialect.locked_write`) like a step's: a new task's
        opening histories are one of the two writes of its start, so on
        PostgreSQL they take two round trips, not six. Returns the step
        boundary (`TaskStore.step_boundary`) its locked read saw: what a new
        task's first step starts from, read as late as a read of its own.
        """
        ctx = self.ctx
        sql = ctx.sql
        with ctx.dialect.locked_write() as write:
            (row,) = write.read((sql.select_task_histories, (task_id,)))
            if row is None:
                raise TaskNotFound(task_id)
            task_pk, execution_count, resumable_count, stored_token, trace_next_sequence, *boundary = row
            require_lease(task_id, stored_token, lease_token)
            self.traces.check_sequence(task_id, traces, trace_next_sequence)
            write.execute_many(sql.insert_message,
                               message_rows(task_pk, EXECUTION, execution_count, list(execution), None)
                               + message_rows(task_pk, RESUMABLE, resumable_count, list(resumable), None))
            self.traces.insert(task_pk, traces, {}, write=write)
            next_sequence = traces.last_sequence + 1 if traces else trace_next_sequence
            write.execute(sql.update_task_after_histories, (
                len(execution), len(resumable), next_sequence, ctx.clock(), task_pk))
        if lease_token is not None:  # committed: the first step write of this lease may presume it
            known = ctx.known_rows.get(task_id, lease_token)
            ctx.known_rows.remember(task_id, KnownRow(lease_token, task_pk, execution_count + len(execution),
                                                      next_sequence, None if known is None else known.highest_step))
        return step_boundary(*boundary)

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
        ctx.known_rows.forget(task_id)  # no step of it comes after its end
        ending = dict(status=status, final_response=final_response, last_error=last_error,
                      new_messages=new_messages, resumable_messages=resumable_messages, traces=traces,
                      usage=usage, now=now)
        # Most ends (the step loop's final answer) have no open step to close and no late steer to queue:
        # decided on two reads, written as a step is (on PostgreSQL two round trips, `locked_writes.py`).
        with ctx.dialect.locked_write() as write:
            found, after_last_step = write.read((ctx.sql.select_task_locked, (task_id,)),
                                                (ctx.sql.select_messages_after_last_step, (task_id,)))
            if found is None:
                raise TaskNotFound(task_id)
            row = row_by_name(Task._meta.sorted_field_names, found)
            require_lease(task_id, row.lease_token, lease_token)
            self.traces.check_sequence(task_id, traces, row.trace_next_sequence)
            if not after_last_step[0] and not row.steering:
                self._end_writes(write, row, **ending)
                return
        with ctx.db.atomic():  # an open step to close, or a late steer: statement by statement
            row = ctx.task_row(task_id, for_update=True)
            require_lease(task_id, row.lease_token, lease_token)
            self.traces.check_sequence(task_id, traces, row.trace_next_sequence)
            close_open_step(ctx, row.id, task_id, _ended_because(status, last_error))
            self._end_writes(None, row, **ending)
            queue_late_steering(ctx, row, now)  # a steer that came after the last step boundary: its own task

    def _end_writes(self, write: Optional[Any], row: Any, *, status: TaskStatus, final_response: Optional[str],
                    last_error: Optional[str], new_messages: Sequence[ChatMessage],
                    resumable_messages: Sequence[ChatMessage], traces: Optional[PendingTraces],
                    usage: Optional[Usage], now: float) -> None:
        """The writes that end the task of `row`: its last messages and traces, the row, the end's count.

        On `write` (a locked write, its statements held until the commit), or
        with None as statements of the caller's transaction.
        """
        ctx = self.ctx
        rows = (message_rows(row.id, EXECUTION, row.execution_count, list(new_messages), None)
                + message_rows(row.id, RESUMABLE, row.resumable_count, list(resumable_messages), None))
        turns, tool_calls = counters(new_messages)
        update = (
            status.value, final_response, None if last_error is None else redact_text(last_error), now, now,
            row.execution_count + len(new_messages), row.resumable_count + len(resumable_messages),
            turns, tool_calls, traces.last_sequence + 1 if traces else row.trace_next_sequence,
            *usage_params(usage), row.id,
        )
        positions = positions_by_text(new_messages, row.execution_count)
        if write is None:
            ctx.insert_messages(rows)
            self.traces.insert(row.id, traces, positions)
            ctx.db.execute_sql(ctx.sql.update_task_at_end, update)
        else:
            write.execute_many(ctx.sql.insert_message, rows)
            self.traces.insert(row.id, traces, positions, write=write)
            write.execute(ctx.sql.update_task_at_end, update)
        count_end(ctx, row, status.value, write=write)


def _in_sequence(traces: Optional[PendingTraces], next_sequence: int) -> bool:
    """Whether `traces` may follow a row whose next trace sequence is `next_sequence` (`TraceStore.check_sequence`)."""
    return not traces or traces.first_sequence >= next_sequence


def _ended_because(status: TaskStatus, last_error: Optional[str]) -> str:
    """Why a task's pending tool calls never got their result: what its synthetic results say."""
    reason = f"the task ended ({status.value})"
    return f"{reason}: {redact_text(last_error)}" if last_error else reason


def _item_success(update: CheckpointUpdate, call_index: int) -> Optional[bool]:
    """The success flag of the step's item for call `call_index`, stored with its result; None if no such item."""
    return update.items[call_index].success if call_index < len(update.items) else None
