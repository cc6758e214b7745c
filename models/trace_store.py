"""`TraceStore`: trace events written with a task's steps, and read back in sequence order.

Two places hold a task's events: a step's own events ride in its checkpoint
row (`Checkpoint.trace`, no row of their own to write), and events written
outside a step (a start, a resume, an end, a shutdown) get a `trace_batch`
row each. Reads merge both in sequence order. Sequence numbers continue
across resumes and processes from a counter on the task row, and a batch
numbered before the stored events is refused (`TraceSequenceClash`), which
rolls back the whole write it came with.
"""

from __future__ import annotations

from typing import Optional

from .codec import (
    decode_items,
    inlined_events,
    items_json,
    stored_events,
    stored_step_trace,
    to_datetime,
    with_texts,
)
from .context import StoreContext, StoredTexts
from .errors import TaskNotFound, TraceSequenceClash
from .leases import require_lease
from .locked_writes import LockedWrite
from .traces import PendingTraces, StoredBatch, StoredEvent, TraceEventRecord, step_trace_json


class TraceStore:
    """Trace batches of a store's tasks."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx

    # -- writes (inside the caller's transaction unless said otherwise) ----------

    @staticmethod
    def check_sequence(task_id: str, traces: Optional[PendingTraces], next_sequence: int) -> None:
        """`TraceSequenceClash` if `traces` start before `next_sequence`: sequences never repeat or go back."""
        if traces and traces.first_sequence < next_sequence:
            raise TraceSequenceClash(task_id, traces.first_sequence, next_sequence)

    def insert(self, task_pk: int, traces: Optional[PendingTraces], positions: dict[str, int], *,
               write: Optional[LockedWrite] = None) -> None:
        """Store a writer's events as one `trace_batch` row (checked by `check_sequence` first).

        `write`: the step write (`Dialect.locked_write`) the row goes with; else a statement of the caller's
        transaction.
        """
        if not traces:
            return
        events, refers = traces.encode(positions)
        row = (
            task_pk, traces.first_sequence, traces.last_sequence, traces.started_at, traces.agent, traces.model,
            traces.job_type, events, refers,
        )
        if write is None:
            self.ctx.db.execute_sql(self.ctx.sql.insert_trace_batch, row)
        else:
            write.execute(self.ctx.sql.insert_trace_batch, row)

    def append(self, task_id: str, traces: PendingTraces, *, lease_token: Optional[str] = None) -> None:
        """Write trace events outside a checkpoint (a resume, a shutdown) in a transaction; fenced like checkpoints."""
        if not traces:
            return
        ctx = self.ctx
        Task = ctx.tables.Task
        with ctx.db.atomic():
            row = ctx.task_row(task_id, for_update=True)
            require_lease(task_id, row.lease_token, lease_token)
            self.check_sequence(task_id, traces, row.trace_next_sequence)
            self.insert(row.id, traces, {})
            Task.update(trace_next_sequence=traces.last_sequence + 1).where(Task.id == row.id).execute()

    # -- reads -----------------------------------------------------------------------

    def next_sequence(self, task_id: str) -> int:
        """The sequence number after the highest stored for the task (0 if none)."""
        Task = self.ctx.tables.Task
        return Task.select(Task.trace_next_sequence).where(Task.task_id == task_id).scalar() or 0

    def events(self, task_id: str, *, after_sequence: int = -1, limit: Optional[int] = None) -> list[TraceEventRecord]:
        """The task's trace events in sequence order, those after `after_sequence` only.

        Text stored once, in a message, comes back in its event, redacted
        like the rest of the event's data. One read snapshot.
        """
        ctx = self.ctx
        Task = ctx.tables.Task
        with ctx.dialect.read_snapshot():
            task_pk = Task.select(Task.id).where(Task.task_id == task_id).scalar()
            if task_pk is None:
                raise TaskNotFound(task_id)
            batches = self.batches(task_id, task_pk, after_sequence=after_sequence, limit=limit)
            wanted = {position for _row, events in batches for *_, refs in events for position in refs.values()}
            texts = ctx.execution_texts(task_pk, wanted)
        records: list[TraceEventRecord] = []
        for (_first, started_at, agent, model, job_type, _raw), events in batches:
            for sequence, ms, event_type, data, refs in events:
                if sequence <= after_sequence:
                    continue
                if limit is not None and len(records) == limit:
                    return records
                records.append(TraceEventRecord(
                    task_id=task_id, sequence=sequence, recorded_at=to_datetime(started_at + ms / 1000),
                    elapsed_ms=max(0.0, ms), agent=agent, model=model, job_type=job_type,
                    event_type=event_type, data=with_texts(task_id, data, refs, texts),
                ))
        return records

    def batches(self, task_id: str, task_pk: int, *, after_sequence: int = -1,
                limit: Optional[int] = None) -> list[tuple[StoredBatch, list[StoredEvent]]]:
        """The task's trace batches holding events after `after_sequence`, in sequence order, decoded.

        Two sources: `trace_batch` rows (seeked by last sequence) and the
        checkpoints' step traces, numbered in step order, so the scan
        starts at the step that holds ``after_sequence`` (found walking back
        from the latest step: a follower's seek stops at once). Each source
        gives at most `limit` batches: enough, as a batch holds an event.
        References to message text are left as references (see `events`).
        """
        TraceBatch, Checkpoint = self.ctx.tables.TraceBatch, self.ctx.tables.Checkpoint
        query = (TraceBatch.select(TraceBatch.first_sequence, TraceBatch.started_at, TraceBatch.agent,
                                   TraceBatch.model, TraceBatch.job_type, TraceBatch.events)
                 .where((TraceBatch.task == task_pk) & (TraceBatch.last_sequence > after_sequence))
                 .order_by(TraceBatch.last_sequence))
        batches: list[StoredBatch] = list(query.limit(limit).tuples() if limit is not None else query.tuples())
        traced = (Checkpoint.task == task_pk) & Checkpoint.trace.is_null(False)
        steps = (Checkpoint.select(Checkpoint.trace_first_sequence, Checkpoint.trace).where(traced)
                 .order_by(Checkpoint.step_index))
        if after_sequence >= 0:
            start = (Checkpoint.select(Checkpoint.step_index)
                     .where(traced & (Checkpoint.trace_first_sequence <= after_sequence))
                     .order_by(Checkpoint.step_index.desc()).limit(1).scalar())
            if start is not None:
                steps = steps.where(Checkpoint.step_index >= start)
        if limit is not None:
            steps = steps.limit(limit + 1)  # the first may hold only events already seen
        batches.extend(stored_step_trace(task_id, first, raw) for first, raw in steps.tuples())
        batches.sort(key=lambda batch: batch[0])
        return [(batch, stored_events(task_id, batch[0], batch[5])) for batch in batches]

    # -- before a task's checkpoints or messages are deleted ------------------------

    def _step_traces(self, task_id: str, task_pk: int) -> list[tuple[int, StoredBatch, list[StoredEvent]]]:
        """(checkpoint id, batch, decoded events) of every step trace of the task, in step order."""
        Checkpoint = self.ctx.tables.Checkpoint
        rows = list(Checkpoint.select(Checkpoint.id, Checkpoint.trace_first_sequence, Checkpoint.trace)
                    .where((Checkpoint.task == task_pk) & Checkpoint.trace.is_null(False))
                    .order_by(Checkpoint.step_index).tuples())
        traces = []
        for pk, first, raw in rows:
            batch = stored_step_trace(task_id, first, raw)
            traces.append((pk, batch, stored_events(task_id, first, batch[5])))
        return traces

    def move_step_traces(self, task_id: str, task_pk: int) -> None:
        """Before a rerun deletes the checkpoints: their step traces become `trace_batch` rows, text inlined."""
        texts = StoredTexts(self.ctx, task_pk, whole_history=True)
        moved = [
            dict(task=task_pk, first_sequence=first, last_sequence=events[-1][0], started_at=started_at,
                 agent=agent, model=model, job_type=job_type, events=inlined_events(task_id, events, texts),
                 refers_to_messages=False)
            for _pk, (first, started_at, agent, model, job_type, _raw), events in self._step_traces(task_id, task_pk)
            if events
        ]
        for start in range(0, len(moved), 100):
            self.ctx.tables.TraceBatch.insert_many(moved[start:start + 100]).execute()

    def inline_message_references(self, task_id: str, task_pk: int) -> None:
        """Copy referenced message text into the checkpoints and traces that point at it.

        Runs before a task's execution history is deleted (a rerun, a
        shorter snapshot): rare, so it may read the whole history.
        """
        Checkpoint, TraceBatch = self.ctx.tables.Checkpoint, self.ctx.tables.TraceBatch
        texts = StoredTexts(self.ctx, task_pk, whole_history=True)
        referring = (Checkpoint.select(Checkpoint.id, Checkpoint.step_index, Checkpoint.items)
                     .where((Checkpoint.task == task_pk) & Checkpoint.items.contains('"output_at"')).tuples())
        for pk, step_index, raw in list(referring):
            items = decode_items(task_id, step_index, raw, texts)
            Checkpoint.update(items=items_json(items, {})).where(Checkpoint.id == pk).execute()
        referring = (TraceBatch.select(TraceBatch.last_sequence, TraceBatch.first_sequence, TraceBatch.events)
                     .where((TraceBatch.task == task_pk) & (TraceBatch.refers_to_messages == True))  # noqa: E712
                     .tuples())
        for last_sequence, first_sequence, raw in list(referring):
            inlined = inlined_events(task_id, stored_events(task_id, first_sequence, raw), texts)
            TraceBatch.update(events=inlined, refers_to_messages=False).where(
                (TraceBatch.task == task_pk) & (TraceBatch.last_sequence == last_sequence)).execute()
        for pk, (_first, started_at, agent, model, job_type, _raw), events in self._step_traces(task_id, task_pk):
            if any(refs for *_, refs in events):
                trace = step_trace_json(started_at, agent, model, job_type, inlined_events(task_id, events, texts))
                Checkpoint.update(trace=trace).where(Checkpoint.id == pk).execute()
