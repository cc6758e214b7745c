"""`TaskStore`: durable task records, append-only histories, step checkpoints.

History is append-only: a checkpoint inserts only the messages its step
added (positions come from a counter on the task row), so step N of a long
task costs the same as step 1. The hot path (`record_checkpoint`) runs SQL
text built once per store from peewee queries, skipping per-call query
building; everything else uses the peewee models directly.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import orjson
from peewee import Database, IntegrityError, InterfaceError, OperationalError, __exception_wrapper__, fn
from pydantic import ValidationError

from . import migrations
from .db import DEFAULT_BUSY_TIMEOUT_MS, DEFAULT_POOL_SIZE, open_database, redact_url
from .errors import CorruptRecord, InvalidDatabaseUrl, LeaseLost, SchemaTooNew, TaskNotFound, TaskNotResumable
from .redact import redact_text
from .schemas import (
    ChatMessage,
    CheckpointItem,
    CheckpointUpdate,
    LeaseInfo,
    TaskCheckpointRecord,
    TaskRecord,
    TaskSnapshot,
    TaskSpec,
    TaskStatus,
    TaskSummary,
    ToolCall,
    Usage,
    stored_message,
)
from .tables import EXECUTION, NO_LEASE, RESUMABLE, SCHEMA_VERSION, Tables, bind_tables
from .traces import (
    MIN_REFERENCED_CHARS,
    PendingTraces,
    StoredBatch,
    StoredEvent,
    TraceEventRecord,
    decode_events,
    decode_step_trace,
    step_trace_json,
)

Clock = Callable[[], float]
_TERMINAL_VALUES = tuple(s.value for s in TaskStatus if s.is_terminal)
#: pg_advisory_xact_lock key that serialises schema creation and migration across processes and hosts.
_MIGRATION_LOCK_KEY = 0x6C6F6E67  # "long"


@dataclass(frozen=True)
class SchemaMigration:
    """What opening a store did to its schema: from `from_version` (0: empty database) to `to_version`."""

    from_version: int
    to_version: int

    @property
    def changed(self) -> bool:
        return self.from_version != self.to_version


def to_datetime(epoch_s: Optional[float]) -> Optional[datetime]:
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, tz=timezone.utc)


def _message_rows(task_pk: int, history: int, first_position: int, messages: Sequence[ChatMessage],
                  step_index: Optional[int]) -> list[tuple[Any, ...]]:
    return [
        (
            task_pk,
            history,
            first_position + offset,
            step_index,
            message.role,
            message.content,
            message.tool_call_id,
            message.name,
            None if message.tool_calls is None
            else orjson.dumps([call.model_dump() for call in message.tool_calls]).decode(),
        )
        for offset, message in enumerate(messages)
    ]


class TaskStore:
    """The durable state of every task, on SQLite or PostgreSQL.

    Safe to share between threads (each thread gets its own connection; on
    PostgreSQL, from a pool of `pool_size`) and between processes and hosts
    opening the same database. Every write is one transaction; a call that
    raises has changed nothing. Both backends give the same semantics: on
    SQLite writers are serialised by ``BEGIN IMMEDIATE``; on PostgreSQL a
    write that reads a task before changing it locks the task's row
    (``SELECT ... FOR UPDATE``), and multi-statement reads run in one
    REPEATABLE READ snapshot.

    Opening a store creates or upgrades its schema (`schema_migration` says
    from which version); a database written by a newer longhaul raises
    `SchemaTooNew`, and a PostgreSQL server that cannot be reached raises
    `InvalidDatabaseUrl`.
    """

    def __init__(
        self,
        url_or_path: Union[str, Path],
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        pool_size: int = DEFAULT_POOL_SIZE,
        clock: Clock = time.time,
    ) -> None:
        self.url = str(url_or_path)
        self.db: Database = open_database(url_or_path, busy_timeout_ms=busy_timeout_ms, pool_size=pool_size)
        self.tables: Tables = bind_tables(self.db)
        self.clock = clock
        if not self._is_sqlite:
            self._connect_or_explain()
        self.schema_migration: SchemaMigration = self._migrate_waiting_for_writers(busy_timeout_ms / 1000)
        self._sql = _HotPathSql(self.db, self.tables)
        # Connections are opened per thread on first use; close (not just
        # pool) this one, so a process that forks after construction does not
        # hand a live connection to its children.
        self.close_all()

    # -- lifecycle -----------------------------------------------------------

    def _connect_or_explain(self) -> None:
        """Connect now, so an unreachable server is one clear `InvalidDatabaseUrl`, not a driver traceback."""
        try:
            self.db.connect(reuse_if_open=True)
        except (OperationalError, InterfaceError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise InvalidDatabaseUrl(redact_url(self.url), f"cannot connect to PostgreSQL: {reason}") from None

    def _migrate_waiting_for_writers(self, timeout_s: float) -> SchemaMigration:
        """`_migrate`, retried while another process holds the lock.

        Switching a fresh file to WAL (a pragma run at connect) gets
        SQLITE_BUSY at once, without the busy handler, while another
        connection writes it: workers opening a new database together would
        crash at start-up. Retry until the busy timeout runs out instead.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._migrate()
            except OperationalError as exc:
                locked = "locked" in str(exc) or "busy" in str(exc)
                self.close()
                if not locked or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def _migrate(self) -> SchemaMigration:
        """Create the schema if missing and migrate an older one (idempotent); record the version.

        A current schema is only read: no DDL, no write lock. That matters
        on PostgreSQL, where even ``CREATE INDEX IF NOT EXISTS`` locks its
        table against writes, so every worker or CLI start would stall the
        running tasks' checkpoints (and could deadlock with them). Otherwise
        the whole migration is one transaction (DDL included; PostgreSQL
        under an advisory lock, as hosts starting together on a fresh
        database would race in ``CREATE TABLE IF NOT EXISTS``).
        """
        SchemaVersion = self.tables.SchemaVersion
        stored = self._stored_schema_version()
        if stored > SCHEMA_VERSION:
            raise SchemaTooNew(stored, SCHEMA_VERSION)
        if stored == SCHEMA_VERSION:
            return SchemaMigration(from_version=stored, to_version=stored)
        with self.db.atomic():
            if not self._is_sqlite:
                self.db.execute_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
            self.db.create_tables(self.tables.all, safe=True)
            found = SchemaVersion.select(fn.MAX(SchemaVersion.version)).scalar() or 0
            if found > SCHEMA_VERSION:
                raise SchemaTooNew(found, SCHEMA_VERSION)
            for version, migration in migrations.pending(found, SCHEMA_VERSION):
                migration(self.db, self.tables)
                SchemaVersion.insert(version=version, applied_at=self.clock()).on_conflict_ignore().execute()
            if found < SCHEMA_VERSION:
                SchemaVersion.insert(version=SCHEMA_VERSION, applied_at=self.clock()).on_conflict_ignore().execute()
        return SchemaMigration(from_version=found, to_version=max(found, SCHEMA_VERSION))

    def _stored_schema_version(self) -> int:
        """The recorded schema version, 0 for an empty database; reads only."""
        if not self.db.table_exists(self.tables.SchemaVersion._meta.table_name):
            return 0
        return self.schema_version()

    def schema_version(self) -> int:
        SchemaVersion = self.tables.SchemaVersion
        return SchemaVersion.select(fn.MAX(SchemaVersion.version)).scalar() or 0

    def close(self) -> None:
        """Close this thread's connection (other threads close their own); PostgreSQL's goes back to the pool."""
        if not self.db.is_closed():
            self.db.close()

    def close_all(self) -> None:
        """Close this thread's connection and, on PostgreSQL, every pooled one (other threads' included).

        For when the store is done with: at exit, before a fork, in tests.
        """
        self.close()
        close_pool = getattr(self.db, "close_all", None)
        if close_pool is not None:
            close_pool()

    def __enter__(self) -> TaskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()

    # -- writes --------------------------------------------------------------

    def create_task(
        self,
        *,
        task_id: str,
        thread_id: str,
        channel: str,
        provider: str,
        model: str,
        spec: TaskSpec,
    ) -> bool:
        """Store a new `queued` task with its spec. False if the id exists (nothing changes)."""
        ident = TaskSnapshot(task_id=task_id, thread_id=thread_id, channel=channel, provider=provider,
                             model=model, status=TaskStatus.QUEUED)
        Task = self.tables.Task
        now = self.clock()
        with self.db.atomic():
            # INSERT OR IGNORE / ON CONFLICT DO NOTHING: two processes creating
            # one id at once get one row and one False, on either backend.
            inserted = Task.insert(
                task_id=ident.task_id, thread_id=ident.thread_id, channel=ident.channel,
                provider=ident.provider, model=ident.model, status=TaskStatus.QUEUED.value,
                spec=spec.model_dump_json(), created_at=now, updated_at=now, delivery_due_at=now,
            ).on_conflict_ignore().as_rowcount().execute()
        return inserted > 0

    def save_snapshot(self, snapshot: TaskSnapshot, *, lease_token: Optional[str] = None) -> None:
        """Upsert a task's visible state.

        Histories are append-only: messages beyond those already stored are
        appended. A shorter history replaces the stored one, and so does any
        *rerun*: a `running` snapshot over a terminal task deletes its old
        checkpoints, zeroes `checkpoint_count`, clears `final_response` and
        `completed_at`, and starts the histories afresh. A terminal snapshot
        sets `completed_at` and releases the lease.
        """
        snapshot = TaskSnapshot.model_validate(snapshot)
        Task, Checkpoint, Message = self.tables.Task, self.tables.Checkpoint, self.tables.Message
        now = self.clock()
        with self.db.atomic():
            row = self._locked_task_row(snapshot.task_id)
            if row is not None and lease_token is not None and row.lease_token != lease_token:
                raise LeaseLost(snapshot.task_id)
            rerun = (
                row is not None
                and snapshot.status is TaskStatus.RUNNING
                and TaskStatus(row.status).is_terminal
            )
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
                row = self._locked_task_row(snapshot.task_id)
                task_pk = row.id
                counts = {EXECUTION: row.execution_count, RESUMABLE: row.resumable_count}
            else:
                task_pk = row.id
                counts = {EXECUTION: row.execution_count, RESUMABLE: row.resumable_count}
                if rerun:
                    self._move_step_traces(snapshot.task_id, task_pk)
                    Checkpoint.delete().where(Checkpoint.task == task_pk).execute()
                    fields.update(checkpoint_count=0, recovery_count=0, cancel_requested=False)
            for history, messages in ((EXECUTION, snapshot.execution_history),
                                      (RESUMABLE, snapshot.resumable_history)):
                stored = counts[history]
                if rerun or len(messages) < stored:
                    if history == EXECUTION:
                        self._inline_message_references(snapshot.task_id, task_pk)
                    Message.delete().where((Message.task == task_pk) & (Message.history == history)).execute()
                    stored = 0
                self._insert_messages(_message_rows(task_pk, history, stored, messages[stored:], None))
                counts[history] = len(messages)
            fields.update(execution_count=counts[EXECUTION], resumable_count=counts[RESUMABLE])
            Task.update(**fields).where(Task.id == task_pk).execute()

    def record_checkpoint(
        self,
        update: CheckpointUpdate,
        *,
        lease_token: Optional[str] = None,
        lease_expires_at: Optional[float] = None,
        traces: Optional[PendingTraces] = None,
        usage: Optional[Usage] = None,
    ) -> bool:
        """Append one step's messages and checkpoint, in one transaction.

        Creates the task if missing, increments `checkpoint_count` and sets
        status `running`. Idempotent per ``(task, step_index)``: recording a
        step that is already stored (a redelivered message) changes nothing
        and returns False; the first write wins. A None `checkpoint_note`
        keeps the previous note.

        With `lease_token`, the write happens only while that lease is held
        (else `LeaseLost`), and `lease_expires_at` renews it in the same
        statement. `traces` (from a `TraceWriter`) and the step's `usage` are
        written in the same transaction: a checkpoint and its trace events
        are stored together or not at all. Cost does not grow with the
        history already stored.
        """
        if not isinstance(update, CheckpointUpdate):
            update = CheckpointUpdate.model_validate(update)
        sql = self._sql
        now = self.clock()
        with self.db.atomic():
            # On PostgreSQL this locks the task row until commit: a claim by
            # another worker waits, so the token checked here still holds when
            # the checkpoint commits, and the message positions cannot race.
            row = self.db.execute_sql(sql.select_task, (update.task_id,)).fetchone()
            if row is None:
                if lease_token is not None:
                    raise LeaseLost(update.task_id)
                self.tables.Task.insert(
                    task_id=update.task_id, thread_id=update.thread_id, channel=update.channel,
                    provider=update.provider, model=update.model, status=TaskStatus.RUNNING.value,
                    created_at=now, updated_at=now,
                ).on_conflict_ignore().as_rowcount().execute()
                row = self.db.execute_sql(sql.select_task, (update.task_id,)).fetchone()
            task_pk, execution_count, stored_token, trace_next_sequence, highest_step = row
            if lease_token is not None and stored_token != lease_token:
                raise LeaseLost(update.task_id)
            # Text a tool item or trace event shares with this step's messages is stored once, in the message.
            positions = _positions_by_text(update.new_messages, execution_count)
            # The step's trace events ride in its checkpoint row: no page of their own to write. Reads
            # find step traces in step order, so a step recorded below the highest stored one (never
            # the step loop) keeps its events in a row of their own.
            in_step_order = bool(traces) and (highest_step is None or highest_step < update.step_index)
            trace = traces.encode_with_header(positions)[0] if in_step_order else None
            inserted = self.db.execute_sql(
                sql.insert_checkpoint,
                (task_pk, update.step_index, update.checkpoint_note, _items_json(update.items, positions), now,
                 traces.first_sequence if in_step_order else None, trace),
            ).rowcount
            if inserted == 0:
                return False  # before the sequence check: a repeated step is a no-op, not an error
            _check_trace_sequence(update.task_id, traces, trace_next_sequence)  # raising rolls all back
            if traces and not in_step_order:
                self._insert_traces(task_pk, traces, positions)
            self._insert_messages(
                _message_rows(task_pk, EXECUTION, execution_count, update.new_messages, update.step_index)
            )
            self.db.execute_sql(
                sql.update_task_after_checkpoint,
                (
                    update.thread_id, update.channel, update.provider, update.model,
                    len(update.new_messages), *_counters(update.new_messages), *_usage_params(usage),
                    update.checkpoint_note, now, lease_expires_at,
                    traces.last_sequence + 1 if traces else trace_next_sequence, task_pk,
                ),
            )
        return True

    def append_messages(
        self,
        task_id: str,
        messages: Sequence[ChatMessage],
        *,
        history: str = "execution",
        lease_token: Optional[str] = None,
    ) -> None:
        """Append messages to a task's execution or resumable history."""
        which = {"execution": EXECUTION, "resumable": RESUMABLE}[history]
        Task = self.tables.Task
        counter = Task.execution_count if which == EXECUTION else Task.resumable_count
        with self.db.atomic():
            row = self._task_row(task_id, for_update=True)
            if lease_token is not None and row.lease_token != lease_token:
                raise LeaseLost(task_id)
            start = row.execution_count if which == EXECUTION else row.resumable_count
            self._insert_messages(_message_rows(row.id, which, start, list(messages), None))
            Task.update({counter: counter + len(messages), Task.updated_at: self.clock()}).where(
                Task.id == row.id
            ).execute()

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
        """Move a task to a terminal status, appending its last messages, traces and usage.

        Releases the lease. With `lease_token`, only the lease holder may
        finish the task (else `LeaseLost`, nothing written). `last_error` is
        stored with secrets redacted.
        """
        status = TaskStatus(status)
        if not status.is_terminal:
            raise ValueError(f"status: finish() needs a terminal status, got {status.value!r}")
        Task = self.tables.Task
        now = self.clock()
        with self.db.atomic():
            row = self._task_row(task_id, for_update=True)
            if lease_token is not None and row.lease_token != lease_token:
                raise LeaseLost(task_id)
            _check_trace_sequence(task_id, traces, row.trace_next_sequence)
            self._insert_messages(
                _message_rows(row.id, EXECUTION, row.execution_count, list(new_messages), None)
                + _message_rows(row.id, RESUMABLE, row.resumable_count, list(resumable_messages), None)
            )
            self._insert_traces(row.id, traces, _positions_by_text(new_messages, row.execution_count))
            turns, tool_calls = _counters(new_messages)
            added = usage or Usage()
            Task.update(
                status=status.value, final_response=final_response,
                last_error=None if last_error is None else redact_text(last_error),
                updated_at=now, completed_at=now,
                execution_count=row.execution_count + len(new_messages),
                resumable_count=row.resumable_count + len(resumable_messages),
                turn_count=Task.turn_count + turns, tool_call_count=Task.tool_call_count + tool_calls,
                trace_next_sequence=traces.last_sequence + 1 if traces else row.trace_next_sequence,
                **{name: getattr(Task, name) + getattr(added, name) for name in _USAGE_FIELDS},
                **NO_LEASE,
            ).where(Task.id == row.id).execute()

    def append_traces(self, task_id: str, traces: PendingTraces, *, lease_token: Optional[str] = None) -> None:
        """Write trace events outside a checkpoint (a resume, a shutdown); fenced like checkpoints."""
        if not traces:
            return
        with self.db.atomic():
            row = self._task_row(task_id, for_update=True)
            if lease_token is not None and row.lease_token != lease_token:
                raise LeaseLost(task_id)
            _check_trace_sequence(task_id, traces, row.trace_next_sequence)
            self._insert_traces(row.id, traces, {})
            self.tables.Task.update(trace_next_sequence=traces.last_sequence + 1).where(
                self.tables.Task.id == row.id).execute()

    def next_trace_sequence(self, task_id: str) -> int:
        """The sequence number after the highest stored for the task (0 if none)."""
        Task = self.tables.Task
        return Task.select(Task.trace_next_sequence).where(Task.task_id == task_id).scalar() or 0

    def traces(self, task_id: str, *, after_sequence: int = -1, limit: Optional[int] = None) -> list[TraceEventRecord]:
        """The task's trace events in sequence order, those after `after_sequence` only.

        Text stored once, in a message, comes back in its event, redacted
        like the rest of the event's data.
        """
        Task = self.tables.Task
        with self._read_snapshot():
            task_pk = Task.select(Task.id).where(Task.task_id == task_id).scalar()
            if task_pk is None:
                raise TaskNotFound(task_id)
            batches = self._stored_batches(task_id, task_pk, after_sequence=after_sequence, limit=limit)
            wanted = {position for _row, events in batches for *_, refs in events for position in refs.values()}
            texts = self._execution_texts(task_pk, wanted)
        records: list[TraceEventRecord] = []
        for (_first, started_at, agent, model, job_type, _raw), events in batches:
            for sequence, ms, event_type, data, refs in events:
                if sequence <= after_sequence:
                    continue
                if limit is not None and len(records) == limit:
                    return records
                if refs:
                    data = {**data, **{key: redact_text(_text_at(task_id, texts, position))
                                       for key, position in refs.items()}}
                records.append(TraceEventRecord(
                    task_id=task_id, sequence=sequence, recorded_at=to_datetime(started_at + ms / 1000),
                    elapsed_ms=max(0.0, ms), agent=agent, model=model, job_type=job_type,
                    event_type=event_type, data=data,
                ))
        return records

    def reset_for_rerun(self, task_id: str) -> None:
        """Make a finished task `queued` again, to run from step 1.

        Its stale checkpoints and histories are deleted (the rerun semantics
        of `save_snapshot`); its spec is kept. Raises `TaskNotResumable` if
        the task has not finished (cancel it first).
        """
        Task = self.tables.Task
        with self.db.atomic():
            row = self._task_row(task_id, for_update=True)
            if not TaskStatus(row.status).is_terminal:
                raise TaskNotResumable(task_id, row.status)
            self.save_snapshot(TaskSnapshot(
                task_id=row.task_id, thread_id=row.thread_id, channel=row.channel, provider=row.provider,
                model=row.model, status=TaskStatus.RUNNING,
            ))
            Task.update(status=TaskStatus.QUEUED.value, started_at=None, last_error=None,
                        delivery_due_at=self.clock()).where(Task.id == row.id).execute()

    def request_cancel(self, task_id: str) -> TaskStatus:
        """Cancel a task: at once if nobody runs it, else between its steps.

        Returns the status after the call: `cancelled` when no live lease
        held it, `running` when the running worker will stop after its
        current step, or the terminal status it already had.
        """
        Task = self.tables.Task
        now = self.clock()
        with self.db.atomic():
            row = self._task_row(task_id, for_update=True)
            status = TaskStatus(row.status)
            if status.is_terminal:
                return status
            if row.lease_token is None or (row.lease_expires_at or 0) <= now:
                Task.update(status=TaskStatus.CANCELLED.value, completed_at=now, updated_at=now,
                            last_error="cancelled before it ran", **NO_LEASE).where(
                    Task.id == row.id).execute()
                return TaskStatus.CANCELLED
            Task.update(cancel_requested=True, updated_at=now).where(Task.id == row.id).execute()
            return status

    def is_cancel_requested(self, task_id: str) -> bool:
        """Whether `request_cancel` asked the running task to stop (checked between steps)."""
        row = self.db.execute_sql(self._sql.select_cancel_requested, (task_id,)).fetchone()
        return bool(row and row[0])

    def delete_by_thread_id(self, thread_id: str) -> int:
        """Delete every task of a thread with its checkpoints and messages; returns how many tasks."""
        Task = self.tables.Task
        with self.db.atomic():
            return Task.delete().where(Task.thread_id == thread_id).execute()

    def prune(self, *, max_tasks: Optional[int] = None, older_than_s: Optional[float] = None,
              dry_run: bool = False) -> list[str]:
        """Delete the oldest finished tasks with their checkpoints, messages and traces.

        Keeps the `max_tasks` most recently finished, and/or deletes those
        finished more than `older_than_s` seconds ago. Queued and running
        tasks are never touched. Returns the ids deleted (or, with
        `dry_run`, that would be).
        """
        if max_tasks is None and older_than_s is None:
            raise ValueError("prune: give max_tasks and/or older_than_s")
        if (max_tasks is not None and max_tasks < 0) or (older_than_s is not None and older_than_s < 0):
            raise ValueError("prune: max_tasks and older_than_s must not be negative")
        Task = self.tables.Task
        finished = Task.status.in_(_TERMINAL_VALUES)
        with self.db.atomic():
            doomed: set[str] = set()
            if older_than_s is not None:
                cutoff = self.clock() - older_than_s
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

    def delete_task(self, task_id: str) -> bool:
        Task = self.tables.Task
        with self.db.atomic():
            return Task.delete().where(Task.task_id == task_id).execute() > 0

    # -- reads ---------------------------------------------------------------

    def load(self, task_id: str, *, checkpoints: bool = True) -> Optional[TaskRecord]:
        """The whole record of a task, or None if no such task is stored.

        Read in one transaction: a consistent snapshot even while the task
        runs. ``checkpoints=False`` skips decoding every checkpoint's items
        (a resume needs only `last_step_index`), which is what keeps
        rebuilding a long task's state cheap.
        """
        with self._read_snapshot():
            cursor = self.db.execute_sql(self._sql.select_task_row, (task_id,))
            values = cursor.fetchone()
            if values is None:
                return None
            # The row's columns by name, without a peewee model instance (a resume reads this).
            row = SimpleNamespace(**dict(zip((column[0] for column in cursor.description), values, strict=True)))
            row.cancel_requested = bool(row.cancel_requested)
            return self._record_from_row(row, with_checkpoints=checkpoints)

    def get(self, task_id: str, *, checkpoints: bool = True) -> TaskRecord:
        """Like `load`, but raises `TaskNotFound`."""
        record = self.load(task_id, checkpoints=checkpoints)
        if record is None:
            raise TaskNotFound(task_id)
        return record

    def load_by_thread_id(self, thread_id: str, *, exclude_task_id: Optional[str] = None) -> Optional[TaskRecord]:
        """The thread's most recently updated task, or None."""
        Task = self.tables.Task
        query = Task.select(Task.task_id).where(Task.thread_id == thread_id)
        if exclude_task_id is not None:
            query = query.where(Task.task_id != exclude_task_id)
        task_id = query.order_by(Task.updated_at.desc(), Task.id.desc()).limit(1).scalar()
        return None if task_id is None else self.load(task_id)

    def summary(self, task_id: str) -> TaskSummary:
        """A task without its histories (cheap to poll); `TaskNotFound` if missing."""
        return TaskSummary(**self._summary_fields(self._task_row(task_id)))

    def latest_checkpoint(self, task_id: str) -> Optional[TaskCheckpointRecord]:
        """The checkpoint with the highest step index, or None."""
        Task, Checkpoint = self.tables.Task, self.tables.Checkpoint
        with self._read_snapshot():  # the checkpoint and the message text it refers to, from one snapshot
            row = (
                Checkpoint.select(*_checkpoint_columns(Checkpoint))
                .join(Task, on=(Checkpoint.task == Task.id))
                .where(Task.task_id == task_id)
                .order_by(Checkpoint.step_index.desc())
                .first()
            )
            if row is None:
                return None
            return self._checkpoint_from_row(task_id, row, _StoredTexts(self, row.task_id))

    def list_tasks(
        self,
        status: Union[TaskStatus, str, None] = None,
        thread_id: Optional[str] = None,
        limit: int = 100,
        *,
        offset: int = 0,
        order_by: str = "updated",
        provider: Optional[str] = None,
        since: Optional[datetime] = None,
        until: Optional[datetime] = None,
    ) -> list[TaskSummary]:
        """Tasks without their histories, newest first.

        `since`/`until` bound the creation time; `order_by` is ``updated``
        or ``created``.
        """
        if limit < 0 or offset < 0:
            raise ValueError("limit/offset: must not be negative")
        Task = self.tables.Task
        query = Task.select()
        if status is not None:
            query = query.where(Task.status == TaskStatus(status).value)
        if thread_id is not None:
            query = query.where(Task.thread_id == thread_id)
        if provider is not None:
            query = query.where(Task.provider == provider)
        if since is not None:
            query = query.where(Task.created_at >= since.timestamp())
        if until is not None:
            query = query.where(Task.created_at < until.timestamp())
        column = {"updated": Task.updated_at, "created": Task.created_at}.get(order_by)
        if column is None:
            raise ValueError(f"order_by: expected 'updated' or 'created', got {order_by!r}")
        rows = query.order_by(column.desc(), Task.id.desc()).limit(limit).offset(offset)
        return [TaskSummary(**self._summary_fields(row)) for row in rows]

    def count_tasks(self, status: Union[TaskStatus, str, None] = None) -> int:
        Task = self.tables.Task
        query = Task.select()
        if status is not None:
            query = query.where(Task.status == TaskStatus(status).value)
        return query.count()

    def task_spec(self, task_id: str) -> TaskSpec:
        """The spec a task was created with (`CorruptRecord` if it cannot be read)."""
        Task = self.tables.Task
        row = Task.select(Task.spec).where(Task.task_id == task_id).first()
        if row is None:
            raise TaskNotFound(task_id)
        return self._decode_spec(task_id, row.spec) or TaskSpec(prompt="(no prompt stored)")

    def time_budget(self, task_id: str) -> tuple[Optional[float], Optional[float]]:
        """``(time_limit_s, started_at)`` of a task: its budget and when it first ran."""
        Task = self.tables.Task
        row = Task.select(Task.spec, Task.started_at).where(Task.task_id == task_id).first()
        if row is None:
            raise TaskNotFound(task_id)
        spec = self._decode_spec(task_id, row.spec)
        return (spec.time_limit_s if spec else None), row.started_at

    # -- internals -----------------------------------------------------------

    @property
    def _is_sqlite(self) -> bool:
        return self.db.__class__.__name__.startswith("Sqlite")

    def _read_snapshot(self) -> AbstractContextManager[Any]:
        """A read transaction that sees one snapshot across its statements.

        SQLite (WAL): deferred, so a reader takes no write lock and its first
        read fixes the snapshot. PostgreSQL's READ COMMITTED takes a new
        snapshot per statement, so ask for REPEATABLE READ (a read-only
        transaction there never fails to serialise).
        """
        if self._is_sqlite:
            return self.db.atomic("DEFERRED")
        return self.db.atomic(isolation_level="REPEATABLE READ")

    def _locked_task_row(self, task_id: str) -> Any:
        """The task's row, locked until the transaction ends on PostgreSQL (SQLite's writer lock covers it)."""
        Task = self.tables.Task
        query = Task.select().where(Task.task_id == task_id)
        if self.db.for_update:
            query = query.for_update()
        return query.first()

    def _task_row(self, task_id: str, *, for_update: bool = False) -> Any:
        """The task's row (`TaskNotFound` if missing); `for_update` inside write transactions."""
        if for_update:
            row = self._locked_task_row(task_id)
        else:
            Task = self.tables.Task
            row = Task.get_or_none(Task.task_id == task_id)
        if row is None:
            raise TaskNotFound(task_id)
        return row

    def _insert_traces(self, task_pk: int, traces: Optional[PendingTraces], positions: dict[str, int]) -> None:
        """Store a writer's events as one row (checked by `_check_trace_sequence` first)."""
        if not traces:
            return
        events, refers = traces.encode(positions)
        self.db.execute_sql(self._sql.insert_trace_batch, (
            task_pk, traces.first_sequence, traces.last_sequence, traces.started_at, traces.agent, traces.model,
            traces.job_type, events, refers,
        ))

    def _stored_batches(self, task_id: str, task_pk: int, *, after_sequence: int = -1,
                        limit: Optional[int] = None) -> list[tuple[StoredBatch, list[StoredEvent]]]:
        """The task's trace batches holding events after `after_sequence`, in sequence order, decoded.

        Two sources: `trace_batch` rows (seeked by last sequence) and the
        checkpoints' step traces, numbered in step order, so the scan
        starts at the step that holds ``after_sequence`` (found walking back
        from the latest step: a follower's seek stops at once). Each source
        gives at most `limit` batches: enough, as a batch holds an event.
        """
        TraceBatch, Checkpoint = self.tables.TraceBatch, self.tables.Checkpoint
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
        batches.extend(self._decode_step_trace(task_id, first, raw) for first, raw in steps.tuples())
        batches.sort(key=lambda batch: batch[0])
        return [(batch, self._decode_batch(task_id, batch[0], batch[5])) for batch in batches]

    @staticmethod
    def _decode_step_trace(task_id: str, first_sequence: int, raw: str) -> StoredBatch:
        try:
            return decode_step_trace(first_sequence, raw)
        except ValueError as exc:
            raise CorruptRecord(task_id, f"checkpoint.trace[{first_sequence}]", str(exc)) from None

    def _step_traces(self, task_id: str, task_pk: int) -> list[tuple[int, StoredBatch, list[StoredEvent]]]:
        """(checkpoint id, batch, decoded events) of every step trace of the task, in step order."""
        Checkpoint = self.tables.Checkpoint
        rows = list(Checkpoint.select(Checkpoint.id, Checkpoint.trace_first_sequence, Checkpoint.trace)
                    .where((Checkpoint.task == task_pk) & Checkpoint.trace.is_null(False))
                    .order_by(Checkpoint.step_index).tuples())
        traces = []
        for pk, first, raw in rows:
            batch = self._decode_step_trace(task_id, first, raw)
            traces.append((pk, batch, self._decode_batch(task_id, first, batch[5])))
        return traces

    def _move_step_traces(self, task_id: str, task_pk: int) -> None:
        """Before a rerun deletes the checkpoints: their step traces become `trace_batch` rows, text inlined."""
        texts = _StoredTexts(self, task_pk, whole_history=True)
        moved = [
            dict(task=task_pk, first_sequence=first, last_sequence=events[-1][0], started_at=started_at,
                 agent=agent, model=model, job_type=job_type, events=_inlined_events(task_id, events, texts),
                 refers_to_messages=False)
            for _pk, (first, started_at, agent, model, job_type, _raw), events in self._step_traces(task_id, task_pk)
            if events
        ]
        for start in range(0, len(moved), 100):
            self.tables.TraceBatch.insert_many(moved[start:start + 100]).execute()

    @staticmethod
    def _decode_batch(task_id: str, first_sequence: int, raw: Any) -> list[Any]:
        try:
            return list(decode_events(first_sequence, raw))
        except ValueError as exc:
            raise CorruptRecord(task_id, f"trace_batch[{first_sequence}].events", str(exc)) from None

    def _execution_texts(self, task_pk: int, positions: Union[set[int], None]) -> dict[int, str]:
        """position -> content of the task's execution messages at `positions` (None: all of them)."""
        Message = self.tables.Message
        where = (Message.task == task_pk) & (Message.history == EXECUTION)
        if positions is None:
            return dict(Message.select(Message.position, Message.content).where(where).tuples())
        wanted, texts = sorted(positions), {}
        for start in range(0, len(wanted), 500):
            query = Message.select(Message.position, Message.content).where(
                where & Message.position.in_(wanted[start:start + 500]))
            texts.update(query.tuples())
        return texts

    def _inline_message_references(self, task_id: str, task_pk: int) -> None:
        """Copy referenced message text into the checkpoints and traces that point at it.

        Runs before a task's execution history is deleted (a rerun, a
        shorter snapshot): rare, so it may read the whole history.
        """
        Checkpoint, TraceBatch = self.tables.Checkpoint, self.tables.TraceBatch
        texts = _StoredTexts(self, task_pk, whole_history=True)
        referring = (Checkpoint.select(Checkpoint.id, Checkpoint.step_index, Checkpoint.items)
                     .where((Checkpoint.task == task_pk) & Checkpoint.items.contains('"output_at"')).tuples())
        for pk, step_index, raw in list(referring):
            items = self._decode_items(task_id, step_index, raw, texts)
            Checkpoint.update(items=_items_json(items, {})).where(Checkpoint.id == pk).execute()
        referring = (TraceBatch.select(TraceBatch.last_sequence, TraceBatch.first_sequence, TraceBatch.events)
                     .where((TraceBatch.task == task_pk) & (TraceBatch.refers_to_messages == True))  # noqa: E712
                     .tuples())
        for last_sequence, first_sequence, raw in list(referring):
            inlined = _inlined_events(task_id, self._decode_batch(task_id, first_sequence, raw), texts)
            TraceBatch.update(events=inlined, refers_to_messages=False).where(
                (TraceBatch.task == task_pk) & (TraceBatch.last_sequence == last_sequence)).execute()
        for pk, (_first, started_at, agent, model, job_type, _raw), events in self._step_traces(task_id, task_pk):
            if any(refs for *_, refs in events):
                trace = step_trace_json(started_at, agent, model, job_type, _inlined_events(task_id, events, texts))
                Checkpoint.update(trace=trace).where(Checkpoint.id == pk).execute()

    def _insert_messages(self, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            # Raw executemany, translated to peewee's exceptions like every other statement.
            with __exception_wrapper__:
                self.db.cursor().executemany(self._sql.insert_message, rows)

    def _summary_fields(self, row: Any) -> dict[str, Any]:
        lease = None
        if row.lease_token is not None:
            lease = LeaseInfo(owner=row.lease_owner or "", host=row.lease_host or "", pid=row.lease_pid or 0,
                              expires_at=to_datetime(row.lease_expires_at or 0))
        try:
            status = TaskStatus(row.status)
        except ValueError:
            raise CorruptRecord(row.task_id, "status", f"{row.status!r} is not a task status") from None
        return dict(
            task_id=row.task_id, thread_id=row.thread_id, channel=row.channel, provider=row.provider,
            model=row.model, status=status, checkpoint_count=row.checkpoint_count,
            message_count=row.execution_count, recovery_count=row.recovery_count,
            final_response=row.final_response, last_error=row.last_error,
            created_at=to_datetime(row.created_at), updated_at=to_datetime(row.updated_at),
            started_at=to_datetime(row.started_at), completed_at=to_datetime(row.completed_at), lease=lease,
            turn_count=row.turn_count, tool_call_count=row.tool_call_count,
            usage=Usage(**{name: getattr(row, name) for name in _USAGE_FIELDS}),
        )

    def _record_from_row(self, row: Any, *, with_checkpoints: bool = True) -> TaskRecord:
        Checkpoint = self.tables.Checkpoint
        histories: dict[int, list[ChatMessage]] = {EXECUTION: [], RESUMABLE: []}
        # Every row is fetched before any is decoded: a corrupt cell raises
        # with no statement left open, so the connection's read snapshot ends
        # with the transaction and its next write does not hit a stale one.
        message_rows = {history: self.db.execute_sql(self._sql.select_history, (row.id, history)).fetchall()
                        for history in histories}
        checkpoint_rows = list(
            Checkpoint.select(*_checkpoint_columns(Checkpoint)).where(Checkpoint.task == row.id)
            .order_by(Checkpoint.step_index)
        ) if with_checkpoints else []
        last_step = self.db.execute_sql(self._sql.select_last_step, (row.id,)).fetchone()[0] or 0
        try:
            # No peewee row objects and no second validation per message.
            for history, rows in message_rows.items():
                histories[history] = [
                    stored_message(role, content, tool_call_id, name,
                                   None if tool_calls is None else self._decode_tool_calls(row.task_id, tool_calls))
                    for role, content, tool_call_id, name, tool_calls in rows
                ]
        except ValueError as exc:
            raise CorruptRecord(row.task_id, "message", str(exc)) from None
        contents = _LoadedTexts(histories[EXECUTION])
        checkpoints = [self._checkpoint_from_row(row.task_id, cp, contents) for cp in checkpoint_rows]
        # Every part is validated above; skip validating the 5,000-message lists again.
        return TaskRecord.model_construct(
            **self._summary_fields(row),
            spec=self._decode_spec(row.task_id, row.spec),
            execution_history=histories[EXECUTION],
            resumable_history=histories[RESUMABLE],
            latest_checkpoint_note=row.latest_checkpoint_note,
            cancel_requested=bool(row.cancel_requested),
            last_step_index=last_step,
            checkpoints=checkpoints,
        )

    @staticmethod
    def _decode_spec(task_id: str, raw: Optional[str]) -> Optional[TaskSpec]:
        if raw is None:
            return None
        try:
            return TaskSpec.model_validate_json(raw)
        except ValidationError as exc:
            raise CorruptRecord(task_id, "spec", _first_error(exc)) from None

    @staticmethod
    def _decode_tool_calls(task_id: str, raw: str) -> list[ToolCall]:
        try:
            return [ToolCall.model_validate(call) for call in orjson.loads(raw)]
        except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
            raise CorruptRecord(task_id, "message.tool_calls", str(exc).splitlines()[0]) from None

    @classmethod
    def _checkpoint_from_row(cls, task_id: str, row: Any, texts: Texts) -> TaskCheckpointRecord:
        return TaskCheckpointRecord(step_index=row.step_index, checkpoint_note=row.checkpoint_note,
                                    items=cls._decode_items(task_id, row.step_index, row.items, texts),
                                    created_at=to_datetime(row.created_at))

    @staticmethod
    def _decode_items(task_id: str, step_index: int, raw: str, texts: Texts) -> list[CheckpointItem]:
        """A checkpoint's items; an output stored once, in the step's tool message, is read from `texts`."""
        try:
            items = orjson.loads(raw)
            for item in items:
                if "output_at" in item:
                    item["output"] = _text_at(task_id, texts, item.pop("output_at"))
            return [CheckpointItem.model_validate(item) for item in items]
        except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
            raise CorruptRecord(task_id, f"checkpoint[{step_index}].items", str(exc).splitlines()[0]) from None


_USAGE_FIELDS = tuple(Usage.model_fields)


def _checkpoint_columns(Checkpoint: Any) -> tuple[Any, ...]:
    """What loading a checkpoint reads: not its step trace, which can be long."""
    return (Checkpoint.task, Checkpoint.step_index, Checkpoint.checkpoint_note, Checkpoint.items,
            Checkpoint.created_at)

class Texts(Protocol):
    """position -> text of a task's execution messages (what stored references point at)."""

    def __getitem__(self, position: int) -> str: ...


class _LoadedTexts:
    """`Texts` of an execution history already loaded (positions are list indexes)."""

    def __init__(self, messages: list[ChatMessage]) -> None:
        self.messages = messages

    def __getitem__(self, position: int) -> str:
        if not (isinstance(position, int) and 0 <= position < len(self.messages)):
            raise KeyError(position)
        return self.messages[position].content


class _StoredTexts:
    """`Texts` read from the database when first asked for: the one position, or the whole history."""

    def __init__(self, store: TaskStore, task_pk: int, *, whole_history: bool = False) -> None:
        self.store, self.task_pk, self.whole_history = store, task_pk, whole_history
        self.found: Optional[dict[int, str]] = None

    def __getitem__(self, position: int) -> str:
        if self.whole_history:
            if self.found is None:
                self.found = self.store._execution_texts(self.task_pk, None)
            return self.found[position]
        found = self.store._execution_texts(self.task_pk, {position}) if isinstance(position, int) else {}
        return found[position]


def _text_at(task_id: str, texts: Texts, position: Any) -> str:
    """The referenced message text; `CorruptRecord` if the message is gone."""
    try:
        return texts[position]
    except (KeyError, TypeError):
        raise CorruptRecord(task_id, "message", f"a checkpoint or trace refers to execution message "
                                                f"{position!r}, which is not stored") from None


def _inlined_events(task_id: str, events: list[StoredEvent], texts: Texts) -> str:
    """Stored events as JSON again, each reference replaced by its (redacted) text."""
    return orjson.dumps([
        [ms, event_type, {**data, **{key: redact_text(_text_at(task_id, texts, position))
                                     for key, position in refs.items()}}]
        for _sequence, ms, event_type, data, refs in events
    ]).decode()


def _check_trace_sequence(task_id: str, traces: Optional[PendingTraces], next_sequence: int) -> None:
    """Refuse events numbered before the task's stored ones (IntegrityError): sequences never repeat or go back."""
    if traces and traces.first_sequence < next_sequence:
        raise IntegrityError(
            f"task {task_id!r}: trace events from sequence {traces.first_sequence} do not come after the stored "
            f"ones (next is {next_sequence}); two writers for one task?"
        )


def _positions_by_text(messages: Sequence[ChatMessage], first_position: int) -> dict[str, int]:
    """text -> position of the messages about to be stored from `first_position`, long texts only."""
    return {message.content: first_position + offset for offset, message in enumerate(messages)
            if len(message.content) >= MIN_REFERENCED_CHARS}


def _items_json(items: Sequence[CheckpointItem], positions: dict[str, int]) -> str:
    """A checkpoint's items as JSON; an output some new message holds becomes ``output_at``: its position."""
    encoded = []
    for item in items:
        fields = item.model_dump()
        position = positions.get(item.output) if positions else None
        if position is not None:
            del fields["output"]
            fields["output_at"] = position
        encoded.append(fields)
    return orjson.dumps(encoded).decode()


def _counters(messages: Sequence[ChatMessage]) -> tuple[int, int]:
    """(assistant turns, tool calls) among `messages`."""
    turns = sum(1 for m in messages if m.role == "assistant")
    return turns, sum(len(m.tool_calls or ()) for m in messages)


def _usage_params(usage: Optional[Usage]) -> tuple[Any, ...]:
    usage = usage or _NO_USAGE
    return tuple(getattr(usage, name) for name in _USAGE_FIELDS)


_NO_USAGE = Usage()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "value"
    return f"{where}: {err['msg']}"


class _HotPathSql:
    """SQL text for the per-step statements, rendered once per store.

    Rendering a peewee query costs more than executing it on SQLite, so the
    statements are rendered once (with dummy values, which peewee turns into
    parameters in column order) and reused with real parameters. Rendering
    goes through `db`, so placeholders (``?`` or ``%s``) and conflict
    clauses (``INSERT OR IGNORE`` or ``ON CONFLICT DO NOTHING``) are the
    backend's own.
    """

    def __init__(self, db: Database, tables: Tables) -> None:
        Task, Message, Checkpoint = tables.Task, tables.Message, tables.Checkpoint
        # The highest stored step comes along: where the checkpoint's trace goes depends on it.
        highest_step = Checkpoint.select(fn.MAX(Checkpoint.step_index)).where(Checkpoint.task == Task.id)
        select_task = Task.select(Task.id, Task.execution_count, Task.lease_token, Task.trace_next_sequence,
                                  highest_step).where(Task.task_id == "")
        # PostgreSQL: lock the row for the checkpoint's transaction (SQLite: BEGIN IMMEDIATE already did).
        self.select_task = _render(select_task.for_update() if db.for_update else select_task)
        self.select_task_row = _render(Task.select().where(Task.task_id == ""))
        self.select_cancel_requested = _render(Task.select(Task.cancel_requested).where(Task.task_id == ""))
        self.insert_checkpoint = _render(
            Checkpoint.insert(task=0, step_index=0, checkpoint_note="", items="", created_at=0.0,
                              trace_first_sequence=0, trace="")
            .on_conflict_ignore().returning()  # rowcount says whether it was new; no implicit RETURNING "id"
        )
        # One history per statement: a column fewer per row is measurable at 5,000 rows.
        self.select_history = _render(
            Message.select(Message.role, Message.content, Message.tool_call_id, Message.name, Message.tool_calls)
            .where((Message.task == 0) & (Message.history == 0))
            .order_by(Message.position)
        )
        self.select_last_step = _render(Checkpoint.select(fn.MAX(Checkpoint.step_index)).where(Checkpoint.task == 0))
        self.insert_trace_batch = _render(
            tables.TraceBatch.insert(task=0, first_sequence=0, last_sequence=0, started_at=0.0, agent="", model="",
                                     job_type="", events="", refers_to_messages=False).returning()
        )
        self.insert_message = _render(
            Message.insert(task=0, history=0, position=0, step_index=0, role="", content="",
                           tool_call_id="", name="", tool_calls="").returning()
        )
        # Counter increments and COALESCEs: written out, parameters in the
        # order record_checkpoint passes them.
        p = db.param
        self.update_task_after_checkpoint = (
            f'UPDATE "task" SET "thread_id" = {p}, "channel" = {p}, "provider" = {p}, "model" = {p}, '
            f'"status" = \'running\', "checkpoint_count" = "checkpoint_count" + 1, '
            f'"execution_count" = "execution_count" + {p}, '
            f'"turn_count" = "turn_count" + {p}, "tool_call_count" = "tool_call_count" + {p}, '
            + "".join(f'"{name}" = "{name}" + {p}, ' for name in _USAGE_FIELDS) +
            f'"latest_checkpoint_note" = COALESCE({p}, "latest_checkpoint_note"), '
            f'"updated_at" = {p}, "lease_expires_at" = COALESCE({p}, "lease_expires_at"), '
            f'"trace_next_sequence" = {p} WHERE "id" = {p}'
        )


def _render(query: Any) -> str:
    sql, _params = query.sql()
    return sql
